"""What research code sets on a backbone (issue 41): blocks told train from eval,
stochastic depth, output stride, any input channel count, stage selection, parameter dtype."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import models
from resnet_jax.backends import plans
from resnet_jax.config import base_config
from resnet_jax.models import blocks
from resnet_jax.models.nnx import to_nnx
from resnet_jax.tools import convert
from resnet_jax.training import optim, steps

TINY = {'width': 4, 'num_classes': 3}


def tiny(name='cifar_resnet8', **fields):
    return models.create_model(name, **{**TINY, **fields})


def images(channels=3, size=16, n=4, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, size, size, channels))


class DropoutBlock(models.BasicBlock):
    """A block of the user's own: Fig. 5's with dropout on the branch, recording ``train``."""

    rate: float = 0.5

    @nn.compact
    def __call__(self, x, train=False):
        self.sow('intermediates', 'train', train)
        y = super().__call__(x, train)
        return nn.Dropout(self.rate, deterministic=not train)(y)


def test_every_block_is_told_train_and_a_partial_block_has_features():
    model = tiny(block_cls=functools.partial(DropoutBlock, rate=0.25), stage_sizes=(2, 2, 2))
    x = images()
    variables = model.init(jax.random.key(0), x)
    for train in (False, True):
        _, state = model.apply(
            variables,
            x,
            train=train,
            rngs={'dropout': jax.random.key(1)},
            mutable=['intermediates', 'batch_stats'],
        )
        told = {k: v['train'][0] for k, v in state['intermediates'].items() if 'train' in v}
        assert len(told) == 6 and set(told.values()) == {train}, told
    evaluated = [model.apply(variables, x) for _ in range(2)]
    np.testing.assert_array_equal(*evaluated)  # evaluation draws nothing
    assert model.clone(features_only=True).feature_info()['conv4'] == models.Feature(16, 4)
    assert model.num_features == 16
    with pytest.raises(
        ValueError, match=r'stage=.* must take \(parent, make_block, names, x, train'
    ):
        tiny(stage=lambda parent, make_block, names, x: x)  # the earlier protocol


def test_a_norm_without_scale_init_is_refused_only_where_zero_init_needs_it():
    def group_norm(name, dtype=jnp.float32):  # a norm factory of the user's, no scale_init
        return nn.GroupNorm(num_groups=2, dtype=dtype, name=name)

    model = tiny(norm=group_norm)
    model.init(jax.random.key(0), images())
    with pytest.raises(ValueError, match=r'^ResNet.zero_init_residual=True .*scale_init'):
        tiny(norm=group_norm, zero_init_residual=True)
    zeroed = tiny(norm=functools.partial(nn.GroupNorm, num_groups=2), zero_init_residual=True)
    params = zeroed.init(jax.random.key(0), images())['params']
    assert not np.any(params['conv2_1']['bn2']['scale'])


# --- stochastic depth ---------------------------------------------------------------------


def test_drop_path_drops_whole_examples_at_its_rate_deterministically():
    class Probe(nn.Module):
        @nn.compact
        def __call__(self, y, train):
            return blocks.drop_path(self, y, 0.3, train)

    y = jnp.ones((4000, 2, 2, 3))
    out = Probe().apply({}, y, True, rngs={'dropout': jax.random.key(0)})
    per_example = np.asarray(out).reshape(4000, -1)
    kept = per_example[:, 0] > 0
    assert np.all(per_example == per_example[:, :1])  # a whole branch, per example
    np.testing.assert_allclose(per_example[kept], 1 / 0.7, rtol=1e-6)
    assert abs((~kept).mean() - 0.3) < 0.025  # 4,000 draws: 5 standard deviations
    again = Probe().apply({}, y, True, rngs={'dropout': jax.random.key(0)})
    np.testing.assert_array_equal(out, again)
    np.testing.assert_array_equal(Probe().apply({}, y, False), y)  # evaluation: unchanged


def test_drop_path_rate_rises_over_the_blocks_and_leaves_evaluation_unchanged():
    model = tiny('cifar_resnet20')
    dropping = model.clone(drop_path_rate=0.2)
    rates = dropping._drop_path_rates()
    assert len(rates) == 9 and rates[0] == 0 and rates[-1] == pytest.approx(0.2)
    np.testing.assert_allclose(np.diff(rates), 0.2 / 8)
    x = images()
    variables = model.init(jax.random.key(0), x)
    np.testing.assert_array_equal(model.apply(variables, x), dropping.apply(variables, x))

    def train(model, seed):
        logits, _ = model.apply(
            variables,
            x,
            train=True,
            rngs={'dropout': jax.random.key(seed)},
            mutable=['batch_stats'],
        )
        return np.asarray(logits)

    np.testing.assert_array_equal(train(dropping, 1), train(dropping, 1))
    assert not np.array_equal(train(dropping, 1), train(dropping, 2))
    assert not np.array_equal(train(dropping, 1), train(model, 1))
    with pytest.raises(ValueError, match='drop_path_rate=0.1 .* 0 for a plain net'):
        tiny('cifar_plain8', drop_path_rate=0.1)
    # The plans then run the blocks as written (they differ in training).
    assert plans.cpu_plan().scan_groups(dropping) == []


def test_the_train_step_draws_drop_path_from_its_seed_and_step():
    model = tiny(drop_path_rate=0.5)
    config = base_config()
    tx = optim.create_optimizer(config, optim.create_learning_rate_fn(config))
    state = steps.create_train_state(model, tx, jax.random.key(0), (16, 16, 3))
    batch = {'image': images(n=8), 'label': jnp.arange(8) % 3}

    @jax.jit
    def loss(seed):
        _, metrics = steps.train_step(model, tx, lambda _: 0.1, 0.0, state, batch, seed=seed)
        return metrics.compute()['loss']

    assert loss(0) == loss(0) != loss(1)


def test_the_config_field_reaches_the_model_and_is_refused_for_a_plain_net():
    from resnet_jax import config as config_lib

    config = base_config()
    config.model.drop_path_rate = 0.1
    config_lib.validate(config)
    assert config_lib.model_from_config(config, 10).drop_path_rate == 0.1
    config.model.name = 'cifar_plain20'
    with pytest.raises(config_lib.ConfigError, match='cifar_plain20 is a plain net'):
        config_lib.validate(config)


# --- output stride ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    'name, output_stride, strides',
    [
        ('resnet18', 16, (4, 8, 16, 16)),
        ('resnet50', 8, (4, 8, 8, 8)),
        ('cifar_resnet8', 8, (1, 2, 4)),
    ],
)
def test_output_stride_dilates_the_last_stages(name, output_stride, strides):
    model = tiny(name, features_only=True, output_stride=output_stride)
    info = model.feature_info()
    assert tuple(f.stride for f in info.values()) == strides
    x = images(size=64)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    out = jax.eval_shape(lambda v: model.apply(v, x), variables)
    assert {k: v.shape[1] for k, v in out.items()} == {k: 64 // s for k, (_, s) in info.items()}
    # The same variables as the striding net: weights load into either.
    full = jax.eval_shape(lambda: model.clone(output_stride=32).init(jax.random.key(0), x))
    assert jax.tree.map(lambda a: a.shape, full) == jax.tree.map(lambda a: a.shape, variables)
    with pytest.raises(ValueError, match='output_stride=4 is not allowed'):
        model.clone(output_stride=4)


def test_a_dilated_net_trains_with_drop_path_as_it_evaluates():
    """In training with stochastic depth the blocks run one by one: with a rate too small
    to drop anything, the same function as without it (each block's own dilation)."""
    model = tiny('resnet18', output_stride=8)
    x = images(size=32)
    variables = model.init(jax.random.key(0), x)

    def train(model):
        rngs = {'dropout': jax.random.key(1)}
        return model.apply(variables, x, train=True, rngs=rngs, mutable=['batch_stats'])[0]

    np.testing.assert_allclose(
        train(model.clone(drop_path_rate=1e-7)), train(model), rtol=1e-5, atol=1e-5
    )


# --- input channels ---------------------------------------------------------------------------


def test_any_channel_count_through_the_model_the_converters_and_preprocess():
    model = tiny('resnet18', num_classes=1000, width=64)
    x3 = images(size=32)
    variables = jax.jit(model.init)(jax.random.key(0), x3)
    grey = images(channels=1, size=32)
    with pytest.warns(UserWarning, match='in_chans=1: conv1 adapted from RGB weights: the sum'):
        adapted, adapted_vars = convert.adapt_input_channels(model, variables, 1)
    # a grey image through the summed kernel is its RGB copy through the RGB kernel
    np.testing.assert_allclose(
        jax.jit(adapted.apply)(adapted_vars, grey),
        jax.jit(model.apply)(variables, jnp.repeat(grey, 3, axis=-1)),
        rtol=1e-4,
        atol=1e-4,
    )
    with pytest.warns(UserWarning, match=r'repeated and scaled by 3/5'):
        five, five_vars = convert.adapt_input_channels(model, variables, 5)
    kernel = five_vars['params']['conv1']['kernel']
    assert kernel.shape == (7, 7, 5, 64) and five.in_chans == 5
    rgb = variables['params']['conv1']['kernel']
    np.testing.assert_allclose(kernel[:, :, 3:], rgb[:, :, :2] * 3 / 5, rtol=1e-6)
    # Keras' BGR kernels: two RGB frames (6 channels) through caffe's arithmetic are
    # what one gave the RGB net
    frame = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
    with pytest.warns(UserWarning, match='3/6'):
        six, six_vars = convert.adapt_input_channels(model, variables, 6, bgr=True)
    np.testing.assert_allclose(
        jax.jit(six.apply)(six_vars, models.preprocess(np.concatenate([frame] * 2, -1), 'caffe')),
        jax.jit(model.apply)(variables, models.preprocess(frame, 'caffe')),
        rtol=1e-4,
        atol=1e-3,
    )
    with pytest.raises(ValueError, match=r'in_chans=1\) expects .*got shape \(4, 32, 32, 3\)'):
        adapted.apply(adapted_vars, x3)

    # out: torchvision's names (numpy arrays without torch) and NNX
    state = convert.to_torchvision(adapted_vars, adapted)
    assert tuple(state['conv1.weight'].shape) == (64, 1, 7, 7)
    small = tiny(in_chans=1)
    small_vars = small.init(jax.random.key(0), grey)
    np.testing.assert_allclose(
        to_nnx(small, small_vars)(grey), small.apply(small_vars, grey), rtol=1e-5, atol=1e-5
    )

    # preprocess keeps the channels: the constants averaged for 1, repeated for more
    u8 = np.full((2, 4, 4, 1), 128, np.uint8)
    out = models.preprocess(u8, 'torchvision')
    assert out.shape == u8.shape
    np.testing.assert_allclose(out[0, 0, 0, 0], (128 / 255 - 0.449) / 0.226, rtol=1e-3)
    four = models.preprocess(np.zeros((4, 4, 4), np.uint8), 'caffe')
    np.testing.assert_allclose(four[0, 0], [-123.68, -116.779, -103.939, -123.68], rtol=1e-6)


# --- stages and dtypes ------------------------------------------------------------------------


def test_out_indices_return_those_stages_and_build_no_later_one():
    model = tiny('resnet18', features_only=True, out_indices=(1, -2))
    x = images(size=64)
    variables = model.init(jax.random.key(0), x)
    out = model.apply(variables, x)
    assert list(out) == ['conv3', 'conv4'] == list(model.feature_info())
    assert 'conv5_1' not in variables['params']
    with pytest.raises(ValueError, match='out_indices=\\(0,\\) is not allowed'):
        tiny(out_indices=(0,))  # needs features_only


def test_param_dtype_keeps_parameters_in_bfloat16_and_statistics_in_float32():
    model = tiny(param_dtype='bfloat16', dtype='bfloat16')
    x = images()
    variables = model.init(jax.random.key(0), x)
    assert {a.dtype for a in jax.tree.leaves(variables['params'])} == {jnp.dtype(jnp.bfloat16)}
    assert {a.dtype for a in jax.tree.leaves(variables['batch_stats'])} == {jnp.dtype(jnp.float32)}
    reference = tiny()
    as_float = jax.tree.map(lambda a: a.astype(jnp.float32), variables)
    np.testing.assert_allclose(
        model.apply(variables, x), reference.apply(as_float, x), rtol=0.05, atol=0.05
    )
    # exported as float32 tensors (torch reads no numpy bfloat16)
    resnet18 = models.create_model('resnet18', stride_in_1x1=False, param_dtype='bfloat16')
    shapes = jax.eval_shape(lambda: resnet18.init(jax.random.key(0), images(size=32)))
    state = convert.to_torchvision(
        jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes), resnet18
    )
    assert {str(v.dtype).split('.')[-1] for v in state.values()} == {
        'float32',
        'int64',
    }  # (torch's too)
