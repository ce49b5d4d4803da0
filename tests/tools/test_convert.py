"""Interop: Keras and torchvision weights in, torchvision out, computing the same function."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnet_jax
from resnet_jax import models
from resnet_jax.training import checkpoints
from resnet_jax.tools import convert
from conftest import REPO

DEPTHS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152')
TORCHVISION_PARAMS = {'resnet18': 11_689_512, 'resnet34': 21_797_672, 'resnet50': 25_557_032,
                      'resnet101': 44_549_160, 'resnet152': 60_192_808}


def random_variables(name, seed=0, **overrides):
    model = models.create_model(name, **overrides)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                  jnp.zeros((1, 224, 224, 3))))
    rng = np.random.default_rng(seed)
    return model, jax.tree_util.tree_map(
        lambda x: rng.normal(0, 0.1, x.shape).astype(np.float32), variables)


# --- Keras (keras ships with TensorFlow here) ----------------------------------------------

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
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.2, beta.shape),
                               rng.normal(0, 0.2, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
    return model


@pytest.fixture(scope='module')
def converted_keras(keras_resnet50):
    return convert.from_keras(keras_resnet50, 'resnet50')


def _close(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_keras_resnet50_gives_the_same_logits_at_224(keras_resnet50, converted_keras):
    model, variables = converted_keras
    assert model.stride_in_1x1 and model.shortcut == 'B' and model.bn_epsilon == 1.001e-5
    x = np.random.default_rng(1).normal(0, 50, (2, 224, 224, 3)).astype(np.float32)
    ref = keras_resnet50(x, training=False).numpy()
    ours = model.apply(variables, x, train=False)
    assert np.abs(ref).max() > 1e-3
    _close(ours, ref)


def test_keras_resnet50_gives_the_same_logits_at_a_larger_non_square_size(keras_resnet50,
                                                                         converted_keras):
    import keras
    features = keras.applications.ResNet50(weights=None, include_top=False, pooling='avg',
                                           input_shape=(None, None, 3))
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
        variables['batch_stats']['conv2_1']['shortcut']['proj_bn']['mean'], bn_mean - conv_bias,
        rtol=1e-6)


def test_keras_cli_writes_a_checkpoint_that_evaluate_and_init_from_accept(
        keras_resnet50, converted_keras, tmp_path):
    path = tmp_path / 'r50.keras'
    keras_resnet50.save(path)
    out = tmp_path / 'converted'
    proc = subprocess.run([sys.executable, '-m', 'resnet_jax', 'convert', '--from=keras',
                           f'--input={path}', '--model=resnet50', f'--output={out}'],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
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
        jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    loaded, _ = checkpoints.load_variables(out)
    merged, kept = checkpoints.merge_pretrained(fresh, loaded)
    assert kept == ["['params']['fc']['bias']", "['params']['fc']['kernel']"]
    np.testing.assert_array_equal(merged['params']['conv1']['kernel'],
                                  loaded['params']['conv1']['kernel'])


# --- torchvision layout ----------------------------------------------------------------------

@pytest.mark.parametrize('name', DEPTHS)
def test_to_torchvision_and_back_is_exact(name):
    _, variables = random_variables(name, stride_in_1x1=False)
    state_dict = {k: np.asarray(v) for k, v in convert.to_torchvision(variables, name).items()}
    assert sum(v.size for k, v in state_dict.items() if 'running' not in k and
               'num_batches' not in k) == TORCHVISION_PARAMS[name]
    model, back = convert.from_torchvision(state_dict, name)
    assert not model.stride_in_1x1 and model.num_classes == 1000
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)


def test_mismatched_state_dicts_name_the_first_mismatch():
    _, variables = random_variables('resnet18', stride_in_1x1=False)
    state_dict = {k: np.asarray(v) for k, v in convert.to_torchvision(variables,
                                                                       'resnet18').items()}
    with pytest.raises(ValueError, match='missing layer1.2.conv1.weight'):
        convert.from_torchvision(state_dict, 'resnet34')
    bad = dict(state_dict, **{'layer2.0.conv1.weight': np.zeros((128, 64, 5, 5), np.float32)})
    with pytest.raises(ValueError, match=r'conv3_1/conv1/kernel has shape \(5, 5, 64, 128\), '
                                         r'the model expects \(3, 3, 64, 128\)'):
        convert.from_torchvision(bad, 'resnet18')
    extra = dict(state_dict, **{'layer5.0.conv1.weight': np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match='layer5.0.conv1.weight does not belong to resnet18'):
        convert.from_torchvision(extra, 'resnet18')
    with pytest.raises(ValueError, match='conversion supports'):
        convert.from_torchvision(state_dict, 'cifar_resnet20')


@pytest.fixture(scope='module')
def torchvision():
    pytest.importorskip('torch')
    return pytest.importorskip('torchvision')


def _randomise_batchnorm(net):
    import torch
    torch.manual_seed(0)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return net


@pytest.mark.interop
@pytest.mark.parametrize('name', DEPTHS)
def test_torchvision_resnets_convert_to_the_same_logits(name, torchvision, tmp_path):
    """torchvision's own resnet18..152 (random weights, randomised BatchNorm statistics),
    saved as a .pth, converted, compute the same logits; ours convert back to its exact
    state-dict names, order and shapes."""
    import torch
    net = _randomise_batchnorm(getattr(torchvision.models, name)(weights=None)).eval()
    state_dict = net.state_dict()
    assert sum(v.numel() for v in net.parameters()) == TORCHVISION_PARAMS[name]
    ours = convert.to_torchvision(random_variables(name, stride_in_1x1=False)[1], name)
    assert list(ours) == list(state_dict)  # same names, same order
    assert all(tuple(ours[k].shape) == tuple(v.shape) for k, v in state_dict.items())
    torch.save(state_dict, tmp_path / 'weights.pth')
    model, variables = convert.from_torchvision(str(tmp_path / 'weights.pth'), name)
    x = np.random.default_rng(0).normal(0, 1, (1, 3, 128, 160)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    logits = jax.jit(model.apply)(variables, x.transpose(0, 2, 3, 1))
    _close(logits, ref)


@pytest.mark.interop
@pytest.mark.parametrize('name, overrides', [
    ('cifar_resnet20', {}), ('cifar_plain20', {}), ('resnet18', dict(shortcut='C', width=8)),
    ('resnet34', dict(shortcut='A', width=8)), ('resnet50', dict(width=8))])
def test_benchmark_torch_nets_are_the_same_networks(name, overrides):
    """The PyTorch side of benchmark_vs_pytorch.py (torch_nets, built from the model's
    fields) computes the same function: same parameter count, same logits."""
    torch = pytest.importorskip('torch')
    sys.path.insert(0, str(REPO / 'experiments'))
    try:
        import torch_nets
    finally:
        sys.path.pop(0)
    model = models.create_model(name, **overrides)
    size = 32 if model.stem == 'cifar' else 64
    x = np.random.default_rng(0).normal(0, 1, (2, size, size, 3)).astype(np.float32)
    variables = jax.tree_util.tree_map(
        lambda v: np.random.default_rng(1).uniform(0.5, 1.5, v.shape).astype(np.float32)
        if v.ndim == 1 else np.asarray(v), model.init(jax.random.key(0), x))
    net = torch_nets.torch_net(model).eval()
    assert sum(p.numel() for p in net.parameters()) == sum(
        v.size for v in jax.tree_util.tree_leaves(variables['params']))
    torch_nets.load_flax_variables(net, variables)
    with torch.no_grad():
        ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    _close(jax.jit(model.apply)(variables, x), ref)
