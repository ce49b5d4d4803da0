"""Interop: torchvision, timm and transformers weights in, torchvision out, each computing
the same function; and every network torchvision does not compute refused (Keras:
test_convert_keras.py)."""

import functools
import json
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import forked
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from resnet_jax import models
from resnet_jax.config import base_config
from resnet_jax.models import layers
from resnet_jax.tools import convert
from resnet_jax.training import runs

DEPTHS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152')
TORCHVISION_PARAMS = {
    'resnet18': 11_689_512,
    'resnet34': 21_797_672,
    'resnet50': 25_557_032,
    'resnet101': 44_549_160,
    'resnet152': 60_192_808,
}
HAS_FIELD = set(models.ResNet.__dataclass_fields__)


def random_variables(name, seed=0, **overrides):
    """``(model, variables)`` with every value random (exact round trips; not for logits:
    the variances may be negative)."""
    model = models.create_model(name, **overrides)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    rng = np.random.default_rng(seed)
    return model, jax.tree_util.tree_map(
        lambda x: rng.normal(0, 0.1, x.shape).astype(np.float32), variables
    )


def computable_variables(model, seed=0):
    """Random variables of ``model`` that compute finite, informative outputs: He-scaled
    kernels, BatchNorm scales, shifts, means and variances all random (the variances
    positive), so a BatchNorm converted wrong changes the result."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))

    def value(path, leaf):
        name = path[-1].key
        if name == 'kernel':
            fan = (
                np.prod(leaf.shape[:-1])
                if len(leaf.shape) == 2
                else np.prod(leaf.shape[:2]) * leaf.shape[-1]
            )
            x = rng.normal(0, np.sqrt((1 if len(leaf.shape) == 2 else 2) / fan), leaf.shape)
        elif name in ('scale', 'var'):
            x = rng.uniform(0.5, 1.5, leaf.shape)
        else:  # BatchNorm and fc biases, means
            x = rng.normal(0, 0.1, leaf.shape)
        return x.astype(np.float32)

    return jax.tree_util.tree_map_with_path(value, shapes)


def _same_function(ours, ref, rtol=1e-5):
    """float32 outputs of two frameworks: equal to ``rtol`` relative to their largest."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    scale = np.abs(ref).max()
    assert scale > 1e-3 and np.isfinite(scale)
    assert np.abs(ours - ref).max() <= rtol * scale, np.abs(ours - ref).max() / scale


def _numpy(state_dict):
    return {k: np.asarray(v) for k, v in state_dict.items()}


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _close(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _images(seed=0, size=64, batch=2):
    """NCHW for torch, and the same images NHWC for the flax model."""
    x = np.random.default_rng(seed).normal(0, 1, (batch, 3, size, size)).astype(np.float32)
    return x, x.transpose(0, 2, 3, 1)


# --- to_torchvision: only what torchvision's resnets compute ---------------------------------


class MyBlock(models.BasicBlock):
    """A block of the user's own (the same variables as BasicBlock's)."""


def _model_of(name, overrides):
    if 'stage_sizes' in overrides or 'block_cls' in overrides:
        return models.ResNet(
            **{
                'stage_sizes': models.TABLE1[name][1],
                'block_cls': models.TABLE1[name][0],
                **overrides,
            }
        )
    return models.create_model(name, **overrides)


REFUSED = [  # (name, overrides, the field and value the message names)
    (
        'resnet50',
        {},
        (
            "stride_in_1x1=True: torchvision's resnets stride in the 3x3 (v1.5); "
            'train with --config.model.stride_in_1x1=False'
        ),
    ),  # the paper's v1
    ('resnet34', {'shortcut': 'C'}, "shortcut='C'"),
    ('resnet34', {'shortcut': 'A'}, "shortcut='A'"),
    ('cifar_resnet20', {}, "stem='cifar'"),  # option A, width 16, 3 stages
    ('plain34', {}, 'residual=False'),
    ('resnet18', {'width': 32}, 'width=32'),
    ('resnet50', {'stride_in_1x1': False, 'bn_epsilon': 1.001e-5}, 'bn_epsilon=1.001e-05'),
    ('resnet18', {'stage_sizes': (2, 2, 2)}, 'stage_sizes=(2, 2, 2)'),
    ('resnet18', {'block_cls': MyBlock}, 'block_cls=MyBlock'),
    ('resnet18', {'norm': functools.partial(nn.GroupNorm, num_groups=8)}, 'norm='),
    (
        'resnet18',
        {'conv': functools.partial(layers.conv, conv_general_dilated=jax.lax.conv_general_dilated)},
        'conv=',
    ),
    pytest.param(
        'resnet18',
        {'features_only': True},
        'features_only=True',
        marks=pytest.mark.skipif(
            'features_only' not in HAS_FIELD, reason='ResNet has no features_only field yet'
        ),
    ),
]


@pytest.mark.parametrize('name, overrides, message', REFUSED)
def test_to_torchvision_refuses_every_network_torchvision_does_not_compute(
    name, overrides, message
):
    """A ValueError naming the field, its value and what to do; never a KeyError, never a
    state dict of another network."""
    model = _model_of(name, overrides)
    variables = computable_variables(
        _model_of(
            name,
            {  # what the user's variables would be
                k: v for k, v in overrides.items() if k not in ('norm', 'features_only')
            },
        )
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        convert.to_torchvision(variables, model)
    with pytest.raises(ValueError, match=re.escape(message)):
        convert.check_torchvision(model)


@pytest.mark.parametrize(
    'overrides',
    [
        {},  # stride_in_1x1=True: a basic block has no 1x1, the same function
        {'dtype': 'bfloat16', 'zero_init_residual': True, 'bn_group_size': 0},
        pytest.param(
            {'frozen_bn': True},
            marks=pytest.mark.skipif(
                'frozen_bn' not in HAS_FIELD, reason='ResNet has no frozen_bn field yet'
            ),
        ),
    ],
)
def test_to_torchvision_accepts_fields_that_do_not_change_the_inference_function(overrides):
    model, variables = random_variables('resnet18', **overrides)
    assert list(convert.to_torchvision(variables, model))[:2] == ['conv1.weight', 'bn1.weight']


def test_to_torchvision_needs_the_model_or_its_workdir_not_a_name(tmp_path):
    model, variables = random_variables('resnet50', stride_in_1x1=False)
    with pytest.raises(
        ValueError,
        match=r"model='resnet50' is not a workdir.*cannot tell v1.*"
        r'from v1\.5',
    ):
        convert.to_torchvision(variables, 'resnet50')
    config = base_config()
    config.model.name = 'resnet50'  # stride_in_1x1=True: the default, the paper's v1
    (tmp_path / 'v1').mkdir()
    (tmp_path / 'v1' / 'config.json').write_text(config.to_json_best_effort())
    with pytest.raises(ValueError, match='stride_in_1x1=True'):
        convert.to_torchvision(variables, tmp_path / 'v1')
    config.model.stride_in_1x1 = False
    (tmp_path / 'v1.5').mkdir()
    (tmp_path / 'v1.5' / 'config.json').write_text(config.to_json_best_effort())
    ours = _numpy(convert.to_torchvision(variables, str(tmp_path / 'v1.5')))
    _assert_trees_equal(ours, _numpy(convert.to_torchvision(variables, model)))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='has no config.json'):
        convert.to_torchvision(variables, tmp_path / 'empty')


def test_to_torchvision_finds_the_resnet_in_a_larger_module_or_says_which():
    model = models.create_model('resnet18', num_classes=0)
    backbone = computable_variables(model)
    head = {'kernel': np.zeros((512, 3), np.float32)}
    nested = {
        'params': {'backbone': backbone['params'], 'head': head},
        'batch_stats': {'backbone': backbone['batch_stats']},
    }
    found = _numpy(convert.to_torchvision(nested, model))
    assert not any(k.startswith('fc.') for k in found)  # headless: no fc keys
    _assert_trees_equal(found, _numpy(convert.to_torchvision(backbone, model)))
    _assert_trees_equal(found, _numpy(convert.to_torchvision(nested, model, at=('backbone',))))
    _assert_trees_equal(found, _numpy(convert.to_torchvision(nested, model, at='backbone')))
    two = {
        'params': {'student': backbone['params'], 'teacher': backbone['params']},
        'batch_stats': {'student': backbone['batch_stats'], 'teacher': backbone['batch_stats']},
    }
    with pytest.raises(
        ValueError,
        match=r"several ResNets.*\('student',\), \('teacher',\); "
        r"choose one, e.g. at=\('student',\)",
    ):
        convert.to_torchvision(two, model)
    _assert_trees_equal(found, _numpy(convert.to_torchvision(two, model, at='teacher')))
    with pytest.raises(ValueError, match="no ResNet in the variables.*'head'"):
        convert.to_torchvision({'params': {'head': head}, 'batch_stats': {}}, model)
    with pytest.raises(ValueError, match=r"at=\('neck',\): variables params have no neck"):
        convert.to_torchvision(nested, model, at='neck')
    with pytest.raises(ValueError, match=r"at=\('head',\): params/head is not a ResNet"):
        convert.to_torchvision(
            {'params': {'head': head}, 'batch_stats': {'head': {}}}, model, at='head'
        )
    with pytest.raises(ValueError, match=r"variables must be \{'params'.*batch_stats"):
        convert.to_torchvision(backbone['params'], model)
    # The variables of another network than the model's: named, not a KeyError.
    with pytest.raises(ValueError, match='no value for the model variable batch_stats/conv2_3'):
        convert.to_torchvision(backbone, models.create_model('resnet34', num_classes=0))
    with pytest.raises(ValueError, match='no value for the model variable params/fc/bias'):
        convert.to_torchvision(backbone, models.create_model('resnet18', stride_in_1x1=False))


# --- torchvision's layout: names, shapes, files ----------------------------------------------


@pytest.mark.parametrize('name', DEPTHS)
def test_to_torchvision_and_back_is_exact(name):
    model, variables = random_variables(name, stride_in_1x1=False)
    state_dict = _numpy(convert.to_torchvision(variables, model))
    assert (
        sum(v.size for k, v in state_dict.items() if 'running' not in k and 'num_batches' not in k)
        == TORCHVISION_PARAMS[name]
    )
    back_model, back = convert.from_torchvision(state_dict)  # the net inferred from the keys
    assert back_model == model
    _assert_trees_equal(back, variables)


@pytest.fixture(scope='module')
def resnet18_state():
    """A resnet18's random variables and their torchvision state dict (numpy)."""
    model, variables = random_variables('resnet18', stride_in_1x1=False)
    return model, variables, _numpy(convert.to_torchvision(variables, model))


def test_mismatched_state_dicts_name_the_first_mismatch(resnet18_state):
    _, _, state_dict = resnet18_state
    with pytest.raises(
        ValueError,
        match=r'holds a resnet18 \(basic blocks \(2, 2, 2, 2\)\), '
        'not a resnet34',
    ):
        convert.from_torchvision(state_dict, 'resnet34')
    partial = {k: v for k, v in state_dict.items() if k != 'layer4.1.conv1.weight'}
    with pytest.raises(ValueError, match=r'missing layer4.1.conv1.weight \(needed by resnet18'):
        convert.from_torchvision(partial)
    bad = dict(state_dict, **{'layer2.0.conv1.weight': np.zeros((128, 64, 5, 5), np.float32)})
    with pytest.raises(
        ValueError,
        match=r'conv3_1/conv1/kernel has shape \(5, 5, 64, 128\), '
        r'the model expects \(3, 3, 64, 128\)',
    ):
        convert.from_torchvision(bad, 'resnet18')
    extra = dict(state_dict, **{'layer5.0.conv1.weight': np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match='layer5.0.conv1.weight does not belong to resnet18'):
        convert.from_torchvision(extra, 'resnet18')
    with pytest.raises(
        ValueError,
        match=r'not a torchvision/timm ResNet of Table 1 \(it holds '
        r'basic blocks \(2, 2, 2, 2, 1\)',
    ):
        convert.from_torchvision(extra)
    with pytest.raises(ValueError, match='conversion supports'):
        convert.from_torchvision(state_dict, 'cifar_resnet20')
    with pytest.raises(ValueError, match='transformers names.*from_transformers'):
        convert.from_torchvision({'embedder.embedder.convolution.weight': np.zeros(1)})
    with pytest.raises(ValueError, match='int64, not floating-point'):
        convert.from_torchvision(dict(state_dict, **{'conv1.weight': np.zeros(3, np.int64)}))


def test_a_headless_state_dict_is_a_headless_model(resnet18_state):
    state_dict = resnet18_state[2]
    headless = {k: v for k, v in state_dict.items() if not k.startswith('fc.')}
    back_model, back = convert.from_torchvision(headless)
    assert back_model.num_classes == 0 and 'fc' not in back['params']
    _assert_trees_equal(_numpy(convert.to_torchvision(back, back_model)), headless)


@pytest.mark.parametrize(
    'prefix', ['module.', 'model.', '_orig_mod.', 'module._orig_mod.', '_orig_mod.module.']
)
def test_wrapper_prefixes_are_stripped_with_a_warning(resnet18_state, prefix):
    """DDP's ``module.``, torch.compile's ``_orig_mod.``, a wrapper's ``model.``."""
    model, variables, state_dict = resnet18_state
    with pytest.warns(UserWarning, match=re.escape(repr(prefix))):
        back_model, back = convert.from_torchvision({prefix + k: v for k, v in state_dict.items()})
    assert back_model == model
    _assert_trees_equal(back, variables)


def test_to_torchvision_writes_a_safetensors_file_that_converts_back(resnet18_state, tmp_path):
    from safetensors.numpy import load_file

    model, variables, state_dict = resnet18_state
    path = tmp_path / 'r18.safetensors'
    _assert_trees_equal(_numpy(convert.to_torchvision(variables, model, path)), state_dict)
    _assert_trees_equal(load_file(path), state_dict)
    back_model, back = convert.from_torchvision(path)
    assert back_model == model
    _assert_trees_equal(back, variables)
    with pytest.raises(ValueError, match='write a .safetensors, .pth or .pt file'):
        convert.to_torchvision(variables, model, tmp_path / 'r18.npz')
    with pytest.raises(ValueError, match='stride_in_1x1=True'):  # refused: nothing written
        convert.to_torchvision(*random_variables('resnet50')[::-1], tmp_path / 'v1.safetensors')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['r18.safetensors']


def test_a_bfloat16_safetensors_file_converts_without_importing_torch(resnet18_state, tmp_path):
    import ml_dtypes
    from safetensors.numpy import save_file

    _, variables, state_dict = resnet18_state
    save_file(
        {
            k: v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v
            for k, v in state_dict.items()
        },
        tmp_path / 'bf16.safetensors',
    )
    code = textwrap.dedent("""
        import sys
        import jax
        import numpy as np
        from resnet_jax.tools import convert
        model, variables = convert.from_torchvision(sys.argv[1])
        assert 'torch' not in sys.modules, 'torch was imported'
        np.savez(sys.argv[2], **{jax.tree_util.keystr(p): v for p, v in
                                 jax.tree_util.tree_flatten_with_path(variables)[0]})
    """)
    proc = subprocess.run(
        [sys.executable, '-c', code, str(tmp_path / 'bf16.safetensors'), str(tmp_path / 'out.npz')],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    converted = dict(np.load(tmp_path / 'out.npz'))
    expected = {
        jax.tree_util.keystr(p): np.asarray(v).astype(ml_dtypes.bfloat16).astype(np.float32)
        for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]
    }
    assert all(v.dtype == np.float32 for v in converted.values())
    _assert_trees_equal(converted, expected)


# --- transformers: refused without the config that says which network -----------------------


def _transformers_config(**fields):
    return {
        'model_type': 'resnet',
        'layer_type': 'basic',
        'depths': [2, 2, 2, 2],
        'hidden_sizes': [64, 128, 256, 512],
        'embedding_size': 64,
        **fields,
    }


@pytest.mark.parametrize(
    'fields, message',
    [
        ({'downsample_in_first_stage': True}, 'downsample_in_first_stage=True'),
        ({'hidden_sizes': [32, 64, 128, 256]}, r'hidden_sizes=\[32, 64, 128, 256\]'),
        ({'hidden_act': 'gelu'}, "hidden_act='gelu'"),
        ({'depths': [2, 2, 2]}, r'depths=\[2, 2, 2\] with basic layers is no network of Table 1'),
        ({'layer_type': 'preact'}, "layer_type='preact'"),
        ({'embedding_size': 32}, 'embedding_size=32'),
        ({'model_type': 'regnet'}, "model_type='regnet'"),
    ],
)
def test_from_transformers_refuses_configs_that_are_not_the_papers_nets(fields, message):
    with pytest.raises(ValueError, match=message):
        convert.from_transformers({}, config=_transformers_config(**fields))


def test_a_transformers_state_dict_without_its_config_is_refused(tmp_path):
    from safetensors.numpy import save_file

    state = {'resnet.embedder.embedder.convolution.weight': np.zeros((64, 3, 7, 7), np.float32)}
    with pytest.raises(ValueError, match=r'pass config=.*downsample_in_bottleneck'):
        convert.from_transformers(state)
    with pytest.raises(ValueError, match='pass config='):
        convert.load_weights(state)  # told by its names: transformers'
    save_file(state, tmp_path / 'model.safetensors')
    with pytest.raises(ValueError, match='no config.json beside the weights'):
        convert.load_weights(tmp_path / 'model.safetensors')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no model.safetensors or pytorch_model.bin'):
        convert.from_transformers(tmp_path / 'empty')


# --- against the frameworks' own networks ----------------------------------------------------


@pytest.fixture(scope='module')
def torchvision():
    import torchvision

    return torchvision


def _randomise_batchnorm(net):
    """Every BatchNorm2d's running statistics and affine parameters random (fresh nets have
    mean 0, var 1, weight 1, bias 0, which would hide a BatchNorm converted wrong)."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return net.eval()


def _torch_outputs(net, x):
    import torch

    with torch.no_grad():
        out = net(torch.from_numpy(x))
    for field in ('logits', 'pooler_output'):  # transformers' outputs
        if hasattr(out, field):
            out = getattr(out, field)
            break
    return out.reshape(len(x), -1).numpy()


@pytest.mark.interop
@pytest.mark.parametrize('name', DEPTHS)
def test_torchvision_resnets_and_ours_compute_the_same_function_both_ways(
    name, torchvision, tmp_path
):
    """In: torchvision's own resnetN (random weights, random BatchNorm statistics), saved as
    a .pth, converted (the net inferred), gives its logits. Out: our random variables,
    written by to_torchvision, load strictly into a fresh resnetN (its exact names, order
    and shapes), which then gives our logits."""
    net = _randomise_batchnorm(getattr(torchvision.models, name)(weights=None))
    state_dict = net.state_dict()
    assert sum(v.numel() for v in net.parameters()) == TORCHVISION_PARAMS[name]
    import torch

    torch.save(state_dict, tmp_path / 'weights.pth')
    model, variables = convert.from_torchvision(str(tmp_path / 'weights.pth'))
    assert model == models.create_model(name, stride_in_1x1=False)
    x, x_nhwc = _images()
    apply = jax.jit(model.apply)
    _same_function(apply(variables, x_nhwc), _torch_outputs(net, x))

    ours = computable_variables(model, seed=1)
    out = convert.to_torchvision(ours, model)
    assert list(out) == list(state_dict)  # same names, same order
    assert all(tuple(out[k].shape) == tuple(v.shape) for k, v in state_dict.items())
    fresh = getattr(torchvision.models, name)(weights=None).eval()
    fresh.load_state_dict(out, strict=True)
    _same_function(apply(ours, x_nhwc), _torch_outputs(fresh, x))


@pytest.mark.interop
@pytest.mark.parametrize(
    'name, dilate, output_stride',
    [('resnet50', [False, True, True], 8), ('resnet50', [False, False, True], 16)],
)
def test_output_stride_is_torchvisions_replace_stride_with_dilation(
    name, dilate, output_stride, torchvision
):
    """torchvision's dilated resnet50 (DeepLab's backbone), converted, gives its logits on
    ``create_model(..., output_stride=...)``; its stages' strides are what we report."""
    net = _randomise_batchnorm(
        getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=dilate)
    )
    model, variables, _ = convert.load_weights(net.state_dict())
    dilated = model.clone(output_stride=output_stride)
    x, x_nhwc = _images()
    _same_function(jax.jit(dilated.apply)(variables, x_nhwc), _torch_outputs(net, x))
    strides = [f.stride for f in dilated.clone(features_only=True).feature_info().values()]
    assert strides[-1] == output_stride


@pytest.mark.interop
def test_a_one_channel_model_goes_to_torchvision_with_its_conv1_replaced(torchvision):
    """RGB weights adapted to greyscale (timm's ``adapt_input_conv``) and exported: a
    torchvision resnet18 whose conv1 takes one channel loads them strictly, equal logits."""
    import torch

    rgb = computable_variables(models.create_model('resnet18'), seed=2)
    with pytest.warns(UserWarning, match='in_chans=1'):
        model, variables = convert.adapt_input_channels(models.create_model('resnet18'), rgb, 1)
    net = torchvision.models.resnet18(weights=None)
    net.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    net.load_state_dict(convert.to_torchvision(variables, model), strict=True)
    x, x_nhwc = _images(batch=2)
    x, x_nhwc = x[:, :1], x_nhwc[..., :1]
    _same_function(jax.jit(model.apply)(variables, x_nhwc), _torch_outputs(net.eval(), x))


@pytest.mark.interop
def test_a_headless_model_in_a_larger_module_loads_into_torchvision_with_fc_identity(torchvision):
    import torch

    model = models.create_model('resnet18', num_classes=0)  # stride_in_1x1: no matter here
    backbone = computable_variables(model, seed=2)
    nested = {
        'params': {
            'backbone': backbone['params'],
            'head': {'kernel': np.zeros((512, 3), np.float32)},
        },
        'batch_stats': {'backbone': backbone['batch_stats']},
    }
    net = torchvision.models.resnet18(weights=None).eval()
    net.fc = torch.nn.Identity()
    net.load_state_dict(convert.to_torchvision(nested, model), strict=True)
    x, x_nhwc = _images(seed=3)
    _same_function(model.apply(backbone, x_nhwc), _torch_outputs(net, x))


@pytest.mark.interop
def test_to_torchvision_writes_a_pth_that_loads_strictly_and_converts_back(
    resnet18_state, torchvision, tmp_path
):
    import torch

    model, variables, _ = resnet18_state
    convert.to_torchvision(variables, model, tmp_path / 'r18.pth')
    loaded = torch.load(tmp_path / 'r18.pth', weights_only=True)
    torchvision.models.resnet18(weights=None).load_state_dict(loaded, strict=True)
    back_model, back = convert.from_torchvision(tmp_path / 'r18.pth')
    assert back_model == model
    _assert_trees_equal(back, variables)


@pytest.mark.interop
def test_float16_and_bfloat16_torch_weights_convert_to_float32(torchvision, tmp_path):
    """A .pth of float16 tensors and a state dict of bfloat16 tensors (numpy has no
    bfloat16: torch's own cast) give float32 variables of the same values."""
    import torch

    net = _randomise_batchnorm(torchvision.models.resnet18(weights=None))
    for dtype in (torch.float16, torch.bfloat16):
        low = {k: v.to(dtype) if v.is_floating_point() else v for k, v in net.state_dict().items()}
        torch.save(low, tmp_path / 'low.pth')
        source = tmp_path / 'low.pth' if dtype == torch.float16 else low
        _, variables = convert.from_torchvision(source, 'resnet18')
        assert {v.dtype for v in jax.tree_util.tree_leaves(variables)} == {np.dtype('float32')}
        np.testing.assert_array_equal(
            variables['params']['conv3_1']['conv1']['kernel'],
            low['layer2.0.conv1.weight'].float().numpy().transpose(2, 3, 1, 0),
        )
        np.testing.assert_array_equal(
            variables['batch_stats']['bn1']['var'], low['bn1.running_var'].float().numpy()
        )


@pytest.mark.interop
@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_timm_resnets_convert_to_the_same_logits(name):
    import timm

    net = _randomise_batchnorm(timm.create_model(name, pretrained=False))
    model, variables, kind = convert.load_weights(net)  # a timm model: told by its config
    assert kind == 'timm' and convert.PREPROCESSING[kind] == 'torchvision'
    assert model == models.create_model(name, stride_in_1x1=False)
    x, x_nhwc = _images(seed=4)
    _same_function(jax.jit(model.apply)(variables, x_nhwc), _torch_outputs(net, x))


@pytest.mark.interop
@pytest.mark.parametrize(
    'name, what',
    [
        ('resnet50d', "a deep stem (timm's resnet*c, *d, *s), average-pool shortcuts"),
        ('wide_resnet50_2', 'wider blocks (128 channels in layer1, not 64: wide_resnet*)'),
        ('resnext50_32x4d', 'grouped 3x3 convs (32 groups: ResNeXt)'),
        ('seresnet50', "squeeze-and-excitation blocks (timm's seresnet*)"),
    ],
)
def test_timm_variants_not_built_here_are_refused_naming_the_variant(name, what):
    import timm

    with pytest.raises(ValueError) as refused:
        convert.load_weights(timm.create_model(name, pretrained=False))
    message = str(refused.value)
    assert f': a ResNet variant resnet_jax does not build: {what}' in message, message
    assert message.endswith("it reads torchvision's and timm's resnet18 .. resnet152")


TRANSFORMERS_NETS = {  # case: (layer_type, depths, hidden_sizes, downsample_in_bottleneck)
    'resnet-18, a model object': ('basic', [2, 2, 2, 2], [64, 128, 256, 512], False),
    'resnet-50, a save_pretrained folder': (
        'bottleneck',
        [3, 4, 6, 3],
        [256, 512, 1024, 2048],
        False,
    ),
    'resnet-18 ResNetModel (headless), a state dict and config dict': (
        'basic',
        [2, 2, 2, 2],
        [64, 128, 256, 512],
        False,
    ),
    'resnet-50 downsample_in_bottleneck (v1), a state dict and ResNetConfig': (
        'bottleneck',
        [3, 4, 6, 3],
        [256, 512, 1024, 2048],
        True,
    ),
}


@pytest.mark.interop
@pytest.mark.parametrize('case', list(TRANSFORMERS_NETS))
def test_transformers_resnets_convert_to_the_same_outputs(case, tmp_path):
    import transformers

    layer_type, depths, sizes, v1 = TRANSFORMERS_NETS[case]
    config = transformers.ResNetConfig(
        layer_type=layer_type,
        depths=depths,
        hidden_sizes=sizes,
        downsample_in_bottleneck=v1,
        num_labels=10,
    )
    headless = 'headless' in case
    net = _randomise_batchnorm(
        (transformers.ResNetModel if headless else transformers.ResNetForImageClassification)(
            config
        )
    )
    if 'model object' in case:
        model, variables, kind = convert.load_weights(net)
    elif 'folder' in case:
        net.save_pretrained(tmp_path / 'hf')
        assert (tmp_path / 'hf' / 'model.safetensors').exists()
        model, variables, kind = convert.load_weights(tmp_path / 'hf')
    elif 'config dict' in case:
        model, variables = convert.from_transformers(net.state_dict(), config=config.to_dict())
        kind = 'transformers'
    else:
        model, variables = convert.from_transformers(net.state_dict(), config=config)
        kind = 'transformers'
    assert kind == 'transformers'
    name = 'resnet18' if layer_type == 'basic' else 'resnet50'
    assert model == models.create_model(name, num_classes=0 if headless else 10, stride_in_1x1=v1)
    x, x_nhwc = _images(seed=5)
    _same_function(jax.jit(model.apply)(variables, x_nhwc), _torch_outputs(net, x))


# --- the command line -------------------------------------------------------------------------


def _cli(*args):
    return forked.run(
        [sys.executable, '-m', 'resnet_jax', 'convert', *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.slow  # launches the command line: once, on the main CI stack
def test_cli_converts_in_with_the_network_inferred_and_out_to_torchvision(resnet18_state, tmp_path):
    """A DDP-prefixed .safetensors in (--from=auto, no --model: a warning line), and the
    workdir back out with --to=torchvision: the same state dict."""
    from safetensors.numpy import load_file, save_file

    _, _, state_dict = resnet18_state
    save_file({f'module.{k}': v for k, v in state_dict.items()}, tmp_path / 'ddp.safetensors')
    workdir = tmp_path / 'r18'
    proc = _cli(f'--input={tmp_path / "ddp.safetensors"}', f'--output={workdir}')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'warning: ' in proc.stderr and "'module.'" in proc.stderr
    assert json.loads((workdir / 'converted.json').read_text()) == {
        'source': 'torchvision',
        'model': 'resnet18',
        'preprocessing': 'torchvision',
    }
    proc = _cli(
        '--to=torchvision', f'--workdir={workdir}', f'--output={tmp_path / "out.safetensors"}'
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'resnet18' in proc.stdout
    _assert_trees_equal(load_file(tmp_path / 'out.safetensors'), state_dict)
    # Nothing is written over: a run's workdir, or an existing file.
    before = {p: p.read_bytes() for p in sorted(workdir.rglob('*')) if p.is_file()}
    written = (tmp_path / 'out.safetensors').read_bytes()
    for args, message in [
        (
            (f'--input={tmp_path / "ddp.safetensors"}', f'--output={workdir}'),
            'exists and is not an empty folder',
        ),
        (
            (
                '--to=torchvision',
                f'--workdir={workdir}',
                f'--output={tmp_path / "out.safetensors"}',
            ),
            'exists; name a new file',
        ),
    ]:
        proc = _cli(*args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert {p: p.read_bytes() for p in sorted(workdir.rglob('*')) if p.is_file()} == before
    assert (tmp_path / 'out.safetensors').read_bytes() == written
    with pytest.raises(ValueError, match='already holds a run'):
        runs.save_variables(workdir, {'params': {}, 'batch_stats': {}}, base_config())


@pytest.mark.slow  # launches the command line: once, on the main CI stack
def test_cli_refusals_and_bad_input_are_one_line_with_exit_code_2(resnet18_state, tmp_path):
    from safetensors.numpy import save_file

    nan = dict(resnet18_state[2], **{'fc.bias': np.full(1000, np.nan, np.float32)})
    save_file(nan, tmp_path / 'nan.safetensors')
    (tmp_path / 'link').symlink_to(tmp_path / 'gone')
    config = base_config()
    config.model.name = 'resnet50'  # the paper's v1: refused before any weight is read
    (tmp_path / 'v1').mkdir()
    (tmp_path / 'v1' / 'config.json').write_text(config.to_json_best_effort())
    out = tmp_path / 'v1.safetensors'
    for args, message in [
        (
            ('--to=torchvision', f'--workdir={tmp_path / "v1"}', f'--output={out}'),
            'stride_in_1x1=True',
        ),
        ((f'--input={tmp_path / "missing.pth"}', f'--output={tmp_path / "w"}'), 'does not exist'),
        (
            ('--to=torchvision', f'--workdir={tmp_path / "v1"}', '--output=x.npz'),
            'write a .safetensors, .pth or .pt file',
        ),
        (
            (f'--input={tmp_path / "nan.safetensors"}', f'--output={tmp_path / "w"}'),
            'params/fc/bias holds 1000 NaN or Inf values of 1000',
        ),
        (
            (f'--input={tmp_path / "nan.safetensors"}', f'--output={tmp_path / "link"}'),
            'which does not exist',
        ),
    ]:
        proc = _cli(*args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], (
            proc.stderr
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ['link', 'nan.safetensors', 'v1']


@pytest.mark.interop
@pytest.mark.parametrize(
    'name, overrides',
    [
        ('cifar_resnet20', {}),
        ('cifar_plain20', {}),
        ('resnet18', {'shortcut': 'C', 'width': 8}),
        ('resnet34', {'shortcut': 'A', 'width': 8}),
        ('resnet50', {'width': 8}),
    ],
)
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
        lambda v: (
            np.random.default_rng(1).uniform(0.5, 1.5, v.shape).astype(np.float32)
            if v.ndim == 1
            else np.asarray(v)
        ),
        model.init(jax.random.key(0), x),
    )
    net = torch_nets.torch_net(model).eval()
    assert sum(p.numel() for p in net.parameters()) == sum(
        v.size for v in jax.tree_util.tree_leaves(variables['params'])
    )
    torch_nets.load_flax_variables(net, variables)
    with torch.no_grad():
        ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    _close(jax.jit(model.apply)(variables, x), ref)
