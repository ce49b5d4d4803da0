"""The paper's plain and residual networks as pure ``flax.linen`` modules.

Where each part of the paper lives:

* ``BasicBlock`` / ``BottleneckBlock``: the building blocks of Fig. 5 (sec. 3.2, 3.3),
  with ``residual=False`` giving the plain counterpart layer for layer.
* ``ResNet``: the stacks of Table 1 (ImageNet stem) and sec. 4.2 (CIFAR stem).
* ``_IMAGENET``: the rows of Table 1; ``cifar(n)`` the 6n+2 nets of sec. 4.2.
* ``create_model`` / ``list_models``: the one place that maps names to models.

Every model is called as ``model.apply(variables, images_nhwc, train=...)``.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax import layers
from resnet_jax.layers import BatchNorm, Shortcut, check_shortcut

Dtype = Any


class BasicBlock(nn.Module):
    """Two 3x3 convs (Fig. 5 left). y = relu(F(x) + shortcut(x)), eq. (1)."""

    filters: int
    strides: int
    norm: Callable[..., nn.Module]
    residual: bool = True
    shortcut: str = 'B'
    stride_in_1x1: bool = True  # unused: a basic block has no 1x1 conv
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32
    canonical_grads: bool = False  # see cpu_paths.canonical_conv
    dot_1x1: bool = False  # see cpu_paths.pointwise_conv
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = _conv_factory(self)
        y = conv(self.filters, 3, self.strides, name='conv1')(x)
        y = nn.relu(self.norm(name='bn1')(y))
        y = conv(self.filters, 3, name='conv2')(y)
        y = self.norm(name='bn2', scale_init=_last_scale_init(self.zero_init_residual))(y)
        return _merge(self, x, y, self.filters)


class BottleneckBlock(nn.Module):
    """1x1 (reduce), 3x3, 1x1 (expand x4) convs (Fig. 5 right).

    ``stride_in_1x1=True`` puts the downsampling stride on the first 1x1 conv, as the
    paper's released Caffe models ("v1"); ``False`` puts it on the 3x3 ("v1.5", as
    torchvision and the Flax ImageNet example).
    """

    filters: int
    strides: int
    norm: Callable[..., nn.Module]
    residual: bool = True
    shortcut: str = 'B'
    stride_in_1x1: bool = True
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32
    canonical_grads: bool = False  # see cpu_paths.canonical_conv
    dot_1x1: bool = False  # see cpu_paths.pointwise_conv
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s1, s3 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
        conv = _conv_factory(self)
        y = conv(self.filters, 1, s1, name='conv1')(x)
        y = nn.relu(self.norm(name='bn1')(y))
        y = conv(self.filters, 3, s3, name='conv2')(y)
        y = nn.relu(self.norm(name='bn2')(y))
        y = conv(self.filters * 4, 1, name='conv3')(y)
        y = self.norm(name='bn3', scale_init=_last_scale_init(self.zero_init_residual))(y)
        return _merge(self, x, y, self.filters * 4)


def _conv_factory(module) -> Callable[..., nn.Conv]:
    return functools.partial(layers.conv, dtype=module.dtype,
                             canonical_grads=module.canonical_grads, dot_1x1=module.dot_1x1)


def _last_scale_init(zero_init: bool):
    return nn.initializers.zeros if zero_init else nn.initializers.ones


def _merge(block, x: jax.Array, y: jax.Array, features: int) -> jax.Array:
    """The addition of eq. (1)/(2) followed by the ReLU; plain nets skip the addition."""
    if block.residual:
        y = y + Shortcut(features, block.strides, block.shortcut, block.norm,
                         dtype=block.dtype, canonical_grads=block.canonical_grads,
                         dot_1x1=block.dot_1x1,
                         name='shortcut')(x)
    return nn.relu(y)


class ResNet(nn.Module):
    """A plain or residual network: a stem, stages of blocks, global average pool, fc.

    Attributes:
      stage_sizes: blocks per stage (Table 1 rows; ``(n, n, n)`` for CIFAR).
      block_cls: ``BasicBlock`` or ``BottleneckBlock``.
      num_classes: outputs of the final fc layer.
      stem: ``'imagenet'`` (7x7/2 conv 64 + 3x3/2 max pool) or ``'cifar'`` (3x3 conv 16).
      width: filters of the first stage (64 ImageNet, 16 CIFAR); doubled each stage.
      residual: False gives the plain net, the same stack without shortcuts.
      shortcut: 'A', 'B' or 'C' (Table 3).
      stride_in_1x1: bottleneck stride placement (True: v1, the paper; False: v1.5).
      zero_init_residual: start the last BN scale of each residual branch at 0.
      bn_group_size: examples per BatchNorm group in training (0: the whole batch).
      bn_momentum, bn_epsilon: BatchNorm running-average momentum and epsilon.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
      scan_blocks: run the identical blocks of each stage (all but its first) as one
        ``lax.scan`` instead of unrolled: the compiled program no longer grows with depth
        (ResNet-1202 compiles in seconds) and XLA cannot fuse across blocks. Same
        parameters, same tree, same values. ``None`` (default): on when JAX's default
        backend is the CPU, where the unrolled train step's elementwise fusions grow with
        depth, off on GPU/TPU. ``capture_intermediates`` views of the scanned blocks need
        ``scan_blocks=False`` (``summary``, ``analysis`` and ``complexity`` turn it off
        themselves). ``apply`` also takes the variables
        with each scanned group stacked (``pack``), the layout the train state keeps.
      canonical_grads: compute the k x k convolutions' gradients with
        ``cpu_paths.canonical_conv`` (the forward's layout, the weight gradient summed over
        chunks of the batch) and the stem's max pool with ``layers.max_pool(sliced=True)``:
        same parameters, same values and gradients. ``None`` (default): on for the CPU
        backend, where XLA runs those forms 1.2-4x faster; off on GPU/TPU. The scanned
        blocks use canonical convolutions whatever this says (XLA:CPU needs them in loops).
      dot_1x1: compute the 1x1 convolutions (bottlenecks, projection shortcuts) as matrix
        products (``cpu_paths.pointwise_conv``): same parameters, same values. ``None``
        (default): on for the CPU backend, where XLA's matrix products run 1.5-3x faster
        than its 1x1 convolutions; off on GPU/TPU.

    ``scan_blocks``, ``canonical_grads`` and ``dot_1x1`` write their gradients as
    ``jax.custom_vjp`` rules, which reverse-mode AD (``jax.grad``) uses and forward-mode
    AD cannot: for ``jax.jvp``, ``jax.jacfwd`` or ``jax.hessian`` set all three to
    ``False`` (the defaults on GPU/TPU), e.g. ``model.clone(scan_blocks=False,
    canonical_grads=False, dot_1x1=False)``.
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
    dtype: Dtype = jnp.float32
    scan_blocks: bool | None = None
    canonical_grads: bool | None = None
    dot_1x1: bool | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_shortcut(self.shortcut)
        scanned = [] if self.is_initializing() else self.scan_groups()  # init: unrolled
        conv = functools.partial(layers.conv, dtype=self.dtype,
                                 canonical_grads=self.uses_canonical_grads())
        norm = functools.partial(BatchNorm, use_running_average=not train,
                                 group_size=self.bn_group_size, momentum=self.bn_momentum,
                                 epsilon=self.bn_epsilon, dtype=self.dtype)
        x = jnp.asarray(x, self.dtype)
        if self.stem == 'imagenet':  # conv1 and the max pool of Table 1
            x = conv(self.width, 7, 2, name='conv1')(x)
            x = nn.relu(norm(name='bn1')(x))
            x = layers.max_pool(x, 3, 2, 1, sliced=self.uses_canonical_grads())
        elif self.stem == 'cifar':  # the first 3x3 conv of sec. 4.2
            x = conv(self.width, 3, name='conv1')(x)
            x = nn.relu(norm(name='bn1')(x))
        else:
            raise ValueError(f"unknown stem {self.stem!r}; allowed: 'imagenet', 'cifar'")

        for i, num_blocks in enumerate(self.stage_sizes):
            block = functools.partial(
                self.block_cls, filters=self.width * 2**i, norm=norm, residual=self.residual,
                shortcut=self.shortcut, stride_in_1x1=self.stride_in_1x1,
                zero_init_residual=self.zero_init_residual, dtype=self.dtype,
                canonical_grads=self.uses_canonical_grads(), dot_1x1=self.uses_dot_1x1())
            names = block_names(i, num_blocks)
            x = block(strides=2 if i > 0 else 1, name=names[0])(x)
            if names[1:] in scanned:
                x = self._scan(block(strides=1, canonical_grads=True, parent=None),
                               names[1:], x, train)
            else:
                for name in names[1:]:
                    x = block(strides=1, name=name)(x)

        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='fc')(x)
        return x.astype(jnp.float32)

    def uses_scan(self) -> bool:
        """Whether ``scan_blocks`` (resolved for the default backend) is on."""
        return _on_cpu_by_default(self.scan_blocks)

    def uses_canonical_grads(self) -> bool:
        """Whether ``canonical_grads`` (resolved for the default backend) is on."""
        return _on_cpu_by_default(self.canonical_grads)

    def uses_dot_1x1(self) -> bool:
        """Whether ``dot_1x1`` (resolved for the default backend) is on."""
        return _on_cpu_by_default(self.dot_1x1)

    def scan_groups(self) -> list[list[str]]:
        """The blocks run together as one ``lax.scan`` when ``uses_scan()``: in each stage
        of more than two blocks, all but its first."""
        if not self.uses_scan():
            return []
        return [block_names(i, n)[1:] for i, n in enumerate(self.stage_sizes) if n > 2]

    def pack(self, layers: Mapping[str, Any]) -> dict[str, Any]:
        """``layers`` with each scan group's blocks stacked under one key, ``packed_name``.

        ``layers`` is one collection of variables (``params``, ``batch_stats``) or any
        tree keyed like it (SGD's momentum). ``apply`` takes the packed layout as it is,
        so a train state kept packed runs a step with no stacking and no per-block
        write-back, and with a few stacked leaves where the model's tree has thousands
        (ResNet-1202: 3,605), which is what its compile and relaunch time grow with.
        ``unpack`` restores the model's own tree; without scanned groups both return
        ``layers`` unchanged.
        """
        out = dict(layers)
        for names in self.scan_groups():
            if names[0] in out:
                out[packed_name(names)] = _stack([out.pop(n) for n in names])
        return out

    def unpack(self, layers: Mapping[str, Any]) -> dict[str, Any]:
        """The inverse of ``pack``: every block under its own name again."""
        out = dict(layers)
        for names in self.scan_groups():
            stacked = out.pop(packed_name(names), None)
            if stacked is not None:
                out.update(zip(names, _unstack(stacked, len(names))))
        return out

    def _scan(self, block: nn.Module, names: Sequence[str], x: jax.Array,
              train: bool) -> jax.Array:
        """Applies the blocks ``names`` (same shapes) in turn, as one ``lax.scan``.

        Their variables are where the unrolled net keeps them (``params/conv2_2``, ...),
        stacked here for the scan, with the updated BatchNorm statistics written back
        block by block; or already stacked under ``packed_name(names)`` (``pack``), used
        and updated as they are. ``block`` is an unbound module of the blocks' config.
        """
        stored, key = self.variables, packed_name(names)
        stacked = {col: stored[col][key] if key in stored[col] else
                   _stack([stored[col][n] for n in names])
                   for col in ('params', 'batch_stats')}

        def body(carry, variables):
            if not train:
                return block.apply(variables, carry), None
            y, updates = block.apply(variables, carry, mutable=['batch_stats'])
            return y, updates['batch_stats']

        # The backward pass keeps the convolutions' outputs and recomputes the cheap
        # BatchNorm / ReLU / addition from them: stacking every intermediate for the loop
        # cost more memory traffic than the recomputation (CIFAR ResNet-110 on CPU: 16%
        # faster, 40% less peak memory).
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_saveable,
                              prevent_cse=False)
        x, stats = jax.lax.scan(body, x, stacked)
        if train and key in stored['batch_stats']:
            self.put_variable('batch_stats', key, stats)
        elif train:
            for name, block_stats in zip(names, _unstack(stats, len(names))):
                self.put_variable('batch_stats', name, block_stats)
        return x


def _on_cpu_by_default(flag: bool | None) -> bool:
    """A backend-selected option: ``None`` means on for the CPU backend only."""
    return jax.default_backend() == 'cpu' if flag is None else bool(flag)


def block_names(stage: int, num_blocks: int) -> list[str]:
    """The paper's names of a stage's blocks: conv2_1, conv2_2, ... for stage 0."""
    return [f'conv{stage + 2}_{j + 1}' for j in range(num_blocks)]


def _stack(trees: Sequence[Any]) -> Any:
    """Same-shaped trees as one tree of arrays with a leading axis."""
    return jax.tree_util.tree_map(lambda *v: jnp.stack(v), *trees)


def _unstack(tree: Any, n: int) -> list[Any]:
    """The inverse of ``_stack`` for ``n`` trees."""
    return [jax.tree_util.tree_map(lambda v: v[k], tree) for k in range(n)]


def packed_name(names: Sequence[str]) -> str:
    """The key of blocks ``names`` stacked by ``ResNet.pack``: 'conv2_2..conv2_200'."""
    return f'{names[0]}..{names[-1]}'


# Table 1: the ImageNet networks.
_ImageNet = functools.partial(ResNet, stem='imagenet', width=64, num_classes=1000)
_IMAGENET: dict[str, Callable[..., ResNet]] = {
    'resnet18': functools.partial(_ImageNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock),
    'resnet34': functools.partial(_ImageNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock),
    'resnet50': functools.partial(_ImageNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock),
    'resnet101': functools.partial(_ImageNet, stage_sizes=(3, 4, 23, 3),
                                   block_cls=BottleneckBlock),
    'resnet152': functools.partial(_ImageNet, stage_sizes=(3, 8, 36, 3),
                                   block_cls=BottleneckBlock),
}
# The plain counterparts (Table 2 has plain-18/34; the bottleneck ones are offered too).
_IMAGENET.update({name.replace('resnet', 'plain'): functools.partial(make, residual=False)
                  for name, make in list(_IMAGENET.items())})

# Sec. 4.2: 6n+2 layers, option A (all shortcuts parameter-free).
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
_CIFAR_NAME = re.compile(r'^cifar_(resnet|plain)(\d+)$')


def cifar(depth: int, residual: bool = True, **overrides: Any) -> ResNet:
    """The CIFAR-10 net of sec. 4.2 with ``depth = 6n + 2`` layers."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f'CIFAR depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, '
                         f'1202, ...); got {depth}.')
    n = (depth - 2) // 6
    kwargs = dict(stage_sizes=(n, n, n), block_cls=BasicBlock, stem='cifar', width=16,
                  num_classes=10, shortcut='A', residual=residual)
    kwargs.update(overrides)
    return ResNet(**kwargs)


def list_models() -> list[str]:
    """Every registered name (CIFAR nets exist for any 6n+2 depth; the paper's are listed)."""
    cifar_names = [f'cifar_{kind}{d}' for kind in ('resnet', 'plain') for d in CIFAR_DEPTHS]
    return sorted(_IMAGENET) + cifar_names


def create_model(name: str, **overrides: Any) -> ResNet:
    """Builds a model by name, e.g. ``create_model('resnet50', stride_in_1x1=False)``.

    Any ``ResNet`` attribute can be overridden (``num_classes``, ``shortcut``,
    ``dtype``, ``bn_group_size``, ...). ``dtype`` may be given as a string.
    """
    if isinstance(overrides.get('dtype'), str):
        overrides['dtype'] = jnp.dtype(overrides['dtype'])
    if 'shortcut' in overrides:
        check_shortcut(overrides['shortcut'])
    unknown = set(overrides) - set(ResNet.__dataclass_fields__) - {'parent', 'name'}
    if unknown:
        raise ValueError(f'unknown model option(s) {sorted(unknown)}; allowed: '
                         f'{sorted(f for f in ResNet.__dataclass_fields__ if f not in ("parent", "name"))}')
    if name in _IMAGENET:
        return _IMAGENET[name](**overrides)
    match = _CIFAR_NAME.match(name)
    if match:
        return cifar(int(match.group(2)), residual=match.group(1) == 'resnet', **overrides)
    raise ValueError(f'unknown model {name!r}; allowed: {", ".join(sorted(_IMAGENET))}, '
                     'cifar_resnetN and cifar_plainN with N = 6n+2 (e.g. cifar_resnet20).')
