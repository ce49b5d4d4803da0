"""The networks of Table 1 and sec. 4.2: counts, shapes, blocks, shortcuts and BatchNorm."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxprs import all_eqns

import resnet_jax
from resnet_jax import models
from resnet_jax.models import layers


@functools.cache
def abstract_variables(name, size=224, **overrides):
    model = models.create_model(name, **overrides)
    x = jnp.zeros((1, size, size, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


# --- Table 6 and Table 1 parameter counts --------------------------------------------------


@pytest.mark.parametrize(
    'depth, expected',
    [(20, 269_722), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6), (110, 1.7e6), (1202, 19.4e6)],
)
def test_cifar_parameter_counts_match_table6(depth, expected):
    n = resnet_jax.count_params(abstract_variables(f'cifar_resnet{depth}', 32)['params'])
    if isinstance(expected, int):
        assert n == expected
    else:
        assert round(n / 1e6, 2 if expected < 1e6 else 1) == expected / 1e6
    # Option A adds no parameters, so the plain net has exactly the same count.
    assert resnet_jax.count_params(abstract_variables(f'cifar_plain{depth}', 32)['params']) == n


def test_cifar_resnet1202_exact_count():
    assert (
        resnet_jax.count_params(abstract_variables('cifar_resnet1202', 32)['params']) == 19_421_274
    )


@pytest.mark.parametrize(
    'name, expected',
    [
        ('resnet18', 11_689_512),
        ('resnet34', 21_797_672),
        ('resnet50', 25_557_032),
        ('resnet101', 44_549_160),
        ('resnet152', 60_192_808),
    ],
)
def test_imagenet_option_b_counts_equal_torchvision(name, expected):
    assert resnet_jax.count_params(abstract_variables(name)['params']) == expected


def test_option_a_resnet34_has_plain34_count():
    a = resnet_jax.count_params(abstract_variables('resnet34', shortcut='A')['params'])
    assert a == resnet_jax.count_params(abstract_variables('plain34')['params'])
    c = resnet_jax.count_params(abstract_variables('resnet34', shortcut='C')['params'])
    assert c > resnet_jax.count_params(abstract_variables('resnet34')['params']) > a


# --- Table 1 multiply-adds -------------------------------------------------------------------


@pytest.mark.parametrize(
    'name, paper',
    [
        ('resnet18', 1.8),
        ('resnet34', 3.6),
        ('resnet50', 3.8),
        ('resnet101', 7.6),
        ('resnet152', 11.3),
    ],
)
def test_macs_match_table1(name, paper):
    macs = resnet_jax.count_macs(models.create_model(name), (1, 224, 224, 3)) / 1e9
    assert abs(macs - paper) / paper < 0.02


@pytest.mark.parametrize(
    'name, expected', [('resnet50', 4.09), ('resnet101', 7.80), ('resnet152', 11.51)]
)
def test_macs_v1_5(name, expected):
    model = models.create_model(name, stride_in_1x1=False)
    macs = resnet_jax.count_macs(model, (1, 224, 224, 3)) / 1e9
    assert abs(macs - expected) / expected < 0.01


def test_macs_follow_input_size_and_batch():
    model = models.create_model('cifar_resnet20')
    one = resnet_jax.count_macs(model, (1, 32, 32, 3))
    assert resnet_jax.count_macs(model, (4, 32, 32, 3)) == 4 * one
    # Doubling each side quadruples every conv (the fc is tiny but stays the same).
    assert resnet_jax.count_macs(model, (1, 64, 64, 3)) == pytest.approx(4 * one, rel=1e-3)


# --- output shapes of every registered model ---------------------------------------------


@pytest.mark.parametrize(
    'name, train', [(n, t) for n in models.list_models() for t in (False, True)]
)
def test_output_shapes(name, train):
    model = models.create_model(name)
    sizes = [(32, 32)] if name.startswith('cifar') else [(224, 224), (256, 320)]
    for h, w in sizes:
        x = jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32)
        variables = abstract_variables(name, 32 if name.startswith('cifar') else 224)
        if train:
            logits, state = jax.eval_shape(
                lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']), variables, x
            )
            assert jax.tree_util.tree_structure(
                state['batch_stats']
            ) == jax.tree_util.tree_structure(variables['batch_stats'])
        else:
            logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
        assert logits.shape == (2, model.num_classes)
        assert logits.dtype == jnp.float32


def test_fully_convolutional_forward_on_small_non_square_inputs():
    """Jitted, as research code runs it (op by op 6.3-6.8 s, jitted 3.1-3.2 s: performance.md)."""
    model = models.create_model('resnet18', width=8, num_classes=5)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 32, 32, 3)))
    for shape in [(2, 32, 32, 3), (2, 40, 72, 3)]:
        x = jax.random.normal(jax.random.key(1), shape)
        logits = jax.jit(model.apply)(variables, x)
        assert logits.shape == (2, 5) and np.isfinite(np.asarray(logits)).all()


def test_stage_output_sizes_follow_table1():
    model = models.create_model('resnet34')
    variables = abstract_variables('resnet34')
    _, state = jax.eval_shape(
        lambda v: model.apply(
            v, jnp.zeros((1, 224, 224, 3)), capture_intermediates=True, mutable=['intermediates']
        ),
        variables,
    )
    out = state['intermediates']
    assert out['conv1']['__call__'][0].shape == (1, 112, 112, 64)
    for stage, (n, size, width) in enumerate(
        zip((3, 4, 6, 3), (56, 28, 14, 7), (64, 128, 256, 512))
    ):
        assert out[f'conv{stage + 2}_{n}']['__call__'][0].shape == (1, size, size, width)


def test_cifar_stage_sizes_follow_section_4_2():
    model = models.create_model('cifar_resnet20')
    _, state = jax.eval_shape(
        lambda v: model.apply(
            v, jnp.zeros((1, 32, 32, 3)), capture_intermediates=True, mutable=['intermediates']
        ),
        abstract_variables('cifar_resnet20', 32),
    )
    out = state['intermediates']
    for stage, (size, width) in enumerate(zip((32, 16, 8), (16, 32, 64))):
        assert out[f'conv{stage + 2}_3']['__call__'][0].shape == (1, size, size, width)
    assert 'conv2_4' not in out


# --- the blocks, shortcuts and stride placement ------------------------------------------


def _shortcut_params(variables):
    return {k for k, v in variables['params'].items() if 'shortcut' in v}


def test_shortcut_options_place_projections_as_table3():
    assert _shortcut_params(abstract_variables('resnet34', shortcut='A')) == set()
    assert _shortcut_params(abstract_variables('resnet34', shortcut='B')) == {
        'conv3_1',
        'conv4_1',
        'conv5_1',
    }
    every = {
        k for k in abstract_variables('resnet34')['params'] if k.startswith('conv') and '_' in k
    }
    assert _shortcut_params(abstract_variables('resnet34', shortcut='C')) == every
    # Bottleneck nets: dimensions also increase in conv2_1 (64 -> 256).
    assert _shortcut_params(abstract_variables('resnet50')) == {
        'conv2_1',
        'conv3_1',
        'conv4_1',
        'conv5_1',
    }
    proj = abstract_variables('resnet50')['params']['conv3_1']['shortcut']['proj_conv']
    assert proj['kernel'].shape == (1, 1, 256, 512)


def test_option_a_zero_pads_and_subsamples():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    sc = layers.Shortcut(features=8, strides=2, option='A', norm=None)
    y = sc.apply({}, x)
    np.testing.assert_array_equal(y[..., :4], x[:, ::2, ::2, :])
    np.testing.assert_array_equal(y[..., 4:], 0)


def test_plain_net_is_the_same_stack_without_shortcuts():
    res = abstract_variables('cifar_resnet20', 32)
    plain = abstract_variables('cifar_plain20', 32)
    assert jax.tree_util.tree_structure(res) == jax.tree_util.tree_structure(plain)
    # Same weights, different function: only the residual net adds the shortcut.
    model_r, model_p = models.create_model('cifar_resnet20'), models.create_model('cifar_plain20')
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = model_r.init(jax.random.key(0), x)
    assert not np.allclose(model_r.apply(variables, x), model_p.apply(variables, x))


def test_zero_residual_branch_gives_relu_of_input():
    """Eq. (1): with F = 0 (last BN scale 0), a stride-1 block computes relu(x)."""
    block = models.BasicBlock(
        filters=4,
        strides=1,
        shortcut='A',
        zero_init_residual=True,
        conv=layers.conv,
        norm=functools.partial(layers.BatchNorm, use_running_average=True),
    )
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    variables = block.init(jax.random.key(1), x)
    np.testing.assert_allclose(block.apply(variables, x), jax.nn.relu(x), atol=1e-6)
    plain = block.clone(residual=False)
    np.testing.assert_allclose(plain.apply(variables, x), 0.0, atol=1e-6)


@pytest.mark.parametrize('stride_in_1x1, halved', [(True, 'conv1'), (False, 'conv2')])
def test_bottleneck_stride_placement(stride_in_1x1, halved):
    model = models.create_model('resnet50', stride_in_1x1=stride_in_1x1)
    _, state = jax.eval_shape(
        lambda v: model.apply(
            v, jnp.zeros((1, 224, 224, 3)), capture_intermediates=True, mutable=['intermediates']
        ),
        abstract_variables('resnet50'),
    )
    block = state['intermediates']['conv3_1']
    assert block[halved]['__call__'][0].shape[1:3] == (28, 28)
    other = 'conv2' if halved == 'conv1' else 'conv1'
    expected = (28, 28) if other == 'conv2' else (56, 56)
    assert block[other]['__call__'][0].shape[1:3] == expected


# --- initialisation, BatchNorm, dtype -------------------------------------------------------


def test_he_init_bn_init_and_no_conv_bias():
    model = models.create_model('cifar_resnet20')
    params = model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))['params']
    kernel = params['conv4_1']['conv2']['kernel']  # 3x3, 64 -> 64: fan_out = 576
    assert float(jnp.std(kernel)) == pytest.approx(np.sqrt(2 / 576), rel=0.05)
    assert set(params['conv2_1']['conv1']) == {'kernel'}
    np.testing.assert_array_equal(params['conv2_1']['bn2']['scale'], 1)
    np.testing.assert_array_equal(params['conv2_1']['bn2']['bias'], 0)
    zero = models.create_model('cifar_resnet20', zero_init_residual=True)
    zparams = zero.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))['params']
    np.testing.assert_array_equal(zparams['conv2_1']['bn2']['scale'], 0)
    np.testing.assert_array_equal(zparams['conv2_1']['bn1']['scale'], 1)


@pytest.mark.parametrize('partitionable', [True, False])
def test_he_normal_draws_the_values_of_jaxs_4d_initializer(partitionable):
    """Drawn 2-D for XLA:CPU's compile time: the values of JAX's own initializer, bit for
    bit, with either numbering of threefry's counters."""
    four_d = jax.nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
    with jax.threefry_partitionable(partitionable):
        for shape, dtype in [((3, 3, 16, 32), jnp.float32), ((1, 1, 64, 256), jnp.bfloat16)]:
            key = jax.random.key(shape[-1])
            ours = layers.he_normal(key, shape, dtype)
            assert ours.shape == shape and ours.dtype == dtype
            np.testing.assert_array_equal(ours, four_d(key, shape, dtype))


def test_batchnorm_groups_normalise_separately_and_update_running_stats():
    x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) * 3 + 2
    bn = layers.BatchNorm(use_running_average=False, group_size=4)
    variables = bn.init(jax.random.key(1), x)
    y, state = bn.apply(variables, x, mutable=['batch_stats'])
    for half in (slice(0, 4), slice(4, 8)):
        xs = x[half]
        ref = (xs - xs.mean((0, 1, 2))) / jnp.sqrt(xs.var((0, 1, 2)) + 1e-5)
        np.testing.assert_allclose(y[half], ref, atol=1e-5)
    group_means = jnp.stack([x[:4].mean((0, 1, 2)), x[4:].mean((0, 1, 2))]).mean(0)
    np.testing.assert_allclose(state['batch_stats']['mean'], 0.1 * group_means, rtol=1e-5)
    whole = layers.BatchNorm(use_running_average=False, group_size=0)
    y0, _ = whole.apply(variables, x, mutable=['batch_stats'])
    np.testing.assert_allclose(
        y0, (x - x.mean((0, 1, 2))) / jnp.sqrt(x.var((0, 1, 2)) + 1e-5), atol=1e-5
    )
    with pytest.raises(ValueError, match='groups of 3'):
        layers.BatchNorm(use_running_average=False, group_size=3).apply(
            variables, x, mutable=['batch_stats']
        )


def test_train_mode_updates_batch_stats_and_eval_uses_them():
    model = models.create_model('cifar_resnet20', bn_group_size=2)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    variables = model.init(jax.random.key(1), x)
    logits, state = model.apply(variables, x, train=True, mutable=['batch_stats'])
    assert logits.shape == (4, 10)
    before = variables['batch_stats']['bn1']['mean']
    assert not np.allclose(state['batch_stats']['bn1']['mean'], before)
    eval1 = model.apply(variables, x, train=False)
    eval2 = model.apply({**variables, **state}, x, train=False)
    assert not np.allclose(eval1, eval2)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = models.create_model('cifar_resnet20', dtype='bfloat16')
    x = jnp.ones((2, 32, 32, 3))
    variables = model.init(jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
    logits = model.apply(variables, x, train=False)
    assert logits.dtype == jnp.float32
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x))(variables)
    convs = [e for e in all_eqns(jaxpr.jaxpr) if e.primitive.name == 'conv_general_dilated']
    assert convs and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in convs)


# --- names and errors ---------------------------------------------------------------------


def test_registry_names():
    names = models.list_models()
    for expected in [
        'plain18',
        'plain34',
        'resnet18',
        'resnet34',
        'resnet50',
        'resnet101',
        'resnet152',
    ] + [f'cifar_{k}{d}' for k in ('resnet', 'plain') for d in (20, 32, 44, 56, 110, 1202)]:
        assert expected in names
    assert models.list_models('cifar_resnet*') == [
        f'cifar_resnet{d}' for d in (20, 32, 44, 56, 110, 1202)
    ]
    assert models.list_models('*50') == ['plain50', 'resnet50']
    assert models.create_model('resnet50').num_features == 2048
    assert models.create_model('resnet18', num_classes=0).num_features == 512
    assert models.create_model('cifar_resnet20').num_features == 64
    assert models.create_model('cifar_resnet14').stage_sizes == (2, 2, 2)
    assert models.create_model('resnet50').shortcut == 'B'
    assert models.create_model('cifar_plain56').shortcut == 'A'
    assert not models.create_model('cifar_plain56').residual
    assert models.create_model('resnet50', num_classes=7).num_classes == 7


@pytest.mark.parametrize(
    'name, overrides, message',
    [
        ('resnet51', {}, 'unknown model'),
        ('cifar_resnet21', {}, '6n\\+2'),
        ('cifar_resnet2', {}, '6n\\+2'),
        ('resnet50', {'shortcut': 'D'}, 'allowed: A, B, C'),
        ('resnet50', {'widht': 3}, 'unknown model option'),
        ('resnet50', {'scan_blocks': True}, 'unknown model option'),
    ],
)
def test_bad_names_and_options_raise_value_error(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        models.create_model(name, **overrides)


def test_models_are_linen_modules():
    assert isinstance(models.create_model('resnet18'), nn.Module)


# --- the model API research code relies on (default options, any backend) -----------------

AD_CASES = [
    ('cifar_resnet20', {}, 16),
    pytest.param('resnet50', {'width': 4, 'num_classes': 7}, 32, marks=pytest.mark.slow),
]


@pytest.mark.parametrize('name, overrides, size', AD_CASES)
def test_forward_mode_ad_and_hessian_vector_products(name, overrides, size):
    """jax.jvp and a Hessian-vector product (forward over reverse) through the model as
    created, on whatever backend JAX runs."""
    model = models.create_model(name, **overrides)
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    y, dy = jax.jit(lambda x, t: jax.jvp(lambda x: model.apply(variables, x), (x,), (t,)))(
        x, jnp.ones_like(x)
    )
    assert dy.shape == y.shape and bool(jnp.isfinite(dy).all()) and float(jnp.abs(dy).max()) > 0

    def loss(params):
        return jnp.sum(model.apply({**variables, 'params': params}, x) ** 2)

    params = variables['params']
    tangent = jax.tree_util.tree_map(jnp.ones_like, params)
    hvp = jax.jit(lambda p, t: jax.jvp(jax.grad(loss), (p,), (t,))[1])(params, tangent)
    assert jax.tree_util.tree_structure(hvp) == jax.tree_util.tree_structure(params)
    assert all(bool(jnp.isfinite(h).all()) for h in jax.tree_util.tree_leaves(hvp))


def test_jacfwd_and_hessian_of_a_cifar_net():
    """Under jax.jit, as research code runs them (op by op the same values, 4x the time in
    small compiles)."""
    model = models.create_model('cifar_resnet8')
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    jac = jax.jit(jax.jacfwd(lambda x: model.apply(variables, x)))(x)
    assert jac.shape == (1, 10, 1, 4, 4, 3)
    hess = jax.jit(jax.hessian(lambda x: model.apply(variables, x)[0, 0]))(x)
    assert hess.shape == (1, 4, 4, 3, 1, 4, 4, 3) and bool(jnp.isfinite(hess).all())


@pytest.mark.parametrize(
    'name, overrides, size, blocks',
    [('cifar_resnet20', {}, 16, 9), ('resnet50', {'width': 4, 'num_classes': 7}, 32, 16)],
)
def test_capture_intermediates_sees_every_block(name, overrides, size, blocks):
    model = models.create_model(name, **overrides)
    x = jnp.ones((1, size, size, 3))
    variables = abstract_variables(name, size, **overrides)
    _, state = jax.eval_shape(
        lambda v: model.apply(v, x, capture_intermediates=True, mutable=['intermediates']),
        variables,
    )
    names = [k for k in state['intermediates'] if re.fullmatch(r'conv\d_\d+', k)]
    expected = [n for i, k in enumerate(model.stage_sizes) for n in models.block_names(i, k)]
    assert len(expected) == blocks and sorted(names) == sorted(expected)


def test_tabulate_lists_every_block():
    model = models.create_model('cifar_resnet20')
    table = nn.tabulate(model, jax.random.key(0), compute_flops=False)(jnp.ones((1, 8, 8, 3)))
    for name in models.block_names(2, 3):
        assert name in table
    assert '269,722' in table


def test_the_model_can_be_named_as_a_submodule():
    class Classifier(nn.Module):
        @nn.compact
        def __call__(self, x):
            features = models.create_model('cifar_resnet8', num_classes=0, name='backbone')(x)
            return nn.Dense(3, name='head')(features)

    variables = Classifier().init(jax.random.key(0), jnp.ones((2, 8, 8, 3)))
    assert set(variables['params']) == {'backbone', 'head'}
    assert variables['params']['head']['kernel'].shape == (64, 3)


@pytest.mark.parametrize(
    'name, size, features',
    [('cifar_resnet20', 16, 64), ('resnet50', 32, 2048), ('resnet18', 32, 512)],
)
def test_num_classes_zero_gives_the_pooled_features(name, size, features):
    full = models.create_model(name)
    headless = models.create_model(name, num_classes=0)
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    variables = jax.eval_shape(lambda: full.init(jax.random.key(1), x))
    out = jax.eval_shape(
        lambda v: headless.apply(v, x),
        {**variables, 'params': {k: v for k, v in variables['params'].items() if k != 'fc'}},
    )
    assert out.shape == (2, features) and out.dtype == jnp.float32
    # The features are what the fc layer sees: fc(features) == the full model's logits.
    if name == 'cifar_resnet20':
        concrete = full.init(jax.random.key(1), x)
        pooled = headless.apply(
            {**concrete, 'params': {k: v for k, v in concrete['params'].items() if k != 'fc'}}, x
        )
        fc = concrete['params']['fc']
        np.testing.assert_allclose(
            pooled @ fc['kernel'] + fc['bias'], full.apply(concrete, x), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize(
    'name, shape, message',
    [
        ('resnet50', (1, 16, 16, 3), 'at least 32x32 pixels; got 16x16'),
        ('resnet50', (1, 31, 64, 3), 'at least 32x32 pixels; got 31x64'),
        ('cifar_resnet20', (1, 2, 2, 3), 'at least 4x4 pixels'),
        ('cifar_resnet20', (2, 3, 32, 32), 'NCHW\\? use x.transpose\\(0, 2, 3, 1\\)'),
        ('cifar_resnet20', (32, 32, 3), 'NHWC images'),
    ],
)
def test_inputs_the_net_cannot_take_raise_value_error(name, shape, message):
    model = models.create_model(name)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def test_smallest_inputs_run():
    for name, size in (('resnet18', 32), ('cifar_resnet8', 4)):
        model = models.create_model(name)
        assert model.min_input_size() == size
        x = jnp.zeros((1, size, size, 3))
        logits = jax.eval_shape(lambda m=model, x=x: m.init_with_output(jax.random.key(0), x)[0])
        assert logits.shape == (1, model.num_classes)


@pytest.mark.parametrize('dtype', ['bf16', 'float64', 'int8', 'nonsense'])
def test_unknown_dtype_strings_raise_value_error(dtype):
    with pytest.raises(ValueError, match='unknown dtype .*allowed: float32, bfloat16, float16'):
        models.create_model('cifar_resnet20', dtype=dtype)
