"""A stage's identical blocks as one ``lax.scan`` (``models.scanned_stage``, the model's own
for deep stages): the unrolled net's variables, values, gradients and statistics; unrolled
wherever each block must be its own (other random streams, ``capture_intermediates``)."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxprs import all_eqns

from resnet_jax import models
from resnet_jax.models import layers

SCAN = functools.partial(models.scanned_stage, min_blocks=2)  # CIFAR-20's stages scanned


def primitives(fn, *args) -> list[str]:
    return [e.primitive.name for e in all_eqns(jax.make_jaxpr(fn)(*args).jaxpr)]


def close(a, b, tol=1e-5):
    """Each leaf of ``a`` within ``tol`` of ``b``'s relative to its norm: a scan's float
    rounding differs from the unrolled program's."""
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert float(jnp.linalg.norm(x - y)) <= tol * max(float(jnp.linalg.norm(x)), 1e-6)


class PlainPairBlock(nn.Module):
    """A block of one's own (two 3x3 convs, no shortcut): the fields ResNet hands every
    block, and dropout where ``rate`` is set."""

    expansion = 1
    filters: int
    strides: int
    conv: object
    norm: object
    residual: bool = True
    shortcut: str = 'A'
    zero_init_residual: bool = False
    dtype: object = jnp.float32
    rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = nn.relu(self.norm(name='bn1')(self.conv(self.filters, 3, self.strides, name='a')(x)))
        if self.rate:
            y = nn.Dropout(self.rate, deterministic=not train)(y)
        return nn.relu(self.norm(name='bn2')(self.conv(self.filters, 3, name='b')(y)))


@pytest.mark.parametrize('block_cls', [models.BasicBlock, PlainPairBlock])
def test_a_scanned_stage_computes_the_unrolled_stage(block_cls):
    unrolled, scanned = (
        models.create_model('cifar_resnet20', width=4, block_cls=block_cls, stage=s)
        for s in (models.unrolled_stage, SCAN)
    )
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    variables = unrolled.init(jax.random.key(1), x)
    # Initialised unrolled (a stage this short): the unrolled net's draws.
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, scanned.init(jax.random.key(1), x), variables
    )
    # (bit for bit on an AMD EPYC host; an Intel Xeon's kernels round the scan's apart)
    close(unrolled.apply(variables, x), scanned.apply(variables, x))

    def loss(model, params):
        logits, state = model.apply(
            {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
        )
        return jnp.sum(logits * jnp.arange(10)), state['batch_stats']

    (l1, stats1), g1 = jax.jit(jax.value_and_grad(functools.partial(loss, unrolled), has_aux=True))(
        variables['params']
    )
    (l2, stats2), g2 = jax.jit(jax.value_and_grad(functools.partial(loss, scanned), has_aux=True))(
        variables['params']
    )
    close(l1, l2)
    assert jax.tree_util.tree_structure(stats1) == jax.tree_util.tree_structure(stats2)
    close(stats1, stats2)
    close(g1, g2)
    scans = primitives(
        lambda v: scanned.apply(v, x, train=True, mutable=['batch_stats']), variables
    )
    assert scans.count('scan') == 3


def test_resnet1202_runs_each_stage_as_one_block_program():
    """The default model: ResNet-1202's stages scanned, its variables each block's, in a
    program that does not grow with depth; ResNet-110's stages stay unrolled."""
    model = models.create_model('cifar_resnet1202')
    x = jnp.zeros((2, 32, 32, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert {'conv2_200', 'conv3_200', 'conv4_200'} <= set(variables['params'])
    assert [len(g) for g in models.scan_groups(model)] == [199, 199, 199]
    # A deep stage initialises scanned, each block its own draws (one such stage, tiny).
    deep = models.create_model('cifar_resnet20', stage_sizes=(1, 65, 1), width=1)
    mine = deep.init(jax.random.key(0), x[:, :8, :8])
    kernels = [mine['params'][f'conv3_{b}']['conv1']['kernel'] for b in (2, 3, 65)]
    assert len({float(k.sum()) for k in kernels}) == 3 and all(np.std(k) > 0 for k in kernels)

    def step(v):
        return model.apply(v, x, train=True, mutable=['batch_stats'])[0].sum()

    # (each convolution's derivative in both of its forms, CPU's and other backends')
    program = primitives(jax.grad(step), variables)
    assert program.count('conv_general_dilated') < 100 and program.count('scan') == 6
    assert 'scan' not in primitives(
        lambda: models.create_model('cifar_resnet110').init(jax.random.key(0), x)
    )
    assert models.scan_groups(models.create_model('resnet152')) == []


def test_capture_intermediates_sees_every_block():
    model = models.create_model('cifar_resnet20', width=4, stage=SCAN)
    x = jnp.ones((2, 16, 16, 3))
    variables = model.init(jax.random.key(0), x)
    with pytest.warns(UserWarning, match="writes to \\['intermediates'\\]; running its blocks"):
        _, state = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
    assert {f'conv{s}_{b}' for s in (2, 3, 4) for b in (1, 2, 3)} <= set(state['intermediates'])


def test_a_block_drawing_dropout_runs_unrolled_with_a_warning():
    make = functools.partial(
        models.create_model,
        'cifar_resnet20',
        width=4,
        shortcut='A',
        block_cls=functools.partial(PlainPairBlock, rate=0.5),
    )
    model = make(stage=SCAN)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    keys = {'params': jax.random.key(1), 'dropout': jax.random.key(2)}
    variables = model.init(keys, x)  # (a stage this short initialises unrolled anyway)
    expected, _ = make(stage=models.unrolled_stage).apply(
        variables, x, train=True, rngs={'dropout': keys['dropout']}, mutable=['batch_stats']
    )
    with pytest.warns(UserWarning, match="random streams \\['dropout'\\]; running its blocks"):
        got, _ = model.apply(
            variables, x, train=True, rngs={'dropout': keys['dropout']}, mutable=['batch_stats']
        )
    np.testing.assert_array_equal(expected, got)


def test_a_stage_of_ones_own_is_honoured():
    calls = []

    def stage(parent, make_block, names, x, train):
        calls.append(list(names))
        return models.unrolled_stage(parent, make_block, names, x, train)

    model = models.create_model('cifar_resnet20', width=2, stage=stage)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    assert [len(c) for c in calls] == [2, 2, 2] and models.scan_groups(model) == []
    assert 'conv4_3' in variables['params'] and model.conv is layers.conv


@pytest.mark.parametrize(
    ('kernel', 'stride', 'dilation'), [(3, 1, 1), (3, 2, 1), (1, 2, 1), (7, 2, 1), (3, 1, 2)]
)
def test_the_models_convolution_differentiates_as_laxs(kernel, stride, dilation):
    """Its own derivatives (laid out for XLA:CPU's loops), forward and reverse, are lax's:
    odd sizes, so that a stride leaves rows unread."""
    pad = dilation * (kernel - 1) // 2
    geometry = ((stride, stride), ((pad, pad), (pad, pad)))
    options = {'rhs_dilation': (dilation, dilation), 'dimension_numbers': ('NHWC', 'HWIO', 'NHWC')}

    def with_geometry(conv):
        return lambda x, w: conv(x, w, *geometry, **options)

    ours = with_geometry(layers.conv_general_dilated)
    lax_own = with_geometry(jax.lax.conv_general_dilated)
    keys = jax.random.split(jax.random.key(0), 5)
    x, dx = (jax.random.normal(k, (2, 9, 9, 3)) for k in keys[:2])
    w, dw = (jax.random.normal(k, (kernel, kernel, 3, 5)) for k in keys[2:4])
    y, back = jax.vjp(ours, x, w)
    y_lax, back_lax = jax.vjp(lax_own, x, w)
    np.testing.assert_array_equal(y, y_lax)
    cotangent = jax.random.normal(keys[4], y.shape)
    for got, expected in zip(
        (*jax.jit(back)(cotangent), jax.jvp(ours, (x, w), (dx, dw))[1]),
        (*back_lax(cotangent), jax.jvp(lax_own, (x, w), (dx, dw))[1]),
        strict=True,
    ):
        close(got, expected)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the CPU form is the one laid out')
def test_a_loops_backward_convolutions_are_nhwc_on_cpu():
    """What makes a scanned stage's training step fast on CPU: the compiled backward pass
    inside the loop has only NHWC x HWIO convolutions (lax's own give XLA:CPU kernels laid
    out 'b01f_01oi' and 'f01b_i01o', which it runs ~10x slower in a loop)."""

    def loss(kernels, x):
        def block(x, w):
            y = layers.conv_general_dilated(
                x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
            )
            return jnp.tanh(y), None

        return jax.lax.scan(block, x, kernels)[0].sum()

    compiled = jax.jit(jax.grad(loss)).lower(jnp.ones((3, 3, 3, 4, 4)), jnp.ones((2, 8, 8, 4)))
    labels = set(re.findall(r'dim_labels=([\w>-]+)', compiled.compile().as_text()))
    assert labels == {'b01f_01io->b01f'}


def test_other_backends_get_laxs_convolutions():
    """Exported for GPU and TPU, a scanned net's training gradient has lax's convolutions,
    the same number with the same dimension numbers (the CPU form is not lowered there;
    no forward convolution recomputed by the scan's remat policy)."""

    def convolutions(conv, platform):
        model = models.create_model('cifar_resnet20', width=4, stage=SCAN, conv=conv)
        x = jnp.ones((2, 16, 16, 3))
        variables = jax.eval_shape(model.init, jax.random.key(0), x)

        def loss(params, batch_stats):
            logits, _ = model.apply(
                {'params': params, 'batch_stats': batch_stats},
                x,
                train=True,
                mutable=['batch_stats'],
            )
            return logits.sum()

        exported = jax.export.export(jax.jit(jax.grad(loss)), platforms=[platform])
        text = exported(variables['params'], variables['batch_stats']).mlir_module()
        return sorted(re.findall(r'convolution\(.*dim_numbers = (\[.*?\]x\[.*?\]->\[.*?\])', text))

    lax_own = functools.partial(layers.conv, conv_general_dilated=jax.lax.conv_general_dilated)
    for platform in ('cuda', 'tpu'):
        assert convolutions(layers.conv, platform) == convolutions(lax_own, platform)
    assert len(convolutions(layers.conv, 'cpu')) == len(convolutions(lax_own, 'cpu'))
