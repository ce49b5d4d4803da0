"""The paper's plain and residual networks as pure ``flax.linen`` modules.

Where each part of the paper lives:

* ``BasicBlock`` / ``BottleneckBlock``: the building blocks of Fig. 5 (sec. 3.2, 3.3),
  with ``residual=False`` giving the plain counterpart layer for layer.
* ``ResNet``: the stacks of Table 1 (ImageNet stem) and sec. 4.2 (CIFAR stem).
* ``TABLE1``: the rows of Table 1; ``cifar(n)`` the 6n+2 nets of sec. 4.2.
* ``create_model`` / ``list_models``: the one place that maps names to models.

Every model is called as ``model.apply(variables, images_nhwc, train=...)`` and computes
the same program on every backend: plain ``lax`` convolutions and pooling, each block its
own submodule, so every JAX transformation (``jax.grad``, ``jax.jvp``, ``jax.hessian``,
``capture_intermediates``, ``nn.tabulate``) applies. The parts are handed in (``conv``,
``norm``, ``max_pool``, ``stage``, ``block_cls``), as in flax's ImageNet example: a faster
implementation of the same function is a different part (``resnet_jax.backends``), a
different norm layer is another ``norm``.

What a block receives (the fields ``ResNet`` sets; a block of your own takes the same):
``filters`` (base width of the stage), ``strides`` (2 in the first block of conv3_x ...
conv5_x, else 1), ``conv`` (the conv factory, called ``conv(features, kernel_size,
strides, name=...)``), ``norm`` (the norm factory, called ``norm(name=..., [scale_init=...])``),
``residual``, ``shortcut``, ``zero_init_residual``, ``dtype``, and ``stride_in_1x1`` if the
block declares that field.
"""

from __future__ import annotations

import functools
import inspect
import re
from numbers import Integral, Real
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.models import layers
from resnet_jax.models.layers import BatchNorm, FrozenBatchNorm, Shortcut, check_shortcut

Dtype = Any
ModuleDef = Any


class BasicBlock(nn.Module):
    """Two 3x3 convs (Fig. 5 left). y = relu(F(x) + shortcut(x)), eq. (1)."""

    expansion: ClassVar[int] = 1  # output channels per ``filters``
    filters: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    residual: bool = True
    shortcut: str = 'B'
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(self.filters, 3, self.strides, name='conv1')(x)
        y = nn.relu(self.norm(name='bn1')(y))
        y = self.conv(self.filters, 3, name='conv2')(y)
        y = self.norm(name='bn2', scale_init=_last_scale_init(self.zero_init_residual))(y)
        return _merge(self, x, y, self.filters)


class BottleneckBlock(nn.Module):
    """1x1 (reduce), 3x3, 1x1 (expand x4) convs (Fig. 5 right).

    ``stride_in_1x1=True`` puts the downsampling stride on the first 1x1 conv, as the
    paper's released Caffe models ("v1"); ``False`` puts it on the 3x3 ("v1.5", as
    torchvision and the Flax ImageNet example).
    """

    expansion: ClassVar[int] = 4
    filters: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    residual: bool = True
    shortcut: str = 'B'
    stride_in_1x1: bool = True
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s1, s3 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
        y = self.conv(self.filters, 1, s1, name='conv1')(x)
        y = nn.relu(self.norm(name='bn1')(y))
        y = self.conv(self.filters, 3, s3, name='conv2')(y)
        y = nn.relu(self.norm(name='bn2')(y))
        y = self.conv(self.filters * 4, 1, name='conv3')(y)
        y = self.norm(name='bn3', scale_init=_last_scale_init(self.zero_init_residual))(y)
        return _merge(self, x, y, self.filters * 4)


def _last_scale_init(zero_init: bool):
    return nn.initializers.zeros if zero_init else nn.initializers.ones


def _merge(block, x: jax.Array, y: jax.Array, features: int) -> jax.Array:
    """The addition of eq. (1)/(2) followed by the ReLU; plain nets skip the addition."""
    if block.residual:
        y = y + Shortcut(features, block.strides, block.shortcut, block.norm, block.conv,
                         dtype=block.dtype, name='shortcut')(x)
    return nn.relu(y)


def unrolled_stage(parent: nn.Module, make_block: Callable[..., nn.Module],
                   names: Sequence[str], x: jax.Array) -> jax.Array:
    """Applies the identical blocks ``names`` of a stage in turn, each its own submodule of
    ``parent`` (the default ``ResNet.stage``). ``make_block(name=...)`` builds one."""
    del parent  # the blocks are created in the calling module's scope
    for name in names:
        x = make_block(name=name)(x)
    return x


def _accepts(factory: Callable[..., Any], argument: str) -> bool:
    try:
        return argument in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


class Feature(NamedTuple):
    """A stage output of ``features_only``: its channels and its stride (input pixels
    per output pixel)."""
    channels: int
    stride: int


class ResNet(nn.Module):
    """A plain or residual network: a stem, stages of blocks, global average pool, fc.

    Attributes:
      stage_sizes: blocks per stage (Table 1 rows; ``(n, n, n)`` for CIFAR).
      block_cls: ``BasicBlock``, ``BottleneckBlock`` or a block of your own taking the
        fields listed in the module docstring (and an ``expansion`` class attribute, its
        output channels per ``filters``, for ``feature_info``).
      num_classes: outputs of the final fc layer; ``0``: no fc, the model returns the
        globally pooled features (``(batch, width * 2**(stages - 1) * expansion)``).
      stem: ``'imagenet'`` (7x7/2 conv 64 + 3x3/2 max pool) or ``'cifar'`` (3x3 conv 16).
      width: filters of the first stage (64 ImageNet, 16 CIFAR); doubled each stage.
      residual: False gives the plain net, the same stack without shortcuts.
      shortcut: 'A', 'B' or 'C' (Table 3).
      stride_in_1x1: bottleneck stride placement (True: v1, the paper; False: v1.5).
      zero_init_residual: start the last BN scale of each residual branch at 0.
      bn_group_size: examples per BatchNorm group in training (0: the whole batch).
      bn_momentum, bn_epsilon: BatchNorm running-average momentum and epsilon.
      frozen_bn: every BatchNorm uses its running statistics and affine parameters in
        training too, with no gradient to them and no update (``layers.FrozenBatchNorm``,
        the detection fine-tuning convention); the same variables, the same function in
        evaluation.
      features_only: return the stage outputs ``{'conv2': ..., 'conv5': ...}`` (the CIFAR
        nets: conv2..conv4, Table 1's and sec. 4.2's names) in the compute dtype instead
        of logits, from the classifier's variables (the fc is not used);
        ``feature_info()`` gives their channels and strides.
      dtype: compute dtype (e.g. ``jnp.bfloat16`` or ``'bfloat16'``); parameters stay
        float32 and the logits are float32.
      conv: the conv factory, ``conv(features, kernel_size, strides, dtype=, name=)``
        (default ``layers.conv``: bias-free, symmetric padding, He init).
      norm: the norm factory; ``None`` is the paper's BatchNorm (``layers.BatchNorm``
        with ``bn_group_size``, ``bn_momentum``, ``bn_epsilon``). Any flax norm works,
        e.g. ``functools.partial(nn.GroupNorm, num_groups=8)``; it gets ``dtype`` and,
        where it has the argument, ``use_running_average=not train``.
      max_pool: the stem's pool, ``max_pool(x, window, stride, padding)``.
      stage: how a stage's identical blocks (all but its first) are run,
        ``stage(parent, make_block, names, x)`` (default ``unrolled_stage``).

    Every field is checked when the model is built (``ValueError`` saying what is
    allowed). Inputs are float NHWC images (an array or anything ``jnp.asarray`` takes)
    with 1 to 4 channels, normalised as the weights expect (``resnet_jax.models.
    preprocess`` turns uint8 images into them; integer images are refused), at least
    ``min_input_size()`` pixels on each side (32 for the ImageNet nets, 4 for the CIFAR
    nets: every stage then sees at least one pixel; not checked on the symbolic sizes of
    ``jax.export``); anything else raises ``ValueError``.
    """

    stage_sizes: Sequence[int]
    block_cls: type[nn.Module]
    num_classes: int = 1000
    stem: str = 'imagenet'
    width: int = 64
    residual: bool = True
    shortcut: str = 'B'
    stride_in_1x1: bool = True
    zero_init_residual: bool = False
    bn_group_size: int = 0
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    frozen_bn: bool = False
    features_only: bool = False
    dtype: Dtype = jnp.float32
    conv: ModuleDef = layers.conv
    norm: ModuleDef | None = None
    max_pool: Callable[..., jax.Array] = layers.max_pool
    stage: Callable[..., jax.Array] = unrolled_stage

    def __post_init__(self):
        _check_fields(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | dict[str, jax.Array]:
        dtype = canonical_dtype(self.dtype)
        x = self._check_input(x)
        conv = functools.partial(self.conv, dtype=dtype)
        norm = self._norm(train, dtype)
        x = jnp.asarray(x, dtype)
        if self.stem == 'imagenet':  # conv1 and the max pool of Table 1
            x = conv(self.width, 7, 2, name='conv1')(x)
            x = nn.relu(norm(name='bn1')(x))
            x = self.max_pool(x, 3, 2, 1)
        else:  # the first 3x3 conv of sec. 4.2
            x = conv(self.width, 3, name='conv1')(x)
            x = nn.relu(norm(name='bn1')(x))

        extra = ({'stride_in_1x1': self.stride_in_1x1}
                 if _accepts(self.block_cls, 'stride_in_1x1') else {})
        features = {}
        for i, num_blocks in enumerate(self.stage_sizes):
            block = functools.partial(
                self.block_cls, filters=self.width * 2**i, conv=conv, norm=norm,
                residual=self.residual, shortcut=self.shortcut,
                zero_init_residual=self.zero_init_residual, dtype=dtype, **extra)
            names = block_names(i, num_blocks)
            x = block(strides=stage_strides(i), name=names[0])(x)
            if names[1:]:
                x = self.stage(self, functools.partial(block, strides=1), names[1:], x)
            features[stage_name(i)] = x
        if self.features_only:
            return features

        x = jnp.mean(x, axis=(1, 2))
        if not self.num_classes:
            return x.astype(jnp.float32)
        x = nn.Dense(self.num_classes, dtype=dtype, param_dtype=jnp.float32, name='fc')(x)
        return x.astype(jnp.float32)

    @nn.nowrap
    def min_input_size(self) -> int:
        """The smallest input side: the net's total downsampling (every stage then sees at
        least one pixel)."""
        return (4 if self.stem == 'imagenet' else 1) * 2 ** (len(self.stage_sizes) - 1)

    @nn.nowrap
    def feature_info(self) -> dict[str, Feature]:
        """The stage outputs ``features_only`` returns, with their channels and strides,
        without running the net: ``{'conv2': Feature(channels=256, stride=4), ...}`` for
        ResNet-50."""
        expansion = getattr(self.block_cls, 'expansion', None)
        if not isinstance(expansion, int):
            raise ValueError(f'block_cls {getattr(self.block_cls, "__name__", self.block_cls)}'
                             ' has no integer `expansion` class attribute (output channels '
                             'per filters), which feature_info needs')
        stride = 4 if self.stem == 'imagenet' else 1
        info = {}
        for i in range(len(self.stage_sizes)):
            stride *= stage_strides(i)
            info[stage_name(i)] = Feature(self.width * 2**i * expansion, stride)
        return info

    @nn.nowrap
    def _check_input(self, x: Any) -> jax.Array:
        if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
            x = jnp.asarray(x)  # a nested list
        shape = tuple(x.shape)
        if len(shape) != 4 or not _concrete(shape[-1]) or not 1 <= shape[-1] <= 4:
            hint = (' (NCHW? use x.transpose(0, 2, 3, 1))'
                    if len(shape) == 4 and _concrete(shape[1]) and 1 <= shape[1] <= 4 else '')
            raise ValueError(f'ResNet expects NHWC images (batch, height, width, channels) '
                             f'with 1-4 channels; got shape {shape}{hint}')
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f'ResNet expects float images normalised as its weights were '
                             f'trained, got {x.dtype}: turn uint8 images into them with '
                             "resnet_jax.models.preprocess(images, 'torchvision' | 'caffe' "
                             "| 'mean', mean=...)")
        smallest = self.min_input_size()
        sides = [d for d in shape[1:3] if _concrete(d)]
        if sides and min(sides) < smallest:
            raise ValueError(f'ResNet ({self.stem} stem, {len(self.stage_sizes)} stages) '
                             f'needs inputs of at least {smallest}x{smallest} pixels; got '
                             f'{shape[1]}x{shape[2]}')
        return x

    @nn.nowrap  # a plain method: not a module call (nn.tabulate lists none)
    def _norm(self, train: bool, dtype) -> Callable[..., nn.Module]:
        if self.frozen_bn:
            return functools.partial(FrozenBatchNorm, epsilon=self.bn_epsilon, dtype=dtype)
        if self.norm is None:
            return functools.partial(BatchNorm, use_running_average=not train,
                                     group_size=self.bn_group_size, momentum=self.bn_momentum,
                                     epsilon=self.bn_epsilon, dtype=dtype)
        kwargs = {'dtype': dtype} if _accepts(self.norm, 'dtype') else {}
        if _accepts(self.norm, 'use_running_average'):
            kwargs['use_running_average'] = not train
        return functools.partial(self.norm, **kwargs)


def _concrete(dim: Any) -> bool:
    """Whether an array dimension is a number (not a symbolic size of ``jax.export``)."""
    return isinstance(dim, Integral)


def _check_fields(model: ResNet) -> None:
    """Raises ValueError naming the first field of ``model`` that is not allowed."""
    def integer(value, low):
        return isinstance(value, Integral) and not isinstance(value, bool) and value >= low

    def flag(value):
        return isinstance(value, (bool, np.bool_))

    sizes = model.stage_sizes
    checks = [
        ('stage_sizes', isinstance(sizes, Sequence) and not isinstance(sizes, str)
         and len(sizes) > 0 and all(integer(n, 1) for n in sizes),
         'a non-empty sequence of block counts >= 1, e.g. (3, 4, 6, 3)'),
        ('block_cls', callable(model.block_cls), 'a block module class'),
        ('num_classes', integer(model.num_classes, 0),
         'an integer >= 0 (0: no fc, the pooled features)'),
        ('stem', model.stem in ('imagenet', 'cifar'), "'imagenet' or 'cifar'"),
        ('width', integer(model.width, 1), 'an integer >= 1 (64 ImageNet, 16 CIFAR)'),
        ('bn_group_size', integer(model.bn_group_size, 0),
         'an integer >= 0 (0: the whole batch)'),
        ('bn_momentum', isinstance(model.bn_momentum, Real) and not flag(model.bn_momentum)
         and 0 <= model.bn_momentum <= 1, 'a number in [0, 1]'),
        ('bn_epsilon', isinstance(model.bn_epsilon, Real) and not flag(model.bn_epsilon)
         and 0 < model.bn_epsilon < float('inf'), 'a finite number > 0'),
        *[(name, flag(getattr(model, name)), 'True or False')
          for name in ('residual', 'stride_in_1x1', 'zero_init_residual', 'frozen_bn',
                       'features_only')],
        *[(name, callable(getattr(model, name)), 'a callable')
          for name in ('conv', 'max_pool', 'stage')],
        ('norm', model.norm is None or callable(model.norm),
         'None (the paper\'s BatchNorm) or a norm module factory'),
        ('frozen_bn', not (model.frozen_bn and model.norm is not None),
         'False with a norm of your own (frozen_bn freezes the paper\'s BatchNorm)'),
    ]
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(f'ResNet.{name}={getattr(model, name)!r} is not allowed: it must '
                             f'be {allowed}')
    check_shortcut(model.shortcut)
    canonical_dtype(model.dtype)


# The variables every network here has at its top: how a ResNet's variables are recognised
# inside a larger tree (a user's module holding it as 'backbone').
VARIABLE_MARKERS = ('conv1', 'bn1', 'conv2_1')


def find_resnets(tree: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The paths inside ``tree`` (a ``params`` collection, or any tree keyed like one) of
    each ResNet's variables: ``[()]`` when ``tree`` is one, ``[('backbone',)]`` when a
    module holds one as ``backbone``."""
    if not hasattr(tree, 'items'):
        return []
    if all(k in tree for k in VARIABLE_MARKERS):
        return [path]
    return [found for key, child in tree.items()
            for found in find_resnets(child, path + (str(key),))]


def locate_resnet(params: Any, at: Sequence[str] | str | None = None) -> tuple[str, ...]:
    """The path inside ``params`` (a ``params`` collection) of the one ResNet there, or
    ``at`` (``('backbone',)`` or ``'backbone'``) once checked to hold one; ValueError
    naming the candidates when there is none, more than one, or none at ``at``."""
    found = find_resnets(params)
    if at is None:
        if len(found) == 1:
            return found[0]
        if not found:
            raise ValueError('no ResNet in the variables: no dict holds conv1, bn1 and conv2_1 '
                             f'(params holds {sorted(params)[:6]})')
        raise ValueError('several ResNets in the variables, at '
                         + ', '.join(repr(p) for p in found)
                         + f'; choose one, e.g. at={found[0]!r}')
    at = tuple(at.split('/')) if isinstance(at, str) else tuple(at)
    tree = params
    for key in at:
        if not hasattr(tree, 'items') or key not in tree:
            raise ValueError(f'at={at!r}: variables params have no {"/".join(at)} '
                             f'(candidates: {found or "none"})')
        tree = tree[key]
    if find_resnets(tree) != [()]:
        raise ValueError(f'at={at!r}: params/{"/".join(at)} is not a ResNet (it holds '
                         f'{sorted(tree)[:6] if hasattr(tree, "items") else tree!r}; '
                         f'candidates: {found or "none"})')
    return at


def stage_name(stage: int) -> str:
    """The paper's name of a stage's output: conv2 (conv2_x of Table 1) for stage 0."""
    return f'conv{stage + 2}'


def stage_strides(stage: int) -> int:
    """The stride of a stage's first block: conv3_1, conv4_1, conv5_1 (and the CIFAR nets'
    second and third stages) downsample by 2 (Table 1, sec. 4.2)."""
    return 2 if stage > 0 else 1


def block_names(stage: int, num_blocks: int) -> list[str]:
    """The paper's names of a stage's blocks: conv2_1, conv2_2, ... for stage 0."""
    return [f'conv{stage + 2}_{j + 1}' for j in range(num_blocks)]


DTYPES = ('float32', 'bfloat16', 'float16')


def canonical_dtype(dtype: Any) -> jnp.dtype:
    """A compute dtype given as a name or a dtype; ``ValueError`` for anything else."""
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in DTYPES:
        raise ValueError(f'unknown dtype {dtype!r}; allowed: {", ".join(DTYPES)}')
    return resolved


# Table 1: blocks per stage of the ImageNet networks.
TABLE1: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    'resnet18': (BasicBlock, (2, 2, 2, 2)),
    'resnet34': (BasicBlock, (3, 4, 6, 3)),
    'resnet50': (BottleneckBlock, (3, 4, 6, 3)),
    'resnet101': (BottleneckBlock, (3, 4, 23, 3)),
    'resnet152': (BottleneckBlock, (3, 8, 36, 3)),
}
_ImageNet = functools.partial(ResNet, stem='imagenet', width=64, num_classes=1000)
_IMAGENET: dict[str, Callable[..., ResNet]] = {
    name: functools.partial(_ImageNet, block_cls=block, stage_sizes=sizes)
    for name, (block, sizes) in TABLE1.items()}
# The plain counterparts (Table 2 has plain-18/34; the bottleneck ones are offered too).
_IMAGENET.update({name.replace('resnet', 'plain'): functools.partial(make, residual=False)
                  for name, make in list(_IMAGENET.items())})

# Sec. 4.2: 6n+2 layers, option A (all shortcuts parameter-free).
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
_CIFAR_NAME = re.compile(r'^cifar_(resnet|plain)(\d+)$')


def parse_cifar_name(name: str) -> tuple[bool, int] | None:
    """``(residual, depth)`` of a CIFAR net's name (``cifar_resnet110``), ``None`` for
    another name; ``ValueError`` for a depth that is not 6n+2."""
    match = _CIFAR_NAME.match(name)
    if not match:
        return None
    depth = int(match.group(2))
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f'CIFAR depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, '
                         f'1202, ...); got {depth}.')
    return match.group(1) == 'resnet', depth


def cifar(depth: int, residual: bool = True, **overrides: Any) -> ResNet:
    """The CIFAR-10 net of sec. 4.2 with ``depth = 6n + 2`` layers."""
    parse_cifar_name(f'cifar_resnet{depth}')
    n = (depth - 2) // 6
    kwargs = dict(stage_sizes=(n, n, n), block_cls=BasicBlock, stem='cifar', width=16,
                  num_classes=10, shortcut='A', residual=residual)
    kwargs.update(overrides)
    return ResNet(**kwargs)


def list_models() -> list[str]:
    """Every registered name (CIFAR nets exist for any 6n+2 depth; the paper's are listed)."""
    cifar_names = [f'cifar_{kind}{d}' for kind in ('resnet', 'plain') for d in CIFAR_DEPTHS]
    return sorted(_IMAGENET) + cifar_names


_OPTIONS = tuple(f for f in ResNet.__dataclass_fields__ if f not in ('parent', 'name'))


def create_model(model_name: str, /, **overrides: Any) -> ResNet:
    """Builds a model by name, e.g. ``create_model('resnet50', stride_in_1x1=False)``.

    Any ``ResNet`` attribute can be overridden (``num_classes``, ``shortcut``,
    ``dtype``, ``bn_group_size``, ``norm``, ...), and the module's own ``name`` and
    ``parent`` (``create_model('resnet50', name='backbone')`` inside another module).
    ``dtype`` may be given as a string.
    """
    if 'dtype' in overrides:
        overrides['dtype'] = canonical_dtype(overrides['dtype'])
    unknown = set(overrides) - set(_OPTIONS) - {'parent', 'name'}
    if unknown:
        raise ValueError(f'unknown model option(s) {sorted(unknown)}; allowed: '
                         f'{sorted(_OPTIONS)}')
    if model_name in _IMAGENET:
        return _IMAGENET[model_name](**overrides)
    parsed = parse_cifar_name(model_name)
    if parsed:
        residual, depth = parsed
        return cifar(depth, **{'residual': residual, **overrides})
    raise ValueError(f'unknown model {model_name!r}; allowed: {", ".join(sorted(_IMAGENET))}, '
                     'cifar_resnetN and cifar_plainN with N = 6n+2 (e.g. cifar_resnet20).')
