"""What research code builds on: stage features, fine-tuning (transfer, frozen BatchNorm),
validated fields and inputs, preprocessing, shape-polymorphic export and Flax NNX."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import resnet_jax
from resnet_jax import models
from resnet_jax.data import augment
from resnet_jax.models import nnx as resnet_nnx

PAPER_NETS = [
    *models.TABLE1,
    'plain18',
    'plain34',
    'cifar_resnet20',
    'cifar_resnet56',
    'cifar_resnet110',
    'cifar_plain20',
]


def init(model, size=32, batch=1):
    return model.init(jax.random.key(0), jnp.zeros((batch, size, size, 3)))


# --- stage features --------------------------------------------------------------------------


@pytest.mark.parametrize('name', PAPER_NETS)
def test_stage_features_have_the_channels_and_strides_they_announce(name):
    model = models.create_model(name, features_only=True)
    info = model.feature_info()
    cifar = name.startswith('cifar')
    assert list(info) == (
        ['conv2', 'conv3', 'conv4'] if cifar else ['conv2', 'conv3', 'conv4', 'conv5']
    )
    assert [f.stride for f in info.values()] == ([1, 2, 4] if cifar else [4, 8, 16, 32])
    expansion = (
        4
        if models.TABLE1.get(name.replace('plain', 'resnet'), (None,))[0] is models.BottleneckBlock
        else 1
    )
    width = 16 if cifar else 64
    assert [f.channels for f in info.values()] == [
        width * 2**i * expansion for i in range(len(info))
    ]
    size = 64
    variables = jax.eval_shape(lambda: init(models.create_model(name), size))
    shapes = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, size, size, 3))), variables)
    assert {k: v.shape for k, v in shapes.items()} == {
        k: (2, size // f.stride, size // f.stride, f.channels) for k, f in info.items()
    }


def test_stage_features_come_from_the_classifiers_variables():
    classifier = models.create_model('cifar_resnet20')
    variables = init(classifier)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    features = models.create_model('cifar_resnet20', features_only=True).apply(variables, x)
    _, seen = classifier.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
    np.testing.assert_array_equal(
        features['conv4'], seen['intermediates']['conv4_3']['__call__'][0]
    )


class FPN(nn.Module):
    """A small feature pyramid (Lin et al. 2017) on a backbone's stage features: 1x1
    laterals, top-down nearest upsampling and a 3x3 output conv per level."""

    backbone: nn.Module
    channels: int = 8

    @nn.compact
    def __call__(self, x, train=False):
        features = self.backbone(x, train)
        names = sorted(features)
        out, top = {}, None
        for name in reversed(names):
            lateral = nn.Conv(self.channels, (1, 1), name=f'lateral_{name}')(features[name])
            if top is not None:
                top = jax.image.resize(top, lateral.shape, 'nearest')
                lateral = lateral + top
            top = lateral
            out[name.replace('conv', 'P')] = nn.Conv(self.channels, (3, 3), name=f'out_{name}')(
                lateral
            )
        return out


def test_an_fpn_head_trains_on_the_stage_features():
    backbone = models.create_model('resnet18', width=8, features_only=True, name='backbone')
    fpn = FPN(backbone)
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    variables = fpn.init(jax.random.key(1), x)
    out = fpn.apply(variables, x)
    info = backbone.feature_info()
    assert {k: v.shape for k, v in out.items()} == {
        f'P{k[4:]}': (2, 64 // f.stride, 64 // f.stride, 8) for k, f in info.items()
    }

    def loss(params):
        y, _ = fpn.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
        return sum(jnp.mean(v**2) for v in y.values())

    grads = jax.jit(jax.grad(loss))(variables['params'])
    assert float(jnp.abs(grads['backbone']['conv2_1']['conv1']['kernel']).max()) > 0
    assert float(jnp.abs(grads['lateral_conv5']['kernel']).max()) > 0


# --- fine-tuning ----------------------------------------------------------------------------


NARROW = 8  # the ResNets of the transfer tests


@pytest.fixture(scope='module')
def imagenet_workdir(tmp_path_factory):
    """A workdir of a 1000-class ResNet-18 (as `resnet-jax convert` writes one), narrow:
    what transfer matches is names and shapes, the same at any width."""
    from resnet_jax.config import base_config
    from resnet_jax.training import runs

    model = models.create_model('resnet18', stride_in_1x1=False, width=NARROW)
    variables = jax.tree_util.tree_map(
        lambda v: v + jax.random.normal(jax.random.key(3), v.shape) * 0.1, init(model)
    )
    config = base_config()
    config.model.name, config.dataset.name = 'resnet18', 'imagenet2012'
    workdir = tmp_path_factory.mktemp('r18')
    runs.save_variables(workdir, variables, config)
    return workdir, variables


def test_transfer_from_a_1000_class_workdir_into_a_10_class_head(imagenet_workdir):
    workdir, pretrained = imagenet_workdir
    model = models.create_model('resnet18', num_classes=10, stride_in_1x1=False, width=NARROW)
    fresh = init(model)
    variables, kept, new, unused = report = resnet_jax.transfer(fresh, str(workdir))
    assert new == ['params/fc/bias', 'params/fc/kernel']
    assert unused == ['params/fc/bias', 'params/fc/kernel']  # 1000 classes: another shape
    assert len(kept) == len(jax.tree_util.tree_leaves(fresh)) - 2
    assert 'freshly initialised: params/fc/bias, params/fc/kernel' in str(report)
    np.testing.assert_array_equal(
        variables['params']['conv3_1']['conv1']['kernel'],
        pretrained['params']['conv3_1']['conv1']['kernel'],
    )
    np.testing.assert_array_equal(
        variables['batch_stats']['bn1']['var'], pretrained['batch_stats']['bn1']['var']
    )
    np.testing.assert_array_equal(
        variables['params']['fc']['kernel'], fresh['params']['fc']['kernel']
    )
    assert model.apply(variables, jnp.ones((1, 64, 64, 3))).shape == (1, 10)


class Detector(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        features = models.create_model(
            'resnet18', width=NARROW, features_only=True, frozen_bn=True, name='backbone'
        )(x, train)
        return nn.Conv(4, (1, 1), name='head')(features['conv5'])


def test_transfer_into_and_out_of_a_backbone_nested_in_a_users_module(imagenet_workdir):
    workdir, pretrained = imagenet_workdir
    detector = Detector()
    fresh = detector.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    variables, kept, new, unused = resnet_jax.transfer(fresh, str(workdir))
    assert new == ['params/head/bias', 'params/head/kernel']
    assert unused == ['params/fc/bias', 'params/fc/kernel']  # the backbone has no fc
    np.testing.assert_array_equal(
        variables['params']['backbone']['conv1']['kernel'], pretrained['params']['conv1']['kernel']
    )
    # and back out: the detector's backbone into a classifier
    classifier = models.create_model('resnet18', num_classes=3, width=NARROW)
    out, kept, new, _ = resnet_jax.transfer(init(classifier), variables)
    assert new == ['params/fc/bias', 'params/fc/kernel']
    np.testing.assert_array_equal(
        out['batch_stats']['conv5_2']['bn2']['mean'],
        pretrained['batch_stats']['conv5_2']['bn2']['mean'],
    )
    with pytest.raises(ValueError, match=r"at=\('head',\): params/head is not a ResNet"):
        resnet_jax.transfer(fresh, str(workdir), at=('head',))


def test_frozen_batchnorm_fixes_statistics_and_affine_in_training():
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    trained = models.create_model('cifar_resnet20')
    rng = np.random.default_rng(1)

    def trained_value(path, v):  # BatchNorm as after training: statistics, scales, shifts
        name = path[-1].key
        if name in ('scale', 'var'):
            return jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype)
        return v if name == 'kernel' else jnp.asarray(rng.normal(0, 0.1, v.shape), v.dtype)

    variables = jax.tree_util.tree_map_with_path(trained_value, init(trained))
    frozen = models.create_model('cifar_resnet20', frozen_bn=True)
    # the same variables, the same function: as the trained net evaluates
    np.testing.assert_allclose(
        frozen.apply(variables, x, train=True, mutable=['batch_stats'])[0],
        trained.apply(variables, x),
        rtol=1e-5,
        atol=1e-5,
    )

    def loss(params):
        y, updates = frozen.apply(
            {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
        )
        return jnp.mean(y**2), updates

    grads, updates = jax.grad(loss, has_aux=True)(variables['params'])
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, updates['batch_stats'], variables['batch_stats']
    )
    assert float(jnp.abs(grads['conv2_1']['bn1']['scale']).max()) == 0
    assert float(jnp.abs(grads['conv2_1']['bn1']['bias']).max()) == 0
    assert float(jnp.abs(grads['conv2_1']['conv1']['kernel']).max()) > 0


def test_the_finetuning_config_is_valid_and_freezes_batchnorm():
    from conftest import load_config

    from resnet_jax import config as config_lib

    config = load_config('finetune', '/data/photos')
    config_lib.validate(config)
    assert config.dataset.name == 'folder:/data/photos' and config.model.frozen_bn
    model = config_lib.model_from_config(config, 5)
    assert model.frozen_bn and not model.stride_in_1x1 and model.shortcut == 'B'
    config.weight_decay_on = 'all'
    with pytest.raises(config_lib.ConfigError, match='frozen_bn=True needs weight_decay_on'):
        config_lib.validate(config)


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    'field, value, allowed',
    [
        ('num_classes', -1, 'an integer >= 0'),
        ('num_classes', 2.5, 'an integer >= 0'),
        ('num_classes', '10', 'an integer >= 0'),
        ('num_classes', True, 'an integer >= 0'),
        ('width', 0, 'an integer >= 1'),
        ('width', -16, 'an integer >= 1'),
        ('stage_sizes', (), 'a non-empty sequence'),
        ('stage_sizes', (2, 0), 'block counts >= 1'),
        ('stem', 'tiny', "'imagenet' or 'cifar'"),
        ('bn_group_size', -1, 'an integer >= 0'),
        ('bn_momentum', 1.5, r'a number in \[0, 1\]'),
        ('bn_epsilon', 0.0, 'a finite number > 0'),
        ('bn_epsilon', float('nan'), 'a finite number > 0'),
        ('residual', 'yes', 'True or False'),
        ('frozen_bn', 1, 'True or False'),
        ('features_only', None, 'True or False'),
        ('conv', 3, 'a callable'),
        ('norm', 'bn', 'None'),
        ('shortcut', 'D', 'allowed: A, B, C'),
        ('dtype', 'int8', 'allowed: float32'),
    ],
)
def test_each_bad_field_is_a_value_error_saying_what_is_allowed(field, value, allowed):
    with pytest.raises(ValueError, match=allowed):
        models.create_model('cifar_resnet20', **{field: value})
    with pytest.raises(ValueError, match=allowed):  # the class itself, as research code builds
        models.ResNet(**{'stage_sizes': (1, 1, 1), 'block_cls': models.BasicBlock, field: value})


def test_frozen_bn_with_a_norm_of_ones_own_is_refused():
    with pytest.raises(ValueError, match='frozen_bn'):
        models.create_model(
            'cifar_resnet20', frozen_bn=True, norm=lambda **kw: nn.GroupNorm(num_groups=4, **kw)
        )


def test_bad_inputs_are_value_errors():
    model = models.create_model('cifar_resnet20')
    variables = init(model)
    with pytest.raises(ValueError, match='empty batch'):
        model.apply(variables, jnp.zeros((0, 32, 32, 3)), train=True, mutable=['batch_stats'])
    assert model.apply(variables, jnp.zeros((0, 32, 32, 3))).shape == (0, 10)
    with pytest.raises(ValueError, match=r'float images .* got uint8: .*models.preprocess'):
        model.apply(variables, np.zeros((1, 32, 32, 3), np.uint8))
    nested = np.zeros((1, 8, 8, 3)).tolist()  # a Python list works as an array would
    np.testing.assert_array_equal(
        model.apply(variables, nested), model.apply(variables, np.zeros((1, 8, 8, 3), np.float32))
    )
    with pytest.raises(ValueError, match='NCHW'):
        model.apply(variables, jnp.zeros((1, 3, 32, 32)))


@pytest.mark.parametrize('style', augment.PREPROCESSING)
def test_preprocess_is_the_pipelines_arithmetic_under_jit(style):
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 12, 3), dtype=np.uint8)
    mean = np.random.default_rng(1).uniform(0.3, 0.6, (16, 12, 3)).astype(np.float32)
    expected = augment.normalize(images, mean, style)
    ours = jax.jit(lambda x: models.preprocess(x, style, mean=mean))(images)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-5)
    # floats in [0, 1] are taken as they are
    np.testing.assert_allclose(
        models.preprocess(images / 255.0, style, mean=mean), expected, rtol=1e-5, atol=1e-4
    )
    with pytest.raises(ValueError, match='unknown preprocessing'):
        models.preprocess(images, 'imagenet')


# --- export ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'name, sizes',
    [
        pytest.param('resnet50', [(2, 64, 64), (1, 72, 96)], marks=pytest.mark.slow),
        ('cifar_resnet20', [(2, 32, 32), (3, 17, 40)]),
    ],
)
def test_export_with_symbolic_batch_height_and_width(name, sizes):
    from jax import export

    model = models.create_model(name, num_classes=10)
    variables = init(model, 32)
    b, h, w = export.symbolic_shape('b, h, w')
    exported = export.export(jax.jit(model.apply))(
        variables, jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32)
    )
    program = export.deserialize(exported.serialize())  # as a server would load it
    for shape in sizes:
        x = np.random.default_rng(0).normal(size=shape + (3,)).astype(np.float32)
        ref = model.apply(variables, x)
        np.testing.assert_allclose(
            program.call(variables, x), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max())
        )


# --- Flax NNX --------------------------------------------------------------------------------


def test_nnx_module_trains_with_nnx_optimizer_and_gives_back_linen_variables():
    from flax import nnx

    model = models.create_model('cifar_resnet20')
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    y = jnp.array([0, 1, 2, 3])
    variables = init(model)
    net = resnet_nnx.to_nnx(model, variables)
    np.testing.assert_array_equal(net(x), model.apply(variables, x))
    optimizer = nnx.Optimizer(net, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def train_step(net, optimizer, x, y):
        def loss_fn(net):
            logits = net(x, train=True, mutable=['batch_stats'])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param))(net)
        optimizer.update(net, grads)
        return loss

    losses = [float(train_step(net, optimizer, x, y)) for _ in range(3)]
    # the same step as linen's, by hand
    tx = optax.sgd(0.1, momentum=0.9)

    @jax.jit
    def linen_step(params, stats, opt_state):
        def loss_fn(params):
            logits, updates = model.apply(
                {'params': params, 'batch_stats': stats}, x, train=True, mutable=['batch_stats']
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        step, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, step), updates['batch_stats'], opt_state, loss

    params, stats = variables['params'], variables['batch_stats']
    opt_state, reference = tx.init(params), []
    for _ in range(3):
        params, stats, opt_state, loss = linen_step(params, stats, opt_state)
        reference.append(float(loss))
    np.testing.assert_allclose(losses, reference, rtol=1e-5)
    back = resnet_nnx.to_linen_variables(net)
    np.testing.assert_allclose(
        back['batch_stats']['bn1']['mean'], stats['bn1']['mean'], rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(model.apply(back, x), net(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r'bn1/bias has shape \(8,\), the network \(16,\)'):
        resnet_nnx.load(net, init(models.create_model('cifar_resnet20', width=8)))


def test_tabulate_lists_the_blocks_without_warnings():
    import warnings

    model = models.create_model('cifar_resnet20')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # e.g. "shape requires ndarray ... functools.partial"
        table = nn.tabulate(model, jax.random.key(0))(jnp.zeros((1, 32, 32, 3)))
    assert 'conv4_3' in table and 'Total Parameters: 271,098' in table  # with BN statistics
