"""The CPU execution paths compute the model's function: canonical convolution gradients,
1x1 convolutions as matrix products, scanned blocks and the packed (stacked) variables.

Each is selected by backend (on for XLA:CPU) and must give the same values and take the
same parameters as the straightforward model.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxprs import all_eqns

from resnet_jax import cpu_paths, layers, models, parallel

# --- scanned blocks and the canonical convolution gradients --------------------------------

@pytest.mark.parametrize('size, kernel, stride, c_in, c_out', [
    (8, 3, 1, 4, 6), (8, 3, 2, 4, 8), (7, 3, 2, 3, 5), (9, 1, 2, 4, 8), (12, 7, 2, 3, 4),
    (5, 1, 1, 2, 3)])
def test_canonical_conv_matches_lax_values_and_gradients(size, kernel, stride, c_in, c_out):
    pad = ((kernel - 1) // 2,) * 2
    x = jax.random.normal(jax.random.key(0), (2, size, size + 1, c_in))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, c_in, c_out))
    dn = ('NHWC', 'HWIO', 'NHWC')
    ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride,) * 2, (pad, pad),
                                                    dimension_numbers=dn)
    ours = lambda x, w: cpu_paths.canonical_conv(x, w, (stride,) * 2, (pad, pad),
                                              dimension_numbers=dn)
    y, ref_vjp = jax.vjp(ref, x, w)
    y2, our_vjp = jax.vjp(ours, x, w)
    np.testing.assert_array_equal(y, y2)
    g = jax.random.normal(jax.random.key(2), y.shape)
    for a, b in zip(ref_vjp(g), our_vjp(g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Its gradients are convolutions in the forward layout only (what XLA:CPU runs fast).
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: ours(x, w).sum(), (0, 1)))(x, w)
    labels = {str(e.params['dimension_numbers']) for e in all_eqns(jaxpr.jaxpr)
              if e.primitive.name == 'conv_general_dilated'}
    assert len(labels) == 1


def test_canonical_conv_passes_other_convolutions_to_lax():
    x, w = jnp.ones((1, 6, 6, 4)), jnp.ones((3, 3, 2, 4))
    y = cpu_paths.canonical_conv(x, w, (1, 1), 'SAME', feature_group_count=2,
                              dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    assert y.shape == (1, 6, 6, 4)


@pytest.mark.parametrize('stride', [1, 2])
def test_weight_gradient_summed_over_batch_chunks(monkeypatch, stride):
    """The weight gradient as a sum over chunks of the batch, the last one shorter."""
    monkeypatch.setattr(cpu_paths, '_CHUNK_EXAMPLES', 2)
    x = jax.random.normal(jax.random.key(0), (5, 9, 9, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 6))
    dn, pad = ('NHWC', 'HWIO', 'NHWC'), ((1, 1), (1, 1))
    assert cpu_paths.weight_grad_chunk(x.shape) == (2 if jax.default_backend() == 'cpu' else 5)
    ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride,) * 2, pad,
                                                    dimension_numbers=dn)
    ours = lambda x, w: cpu_paths.canonical_conv(x, w, (stride,) * 2, pad, dimension_numbers=dn)
    g = jax.random.normal(jax.random.key(2), ref(x, w).shape)
    for a, b in zip(jax.vjp(ref, x, w)[1](g), jax.vjp(ours, x, w)[1](g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: ours(x, w).sum(), (0, 1)))(x, w)
    convs = sum(e.primitive.name == 'conv_general_dilated' for e in all_eqns(jaxpr.jaxpr))
    assert convs == (1 + 1 + 3 if jax.default_backend() == 'cpu' else 3)  # fwd, dx, 3 dw


def test_weight_gradient_chunks_are_16_examples_and_few():
    if jax.default_backend() != 'cpu':
        pytest.skip('chunks are a CPU path')
    assert cpu_paths.weight_grad_chunk((128, 32, 32, 16)) == 16  # CIFAR batch: 8 chunks
    assert cpu_paths.weight_grad_chunk((16, 56, 56, 64)) == 16  # ImageNet batch: one piece
    assert cpu_paths.weight_grad_chunk((1024, 8, 8, 64)) == 64  # at most 16 chunks
    assert cpu_paths.weight_grad_chunk((4, 8, 8, 3)) == 4


@pytest.mark.parametrize('name, overrides, size', [
    ('cifar_resnet20', {}, 16), ('resnet50', dict(width=4, num_classes=7), 32)])
def test_canonical_grads_compute_the_same_model(name, overrides, size):
    plain = models.create_model(name, scan_blocks=False, canonical_grads=False, **overrides)
    canonical = plain.clone(canonical_grads=True)
    assert plain.clone(canonical_grads=None).uses_canonical_grads() == (
        jax.default_backend() == 'cpu')
    x = jax.random.normal(jax.random.key(0), (4, size, size, 3))
    variables = plain.init(jax.random.key(1), x)

    def grads(model):
        return jax.grad(lambda p: model.apply({**variables, 'params': p}, x, train=True,
                                              mutable=['batch_stats'])[0].sum())(
            variables['params'])
    for a, b in zip(jax.tree_util.tree_leaves(grads(plain)),
                    jax.tree_util.tree_leaves(grads(canonical))):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * float(jnp.abs(a).max()))


def test_cpu_compiler_options_keep_convolutions_in_xla():
    """On CPU the library's steps compile with ``parallel.cpu_compiler_options``, which
    leave convolutions to XLA's multi-threaded kernels instead of YNNPACK."""
    options = parallel.cpu_compiler_options()
    if jax.default_backend() != 'cpu' or not options:
        assert options == {} or jax.default_backend() == 'cpu'
        pytest.skip('an XLA:CPU option of jax >= 0.10')
    x, w = jnp.zeros((8, 16, 16, 32)), jnp.zeros((3, 3, 32, 32))
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    hlo = jax.jit(conv, compiler_options=options).lower(x, w).compile().as_text()
    assert 'convolution(' in hlo and '__ynn_fusion' not in hlo


@pytest.mark.parametrize('size, stride, c_in, c_out, dtype', [
    (8, 1, 4, 6, jnp.float32), (9, 2, 4, 8, jnp.float32), (7, 2, 3, 5, jnp.float32),
    (8, 1, 4, 6, jnp.bfloat16), (8, 1, 6, 4, jnp.float32), (9, 2, 8, 3, jnp.bfloat16)])
def test_pointwise_conv_matches_lax_values_and_gradients(size, stride, c_in, c_out, dtype):
    x = jax.random.normal(jax.random.key(0), (2, size, size + 1, c_in), dtype)
    w = jax.random.normal(jax.random.key(1), (1, 1, c_in, c_out), dtype)
    dn = ('NHWC', 'HWIO', 'NHWC')
    ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride,) * 2, ((0, 0), (0, 0)),
                                                    dimension_numbers=dn)
    ours = lambda x, w: cpu_paths.pointwise_conv(x, w, (stride,) * 2, ((0, 0), (0, 0)),
                                              dimension_numbers=dn)
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
        cpu_paths.pointwise_conv(x, w3, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn),
        jax.lax.conv_general_dilated(x, w3, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn))


@pytest.mark.parametrize('shape', [(2, 9, 8, 3), (3, 10, 11, 4), (1, 4, 4, 2)])
def test_sliced_max_pool_matches_max_pool_values_and_gradients(shape):
    """Same values, and each window's gradient to its first maximum as XLA's
    select-and-scatter, ties included (ReLU zeros and repeated positives)."""
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))
    x = x.at[0, :3, :3, 0].set(1.0)
    ref = lambda x: layers.max_pool(x, 3, 2, 1)
    ours = lambda x: layers.max_pool(x, 3, 2, 1, sliced=True)
    y, ref_vjp = jax.vjp(ref, x)
    y2, our_vjp = jax.vjp(ours, x)
    np.testing.assert_array_equal(y, y2)
    g = jax.random.normal(jax.random.key(1), y.shape)
    np.testing.assert_allclose(ref_vjp(g)[0], our_vjp(g)[0], rtol=1e-6, atol=1e-6)
    names = {e.primitive.name for e in all_eqns(jax.make_jaxpr(
        jax.grad(lambda x: ours(x).sum()))(x).jaxpr)}
    assert not names & {'reduce_window_max', 'select_and_scatter_add'}


@pytest.mark.parametrize('name, overrides', [
    ('resnet50', dict(width=4, num_classes=7)), ('resnet18', dict(width=4, shortcut='C'))])
def test_dot_1x1_computes_the_same_model(name, overrides):
    convs = models.create_model(name, dot_1x1=False, scan_blocks=False, **overrides)
    dots = convs.clone(dot_1x1=True)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = convs.init(jax.random.key(1), x)
    same = dots.init(jax.random.key(1), x)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(same)
    np.testing.assert_allclose(convs.apply(variables, x), dots.apply(variables, x),
                               rtol=1e-4, atol=1e-4)
    count = lambda m: sum(e.primitive.name == 'conv_general_dilated' for e in all_eqns(
        jax.make_jaxpr(lambda v: m.apply(v, x))(variables).jaxpr))
    assert count(dots) < count(convs)  # the 1x1 convolutions became matrix products
    assert convs.clone(dot_1x1=None).uses_dot_1x1() == (jax.default_backend() == 'cpu')


@pytest.mark.parametrize('name, overrides, size', [
    ('cifar_resnet20', {}, 16), ('cifar_plain20', {}, 16),
    ('resnet50', dict(width=4, num_classes=7), 32), ('resnet18', dict(width=4, shortcut='C'), 32)])
def test_scanned_blocks_compute_the_unrolled_function(name, overrides, size):
    unrolled = models.create_model(name, scan_blocks=False, **overrides)
    scanned = models.create_model(name, scan_blocks=True, **overrides)
    x = jax.random.normal(jax.random.key(0), (4, size, size, 3))
    variables = unrolled.init(jax.random.key(1), x)
    same_init = scanned.init(jax.random.key(1), x)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool((a == b).all()), variables, same_init))
    np.testing.assert_allclose(unrolled.apply(variables, x), scanned.apply(variables, x),
                               rtol=1e-5, atol=1e-5)

    def loss(model, params):
        logits, state = model.apply({**variables, 'params': params}, x, train=True,
                                    mutable=['batch_stats'])
        return jnp.sum(logits * jnp.arange(logits.shape[-1])), state['batch_stats']

    (l1, stats1), g1 = jax.value_and_grad(functools.partial(loss, unrolled), has_aux=True)(
        variables['params'])
    (l2, stats2), g2 = jax.value_and_grad(functools.partial(loss, scanned), has_aux=True)(
        variables['params'])
    np.testing.assert_allclose(l1, l2, rtol=5e-4)
    assert jax.tree_util.tree_structure(stats1) == jax.tree_util.tree_structure(stats2)
    for tree1, tree2 in ((stats1, stats2), (g1, g2)):
        for a, b in zip(jax.tree_util.tree_leaves(tree1), jax.tree_util.tree_leaves(tree2)):
            # float32 reassociation; the tiny batch makes train-mode BN ill-conditioned
            np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * float(jnp.abs(a).max()))


@pytest.mark.parametrize('name, overrides, size', [
    ('cifar_resnet20', {}, 16), ('resnet50', dict(width=4, num_classes=7), 32)])
def test_packed_variables_give_the_same_model(name, overrides, size):
    """``ResNet.pack`` (each scan group's blocks stacked, the train state's layout) is a
    lossless relayout: same outputs, BN statistics and gradients, bit for bit."""
    model = models.create_model(name, scan_blocks=True, **overrides)
    x = jax.random.normal(jax.random.key(0), (4, size, size, 3))
    variables = model.init(jax.random.key(1), x)
    packed = {col: model.pack(tree) for col, tree in variables.items()}
    assert len(jax.tree_util.tree_leaves(packed)) < len(jax.tree_util.tree_leaves(variables))
    assert models.packed_name(model.scan_groups()[0]) in packed['params']
    unpacked = {col: model.unpack(tree) for col, tree in packed.items()}
    assert jax.tree_util.tree_structure(unpacked) == jax.tree_util.tree_structure(variables)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool((a == b).all()), variables, unpacked))
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(packed, x))

    def loss(vs, params):
        logits, state = model.apply({**vs, 'params': params}, x, train=True,
                                    mutable=['batch_stats'])
        return jnp.sum(logits * jnp.arange(logits.shape[-1])), state['batch_stats']

    (l1, stats1), g1 = jax.value_and_grad(loss, argnums=1, has_aux=True)(
        variables, variables['params'])
    (l2, stats2), g2 = jax.value_and_grad(loss, argnums=1, has_aux=True)(
        packed, packed['params'])
    assert l1 == l2
    for tree1, tree2 in ((stats1, model.unpack(stats2)), (g1, model.unpack(g2))):
        assert jax.tree_util.tree_structure(tree1) == jax.tree_util.tree_structure(tree2)
        for a, b in zip(jax.tree_util.tree_leaves(tree1), jax.tree_util.tree_leaves(tree2)):
            np.testing.assert_array_equal(a, b)
    # Unrolled, nothing is scanned and nothing is packed.
    unrolled = model.clone(scan_blocks=False)
    assert unrolled.scan_groups() == [] and unrolled.pack(variables['params']) == \
        variables['params']


def test_scanned_program_does_not_grow_with_depth():
    def convs(name):  # in the train step's program, loop bodies counted once
        model = models.create_model(name, scan_blocks=True)
        x = jnp.zeros((2, 32, 32, 3))
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
        step = jax.grad(lambda v: model.apply(v, x, train=True,
                                              mutable=['batch_stats'])[0].sum())
        return sum(e.primitive.name == 'conv_general_dilated'
                   for e in all_eqns(jax.make_jaxpr(step)(variables).jaxpr))
    assert convs('cifar_resnet1202') == convs('cifar_resnet56') < 60


def test_scan_blocks_default_follows_the_backend():
    model = models.create_model('cifar_resnet20')
    assert model.scan_blocks is None
    assert model.uses_scan() == (jax.default_backend() == 'cpu')
    assert not model.clone(scan_blocks=False).uses_scan()


def test_forward_mode_ad_with_the_cpu_paths_off():
    """The CPU paths' gradients are custom VJPs; with them off, ``jax.jvp`` works."""
    model = models.create_model('resnet50', width=4, num_classes=7).clone(
        scan_blocks=False, canonical_grads=False, dot_1x1=False)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = model.init(jax.random.key(1), x)
    y, dy = jax.jvp(lambda x: model.apply(variables, x), (x,), (jnp.ones_like(x),))
    assert y.shape == dy.shape == (2, 7) and bool(jnp.isfinite(dy).all())
