"""Execution plans compute the paper's model: the XLA:CPU plan's operations (canonical
convolution gradients, 1x1 convolutions as matrix products, the sliced max pool), its
scanned stages and packed variables give the same parameters, values and gradients as the
model as written, and the plan is chosen from the platform.
"""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxprs import all_eqns

from resnet_jax import models, parallel
from resnet_jax.backends import cpu_ops, plans
from resnet_jax.config import base_config
from resnet_jax.models import layers
from resnet_jax.training import optim, steps

CPU = plans.get_plan('cpu')


def rel_diff(a, b) -> float:
    """|a - b| / |a| (Euclidean norms)."""
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(a), 1e-30))


def flat(tree) -> jax.Array:
    """A tree's leaves as one vector (a gradient as the vector it is)."""
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


# --- scanned blocks and the canonical convolution gradients --------------------------------


def _canonical_and_lax_gradients(size, kernel, stride, c_in, c_out, batch):
    """(values, gradients) of lax's convolution and of ``canonical_conv``, and the
    gradient program of the latter."""
    pad = ((kernel - 1) // 2,) * 2
    x = jax.random.normal(jax.random.key(0), (batch, size, size + 1, c_in))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, c_in, c_out))
    dn = ('NHWC', 'HWIO', 'NHWC')
    ref = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (stride,) * 2, (pad, pad), dimension_numbers=dn
    )
    ours = lambda x, w: cpu_ops.canonical_conv(
        x, w, (stride,) * 2, (pad, pad), dimension_numbers=dn
    )
    y, ref_vjp = jax.vjp(ref, x, w)
    y2, our_vjp = jax.vjp(ours, x, w)
    g = jax.random.normal(jax.random.key(2), y.shape)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: ours(x, w).sum(), (0, 1)))(x, w)
    return (y, ref_vjp(g)), (y2, our_vjp(g)), jaxpr


@pytest.mark.parametrize(
    'size, kernel, stride, c_in, c_out',
    [
        (8, 3, 1, 4, 6),
        (8, 3, 2, 4, 8),
        (7, 3, 2, 3, 5),
        (9, 1, 2, 4, 8),
        (12, 7, 2, 3, 4),
        (5, 1, 1, 2, 3),
    ],
)
def test_canonical_conv_matches_lax_values_and_gradients(size, kernel, stride, c_in, c_out):
    (y, ref_grads), (y2, our_grads), jaxpr = _canonical_and_lax_gradients(
        size, kernel, stride, c_in, c_out, batch=2
    )
    np.testing.assert_array_equal(y, y2)
    for a, b in zip(ref_grads, our_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Its gradients are convolutions in the forward layout only (what XLA:CPU runs fast).
    labels = {
        str(e.params['dimension_numbers'])
        for e in all_eqns(jaxpr.jaxpr)
        if e.primitive.name == 'conv_general_dilated'
    }
    assert len(labels) == 1


@pytest.mark.parametrize(
    'batch, stride',
    [
        (48, 2),  # the weight gradient summed over 3 chunks of 16
        (40, 1),
    ],
)  # 16 + 16 + 8
def test_canonical_conv_weight_gradient_over_chunks_of_the_batch(batch, stride):
    (y, ref_grads), (y2, our_grads), _ = _canonical_and_lax_gradients(6, 3, stride, 3, 4, batch)
    assert cpu_ops.weight_grad_chunk((batch, 6, 7, 3)) == 16
    np.testing.assert_array_equal(y, y2)
    for a, b in zip(ref_grads, our_grads):  # the same float32 sums, in another order
        assert rel_diff(a, b) < 1e-6


def test_canonical_conv_passes_other_convolutions_to_lax():
    x, w = jnp.ones((1, 6, 6, 4)), jnp.ones((3, 3, 2, 4))
    y = cpu_ops.canonical_conv(
        x, w, (1, 1), 'SAME', feature_group_count=2, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
    assert y.shape == (1, 6, 6, 4)


@pytest.mark.parametrize('stride', [1, 2])
def test_weight_gradient_summed_over_batch_chunks(monkeypatch, stride):
    """The weight gradient as a sum over chunks of the batch, the last one shorter."""
    monkeypatch.setattr(cpu_ops, '_CHUNK_EXAMPLES', 2)
    x = jax.random.normal(jax.random.key(0), (5, 9, 9, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 6))
    dn, pad = ('NHWC', 'HWIO', 'NHWC'), ((1, 1), (1, 1))
    assert cpu_ops.weight_grad_chunk(x.shape) == 2
    ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride,) * 2, pad, dimension_numbers=dn)
    ours = lambda x, w: cpu_ops.canonical_conv(x, w, (stride,) * 2, pad, dimension_numbers=dn)
    g = jax.random.normal(jax.random.key(2), ref(x, w).shape)
    for a, b in zip(jax.vjp(ref, x, w)[1](g), jax.vjp(ours, x, w)[1](g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: ours(x, w).sum(), (0, 1)))(x, w)
    convs = sum(e.primitive.name == 'conv_general_dilated' for e in all_eqns(jaxpr.jaxpr))
    assert convs == 1 + 1 + 3  # fwd, dx, 3 dw


def test_weight_gradient_chunks_are_16_examples_and_few():
    assert cpu_ops.weight_grad_chunk((128, 32, 32, 16)) == 16  # CIFAR batch: 8 chunks
    assert cpu_ops.weight_grad_chunk((16, 56, 56, 64)) == 16  # ImageNet batch: one piece
    assert cpu_ops.weight_grad_chunk((1024, 8, 8, 64)) == 64  # at most 16 chunks
    assert cpu_ops.weight_grad_chunk((4, 8, 8, 3)) == 4


def test_cpu_compiler_options_keep_convolutions_in_xla():
    """The CPU plan compiles with options that leave convolutions to XLA's multi-threaded
    kernels instead of YNNPACK (where this XLA has YNNPACK)."""
    options = dict(CPU.compiler_options)
    if not options:
        pytest.skip('an XLA:CPU option of jax >= 0.10')
    x, w = jnp.zeros((8, 16, 16, 32)), jnp.zeros((3, 3, 32, 32))
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
    hlo = jax.jit(conv, compiler_options=options).lower(x, w).compile().as_text()
    assert 'convolution(' in hlo and '__ynn_fusion' not in hlo


def test_cpu_compiler_options_unknown_to_this_xla_are_left_out_one_by_one(monkeypatch):
    """An option this XLA:CPU does not have (jax 0.12 has no `xla_cpu_use_fusion_emitters`)
    is dropped on its own; the others stay."""
    known = {'xla_cpu_prefer_vector_width': 256}
    monkeypatch.setattr(plans, '_CPU_OPTIONS', {**known, 'xla_cpu_no_such_option': True})
    assert plans._cpu_compiler_options() == known


@pytest.mark.parametrize(
    'size, stride, c_in, c_out, dtype',
    [
        (8, 1, 4, 6, jnp.float32),
        (9, 2, 4, 8, jnp.float32),
        (7, 2, 3, 5, jnp.float32),
        (8, 1, 4, 6, jnp.bfloat16),
        (8, 1, 6, 4, jnp.float32),
        (9, 2, 8, 3, jnp.bfloat16),
    ],
)
def test_pointwise_conv_matches_lax_values_and_gradients(size, stride, c_in, c_out, dtype):
    x = jax.random.normal(jax.random.key(0), (2, size, size + 1, c_in), dtype)
    w = jax.random.normal(jax.random.key(1), (1, 1, c_in, c_out), dtype)
    dn = ('NHWC', 'HWIO', 'NHWC')
    ref = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (stride,) * 2, ((0, 0), (0, 0)), dimension_numbers=dn
    )
    ours = lambda x, w: cpu_ops.pointwise_conv(
        x, w, (stride,) * 2, ((0, 0), (0, 0)), dimension_numbers=dn
    )
    y, ref_vjp = jax.vjp(ref, x, w)
    y2, our_vjp = jax.vjp(ours, x, w)
    assert y2.shape == y.shape and y2.dtype == y.dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(y.astype(float), y2.astype(float), rtol=tol, atol=tol)
    g = jax.random.normal(jax.random.key(2), y.shape, dtype)
    for a, b in zip(ref_vjp(g), our_vjp(g)):
        np.testing.assert_allclose(a.astype(float), b.astype(float), rtol=tol, atol=tol * 4)
    # A matrix product, forward and backward: no convolution left.
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: ours(x, w).astype(float).sum(), (0, 1)))(x, w)
    names = {e.primitive.name for e in all_eqns(jaxpr.jaxpr)}
    assert 'dot_general' in names and 'conv_general_dilated' not in names
    # Anything but an unpadded 1x1 NHWC kernel goes to lax unchanged.
    w3 = jnp.ones((3, 3, c_in, c_out), dtype)
    np.testing.assert_array_equal(
        cpu_ops.pointwise_conv(x, w3, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn),
        jax.lax.conv_general_dilated(x, w3, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn),
    )


@pytest.mark.parametrize('shape', [(2, 9, 8, 3), (3, 10, 11, 4), (1, 4, 4, 2)])
def test_sliced_max_pool_matches_max_pool_values_and_gradients(shape):
    """Same values, and each window's gradient to its first maximum as XLA's
    select-and-scatter, ties included (ReLU zeros and repeated positives)."""
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))
    x = x.at[0, :3, :3, 0].set(1.0)
    ref = lambda x: layers.max_pool(x, 3, 2, 1)
    ours = lambda x: cpu_ops.sliced_max_pool(x, 3, 2, 1)
    y, ref_vjp = jax.vjp(ref, x)
    y2, our_vjp = jax.vjp(ours, x)
    np.testing.assert_array_equal(y, y2)
    g = jax.random.normal(jax.random.key(1), y.shape)
    np.testing.assert_allclose(ref_vjp(g)[0], our_vjp(g)[0], rtol=1e-6, atol=1e-6)
    names = {
        e.primitive.name
        for e in all_eqns(jax.make_jaxpr(jax.grad(lambda x: ours(x).sum()))(x).jaxpr)
    }
    assert not names & {'reduce_window_max', 'select_and_scatter_add'}


# --- the CPU plan computes the paper's model ------------------------------------------------

PLAN_CASES = [
    ('cifar_resnet20', {}, 16, 8),
    ('cifar_plain20', {}, 16, 8),
    pytest.param('resnet50', {'width': 8, 'num_classes': 7}, 32, 8, marks=pytest.mark.slow),
    ('resnet18', {'width': 4, 'shortcut': 'C'}, 32, 8),
]


@pytest.mark.parametrize('name, overrides, size, batch', PLAN_CASES)
def test_cpu_plan_gives_the_same_tree_logits_and_gradients(name, overrides, size, batch):
    """Same parameter tree at init, same logits, and the same train-mode gradients and
    BatchNorm statistics within 1e-5 relative. Both are compiled, with the plan's compiler
    options: eager op-by-op execution reorders the model's own float32 sums by more than
    that, and so does XLA:CPU's choice of convolution library (jax 0.12 gives its 1x1
    convolutions to YNNPACK by default, summing in another order than the matrix products
    the plan computes them with: ~1e-5 relative on this loss; with the plan's options
    both run XLA's own kernels and agree exactly)."""
    model = models.create_model(name, **overrides)
    fast = CPU.apply_to(model)
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    jit = functools.partial(jax.jit, compiler_options=dict(CPU.compiler_options) or None)
    # init op by op: the same random draws either way, without compiling a whole net's
    # initialisers (jax 0.12's XLA:CPU takes minutes for ResNet-50's)
    variables = model.init(jax.random.key(1), x)
    same_init = fast.init(jax.random.key(1), x)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(same_init)
    assert jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), variables, same_init)
    )
    assert rel_diff(jit(model.apply)(variables, x), jit(fast.apply)(variables, x)) < 1e-5

    def loss(m, params):
        logits, state = m.apply(
            {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
        )
        return jnp.sum(logits * jnp.arange(logits.shape[-1])), state['batch_stats']

    (l1, stats1), g1 = jit(jax.value_and_grad(functools.partial(loss, model), has_aux=True))(
        variables['params']
    )
    (l2, stats2), g2 = jit(jax.value_and_grad(functools.partial(loss, fast), has_aux=True))(
        variables['params']
    )
    assert abs(float(l1 - l2)) <= 1e-5 * abs(float(l1))
    for tree1, tree2 in ((stats1, stats2), (g1, g2)):
        assert jax.tree_util.tree_structure(tree1) == jax.tree_util.tree_structure(tree2)
        assert rel_diff(flat(tree1), flat(tree2)) < 1e-5


def test_cpu_plan_swaps_the_operations():
    """What the plan changes in the traced program: 1x1 convolutions become matrix
    products, the stem pool strided slices, the repeated blocks one scan per stage."""
    model = models.create_model('resnet50', width=4, num_classes=7)
    x = jnp.zeros((2, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))

    def primitives(m):
        return [
            e.primitive.name
            for e in all_eqns(
                jax.make_jaxpr(lambda v: m.apply(v, x, train=True, mutable=['batch_stats']))(
                    variables
                ).jaxpr
            )
        ]

    plain, fast = primitives(model), primitives(CPU.apply_to(model))
    assert 'scan' not in plain and 'reduce_window_max' in plain
    assert fast.count('scan') == 4 and 'reduce_window_max' not in fast
    assert fast.count('conv_general_dilated') < plain.count('conv_general_dilated')


def test_plan_is_chosen_from_the_platform_and_named():
    assert plans.get_plan('auto', 'cpu').name == 'cpu'
    assert plans.get_plan('auto', 'gpu') is plans.XLA
    assert plans.get_plan('auto', 'tpu') is plans.XLA
    assert plans.get_plan('xla', 'cpu') is plans.XLA
    mesh = parallel.create_mesh()
    assert plans.plan_for_mesh(mesh).name == ('cpu' if jax.default_backend() == 'cpu' else 'xla')
    with pytest.raises(ValueError, match='allowed: auto, xla, cpu'):
        plans.get_plan('fast')
    # The XLA plan leaves the model as it is, but for stages too deep to compile unrolled.
    for name in ('cifar_resnet20', 'cifar_resnet110', 'resnet152'):
        model = models.create_model(name)
        assert plans.XLA.apply_to(model) is model and plans.XLA.scan_groups(model) == []
    deep = models.create_model('cifar_resnet1202')
    assert [len(g) for g in plans.XLA.scan_groups(deep)] == [199, 199, 199]
    assert plans.XLA.apply_to(deep).conv is layers.conv  # XLA's own convolutions


def test_forward_mode_ad_through_the_cpu_plan_says_how_to_turn_it_off():
    model = CPU.apply_to(models.create_model('cifar_resnet8'))
    x = jnp.ones((2, 8, 8, 3))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(TypeError, match="get_plan\\('xla'\\)"):
        jax.jvp(lambda x: model.apply(variables, x), (x,), (x,))


@pytest.mark.parametrize(
    'name, overrides, size',
    [
        ('cifar_resnet20', {}, 16),
        pytest.param('resnet50', {'width': 4, 'num_classes': 7}, 32, marks=pytest.mark.slow),
    ],
)
def test_packed_variables_give_the_same_model(name, overrides, size):
    """The stacked layout of the scan groups' blocks (what a compiled train step runs
    inside) is a lossless relayout: same outputs, BN statistics and gradients, bit for
    bit."""
    plain = models.create_model(name, **overrides)
    model = CPU.apply_to(plain)
    x = jax.random.normal(jax.random.key(0), (4, size, size, 3))
    variables = model.init(jax.random.key(1), x)
    packed = {col: plans._pack(CPU.scan_groups(plain), tree) for col, tree in variables.items()}
    assert len(jax.tree_util.tree_leaves(packed)) < len(jax.tree_util.tree_leaves(variables))
    assert plans.packed_name(CPU.scan_groups(plain)[0]) in packed['params']
    unpacked = {col: plans._unpack(CPU.scan_groups(plain), tree) for col, tree in packed.items()}
    assert jax.tree_util.tree_structure(unpacked) == jax.tree_util.tree_structure(variables)
    assert jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), variables, unpacked)
    )
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(apply(variables, x), apply(packed, x))

    def loss(vs, params):
        logits, state = model.apply(
            {**vs, 'params': params}, x, train=True, mutable=['batch_stats']
        )
        return jnp.sum(logits * jnp.arange(logits.shape[-1])), state['batch_stats']

    grad = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True))
    (l1, stats1), g1 = grad(variables, variables['params'])
    (l2, stats2), g2 = grad(packed, packed['params'])
    assert l1 == l2
    groups = CPU.scan_groups(plain)
    for tree1, tree2 in ((stats1, plans._unpack(groups, stats2)), (g1, plans._unpack(groups, g2))):
        assert jax.tree_util.tree_structure(tree1) == jax.tree_util.tree_structure(tree2)
        for a, b in zip(jax.tree_util.tree_leaves(tree1), jax.tree_util.tree_leaves(tree2)):
            np.testing.assert_array_equal(a, b)
    # Without scanned groups nothing is packed.
    assert plans._pack(plans.XLA.scan_groups(plain), variables['params']) == variables['params']


def test_scanned_program_does_not_grow_with_depth():
    def convs(name):  # in the train step's program, loop bodies counted once
        model = models.create_model(name)
        x = jnp.zeros((2, 32, 32, 3))
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
        fast = CPU.apply_to(model)
        step = jax.grad(lambda v: fast.apply(v, x, train=True, mutable=['batch_stats'])[0].sum())
        return sum(
            e.primitive.name == 'conv_general_dilated'
            for e in all_eqns(jax.make_jaxpr(step)(variables).jaxpr)
        )

    assert convs('cifar_resnet1202') == convs('cifar_resnet56') < 60


# --- parts of one's own under the plan ------------------------------------------------------


@pytest.mark.slow
def test_group_norm_model_trains_a_step_under_the_cpu_plan():
    """A norm layer handed in (GroupNorm: no batch statistics) runs scanned, without a
    warning, and its step equals the model's own."""
    config = base_config()
    config.batch_size = 8
    model = models.create_model(
        'cifar_resnet20', norm=functools.partial(nn.GroupNorm, num_groups=4)
    )
    lr_fn = optim.create_learning_rate_fn(config)
    tx = optim.create_optimizer(config, lr_fn)
    mesh = parallel.create_mesh(jax.devices()[:1])
    rng = np.random.default_rng(0)
    batch = parallel.shard_batch(
        mesh,
        {
            'image': rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
            'label': rng.integers(0, 10, 8).astype(np.int32),
        },
    )
    results = []
    for plan in ('xla', 'cpu'):
        config.execution = plan
        state = steps.init_train_state(model, tx, jax.random.key(0), (16, 16, 3), mesh)
        assert state.batch_stats == {}
        train, _, layout = steps.compile_steps(model, tx, lr_fn, config, mesh)
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # no fallback to unrolled
            state, metrics = train(layout.from_model(state), batch)
        results.append((layout.to_model(state), metrics.compute()['loss']))
    (ref, ref_loss), (fast, fast_loss) = results
    assert np.isfinite(float(fast_loss)) and abs(float(ref_loss - fast_loss)) < 1e-5
    assert rel_diff(flat(ref.params), flat(fast.params)) < 1e-5


def test_the_cpu_plans_layout_stacks_every_parameter_shaped_tree():
    """Under the CPU plan the compiled steps hold params, BN statistics and the momentum
    stacked per scan group (``StateLayout``); ``to_model`` gives the model's own tree back,
    bit for bit, and a step keeps the layout."""
    config = base_config()
    config.batch_size, config.model.bn_group_size, config.execution = 8, 4, 'cpu'
    model = models.create_model('cifar_resnet20', width=4, bn_group_size=4)
    lr_fn = optim.create_learning_rate_fn(config)
    tx = optim.create_optimizer(config, lr_fn)
    mesh = parallel.create_mesh(jax.devices()[:1])
    train, _, layout = steps.compile_steps(model, tx, lr_fn, config, mesh)
    canonical = steps.init_train_state(model, tx, jax.random.key(0), (16, 16, 3), mesh)
    state = layout.from_model(canonical)
    blocks = {'conv2_2', 'conv2_3', 'conv3_2', 'conv3_3', 'conv4_2', 'conv4_3'}
    for packed_tree, own_tree in (
        (state.params, canonical.params),
        (state.batch_stats, canonical.batch_stats),
        (state.opt_state[1][0].trace, canonical.opt_state[1][0].trace),
    ):
        assert not blocks & set(packed_tree) and 'conv2_2..conv2_3' in packed_tree
        assert blocks <= set(own_tree) and not any('..' in k for k in own_tree)
    again = layout.to_model(state)
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(canonical)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, canonical)
    rng = np.random.default_rng(0)
    batch = parallel.shard_batch(
        mesh,
        {
            'image': rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
            'label': rng.integers(0, 10, 8).astype(np.int32),
        },
    )
    new, _ = train(state, batch)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(state)
    # The XLA plan scans no stage of this net: its layout is the model's own tree.
    config.execution = 'xla'
    assert steps.compile_steps(model, tx, lr_fn, config, mesh).layout.groups == ()
