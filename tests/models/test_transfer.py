"""``transfer`` where it would mislead: networks that share no variable are refused naming
both, the ResNet's own layers left fresh are a warning, and a weights file is read as the
converters read it."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import resnet_jax
from resnet_jax import models
from resnet_jax.tools import convert


def init(model, size=32):
    return jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))()


def zeros(model):
    """``model``'s variables as zeros: where only names and shapes matter (no compile)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def test_networks_that_share_no_variable_are_refused_naming_both():
    cifar = init(models.create_model('cifar_resnet8'))
    resnet50 = models.create_model('resnet50')
    resnet50_vars = jax.eval_shape(
        lambda: resnet50.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    )
    resnet50_vars = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), resnet50_vars)
    with pytest.raises(
        ValueError,
        match=r'^no variable of the pretrained resnet50 fits the ResNet of basic blocks '
        r'\(1, 1, 1\): nothing to transfer$',
    ):
        resnet_jax.transfer(cifar, resnet50_vars)


def test_the_resnets_own_layers_left_fresh_are_a_warning():
    """A ResNet-18's weights into a ResNet-34 leave its extra blocks fresh: a warning naming
    them; a new head alone is none."""
    r18 = zeros(models.create_model('resnet18'))
    r34 = zeros(models.create_model('resnet34'))
    with pytest.warns(
        UserWarning,
        match=r'variables of the ResNet left freshly initialised .*resnet18.*params/conv2_3/',
    ):
        moved = resnet_jax.transfer(r34, r18)
    assert moved.kept and 'params/conv2_3/conv1/kernel' in moved.fresh
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a new head only: no warning
        resnet_jax.transfer(zeros(models.create_model('resnet18', num_classes=10)), r18)


def test_a_weights_file_is_read_as_the_converters_read_it(tmp_path):
    model = models.create_model('resnet18', stride_in_1x1=False)
    variables = jax.tree_util.tree_map(np.asarray, init(model))
    save_file(
        {k: np.asarray(v) for k, v in convert.to_torchvision(variables, model).items()},
        tmp_path / 'r18.safetensors',
    )
    fresh = init(models.create_model('resnet18', num_classes=10, stride_in_1x1=False))
    moved = resnet_jax.transfer(fresh, str(tmp_path / 'r18.safetensors'))
    assert moved.fresh == ['params/fc/bias', 'params/fc/kernel']
    np.testing.assert_array_equal(
        moved.variables['params']['conv1']['kernel'], variables['params']['conv1']['kernel']
    )
