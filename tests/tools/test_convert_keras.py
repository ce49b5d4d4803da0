"""Keras's ResNet-50 in (keras ships with TensorFlow here): the same logits, its conv
biases folded into BatchNorm, its .h5 files, and the command line's checkpoint."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tools.test_convert import _assert_trees_equal, _cli, _close

import resnet_jax
from resnet_jax import models
from resnet_jax.tools import convert
from resnet_jax.training import runs


@pytest.fixture(scope='module')
def keras_resnet50():
    import keras

    model = keras.applications.ResNet50(weights=None, classifier_activation=None)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if layer.name.endswith('_conv'):
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.2, bias.shape).astype(np.float32)])
        elif layer.name.endswith('_bn'):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape),
                    rng.normal(0, 0.2, beta.shape),
                    rng.normal(0, 0.2, mean.shape),
                    rng.uniform(0.5, 2.0, var.shape),
                ]
            )
    return model


@pytest.fixture(scope='module')
def converted_keras(keras_resnet50):
    return convert.from_keras(keras_resnet50, 'resnet50')


def test_keras_resnet50_gives_the_same_logits_at_224(keras_resnet50, converted_keras):
    model, variables = converted_keras
    assert model.stride_in_1x1 and model.shortcut == 'B' and model.bn_epsilon == 1.001e-5
    x = np.random.default_rng(1).normal(0, 50, (2, 224, 224, 3)).astype(np.float32)
    ref = keras_resnet50(x, training=False).numpy()
    ours = model.apply(variables, x, train=False)
    assert np.abs(ref).max() > 1e-3
    _close(ours, ref)


def test_keras_resnet50_gives_the_same_logits_at_a_larger_non_square_size(
    keras_resnet50, converted_keras
):
    import keras

    features = keras.applications.ResNet50(
        weights=None, include_top=False, pooling='avg', input_shape=(None, None, 3)
    )
    for layer in features.layers:
        if layer.get_weights():
            layer.set_weights(keras_resnet50.get_layer(layer.name).get_weights())
    kernel, bias = keras_resnet50.get_layer('predictions').get_weights()
    x = np.random.default_rng(2).normal(0, 50, (1, 288, 352, 3)).astype(np.float32)
    ref = features(x, training=False).numpy() @ kernel + bias
    model, variables = converted_keras
    _close(model.apply(variables, x, train=False), ref)


def test_keras_conv_biases_are_folded_into_batchnorm_means(keras_resnet50, converted_keras):
    _, variables = converted_keras
    conv_bias = keras_resnet50.get_layer('conv2_block1_0_conv').get_weights()[1]
    bn_mean = keras_resnet50.get_layer('conv2_block1_0_bn').get_weights()[2]
    np.testing.assert_allclose(
        variables['batch_stats']['conv2_1']['shortcut']['proj_bn']['mean'],
        bn_mean - conv_bias,
        rtol=1e-6,
    )


@pytest.mark.slow  # launches the command line: once, on the main CI stack
def test_keras_cli_writes_a_checkpoint_that_evaluate_and_init_from_accept(
    keras_resnet50, converted_keras, tmp_path
):
    path = tmp_path / 'r50.keras'
    keras_resnet50.save(path)
    out = tmp_path / 'converted'
    proc = _cli('--from=keras', f'--input={path}', '--model=resnet50', f'--output={out}')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / 'converted.json').read_text())['preprocessing'] == 'caffe'
    model, variables, config, step = resnet_jax.load(out)
    assert config.dataset.preprocessing == 'caffe' and step == 0
    assert model.stride_in_1x1 and model.bn_epsilon == 1.001e-5
    x = np.random.default_rng(3).normal(0, 50, (1, 224, 224, 3)).astype(np.float32)
    _, reference = converted_keras
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(reference, x))
    # Fine-tuning starts from it: every layer but the fc of another class count.
    fresh = models.create_model('resnet50', num_classes=10, bn_epsilon=1.001e-5).init(
        jax.random.key(0), jnp.zeros((1, 64, 64, 3))
    )
    loaded, _ = runs.load_variables(out)
    merged, _, kept, _ = resnet_jax.transfer(fresh, loaded)
    assert kept == ['params/fc/bias', 'params/fc/kernel']
    np.testing.assert_array_equal(
        merged['params']['conv1']['kernel'], loaded['params']['conv1']['kernel']
    )


def test_a_keras_h5_file_converts_by_its_suffix(keras_resnet50, converted_keras, tmp_path):
    path = tmp_path / 'r50.h5'
    keras_resnet50.save(path)
    model, variables, kind = convert.load_weights(path)  # the net told by the layers
    assert kind == 'keras' and convert.PREPROCESSING[kind] == 'caffe'
    assert model == converted_keras[0]
    _assert_trees_equal(variables, converted_keras[1])
