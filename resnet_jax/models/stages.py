"""How a stage runs its identical blocks (those after its first): in turn
(``unrolled_stage``) or as one ``lax.scan`` (``scanned_stage``, the default for deep stages).

Unrolled, CIFAR ResNet-1202's 199-block stages took ~170 s to ``jax.jit(model.init)`` and
~190 s more to compile a train-mode ``apply`` on 2 CPU cores, minutes on a GPU too; scanned,
each stage is one block's program (experiments/results/performance.md, "Deep stages").
Either way the variables are each block's own, as the unrolled net names them.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models.blocks import block_names

# Of the paper's nets only ResNet-1202's stages are this deep; ResNet-152's 35 identical
# blocks compile and step as fast unrolled (performance.md).
DEEP_STAGE_BLOCKS = 64


def unrolled_stage(
    parent: nn.Module,
    make_block: Callable[..., nn.Module],
    names: Sequence[str],
    x: jax.Array,
    train: bool = False,
) -> jax.Array:
    """Applies the blocks ``names`` in turn, each a submodule of ``parent``.
    ``make_block(name=...)`` builds one, called ``block(x, train)``."""
    del parent  # the blocks are created in the calling module's scope
    for name in names:
        x = make_block(name=name)(x, train)
    return x


def scanned_stage(
    parent: nn.Module,
    make_block: Callable[..., nn.Module],
    names: Sequence[str],
    x: jax.Array,
    train: bool = False,
    min_blocks: int = DEEP_STAGE_BLOCKS,
) -> jax.Array:
    """Applies the identical blocks ``names`` as one ``lax.scan`` where there are at least
    ``min_blocks``, on their variables as the unrolled net keeps them or stacked under
    ``packed_name(names)`` (an execution plan's layout); the same values, gradients and
    BatchNorm updates as ``unrolled_stage``.

    A stage of ``DEEP_STAGE_BLOCKS`` or more is initialised scanned too, each block's
    variables drawn from its own key split from the stage's (the same distributions as
    unrolled, other draws). Random streams other than 'params' and writes to new
    collections (``sow``, ``capture_intermediates``) run the blocks unrolled, with a
    warning, so that each block keeps its own keys and outputs."""
    key = packed_name(names)
    packed = any(key in tree for tree in parent.variables.values())
    # (initialised unrolled below DEEP_STAGE_BLOCKS: a plan's model draws as the model does)
    fewest = max(min_blocks, DEEP_STAGE_BLOCKS) if parent.is_initializing() else min_blocks
    reason = _unscannable(parent, names, key) if len(names) >= fewest else None
    if len(names) < fewest or reason:
        if packed:
            raise ValueError(
                f'{key}: variables stacked for a scan cannot run unrolled '
                f"({reason or 'too few blocks'}); pass the model's own variables"
            )
        if reason:
            warnings.warn(
                f'scanned stage {key}: {reason}; running its blocks unrolled (the same function)',
                stacklevel=2,
            )
        return unrolled_stage(parent, make_block, names, x, train)

    block = make_block(parent=None)
    if parent.is_initializing():
        keys = jax.random.split(parent.make_rng('params'), len(names))
        # (a loop: vmapped, XLA:CPU compiled the random draws once per block, 55 s)
        stored = jax.lax.map(lambda k: block.init(k, x[:1], train), keys)
        for col, tree in stored.items():
            for name, value in zip(names, unstack(tree, len(names))):
                parent.put_variable(col, name, value)
        # Initialisation keeps the initial statistics (as flax's BatchNorm does unrolled).
        mutable, kept = [c for c in stored if c != 'params'], []
    else:
        collections = [c for c, tree in parent.variables.items() if key in tree or names[0] in tree]
        stored = {
            c: parent.variables[c][key]
            if packed
            else stack([parent.variables[c][n] for n in names])
            for c in collections
        }
        mutable = kept = [c for c in collections if parent.is_mutable_collection(c)]

    def body(carry, variables):
        if not mutable:
            return block.apply(variables, carry, train), None
        return block.apply(variables, carry, train, mutable=mutable)

    # Recomputing BatchNorm / ReLU / addition from the saved conv outputs: CIFAR ResNet-110
    # on CPU 16% faster, 40% less peak memory than stacking every intermediate.
    body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_saveable, prevent_cse=False)
    x, updates = jax.lax.scan(body, x, stored)
    for col in kept:
        if packed:
            parent.put_variable(col, key, updates[col])
        else:
            for name, value in zip(names, unstack(updates[col], len(names))):
                parent.put_variable(col, name, value)
    return x


def scan_groups(model: nn.Module) -> list[list[str]]:
    """The blocks ``model`` (a ``ResNet``) runs as one ``lax.scan``, per stage, outside
    initialisation (and in training, only without ``drop_path_rate``)."""
    stage, min_blocks = model.stage, DEEP_STAGE_BLOCKS
    if isinstance(stage, functools.partial):
        stage, min_blocks = stage.func, stage.keywords.get('min_blocks', min_blocks)
    if stage is not scanned_stage or model.drop_path_rate:
        return []
    groups = [block_names(i, n)[1:] for i, n in enumerate(model.stage_sizes)]
    return [g for g in groups if len(g) >= max(min_blocks, 1)]


def _unscannable(parent: nn.Module, names: Sequence[str], key: str) -> str | None:
    """Why the blocks ``names`` cannot run as one scan here, or None."""
    rngs = sorted(set(parent.scope.rngs) - {'params'})
    if rngs:
        return f'random streams {rngs}'
    if parent.is_initializing():
        return None
    held = [c for c, tree in parent.variables.items() if key in tree or names[0] in tree]
    mutable = _mutable_names(parent)
    extra = ['<filter>'] if mutable is None else [c for c in mutable if c not in held]
    return f'writes to {extra}' if extra else None


def _mutable_names(parent: nn.Module) -> list[str] | None:
    """The collections ``parent`` may write, or None when that is not a list of names."""
    mutable = parent.scope.mutable
    if mutable is False:
        return []
    if isinstance(mutable, str):
        return [mutable]
    if isinstance(mutable, (list, tuple, set, frozenset)):
        return list(mutable)
    return None


def packed_name(names: Sequence[str]) -> str:
    """The key of blocks ``names`` stacked by a plan's layout: 'conv2_2..conv2_200'."""
    return f'{names[0]}..{names[-1]}'


def stack(trees: Sequence[Any]) -> Any:
    """Trees of one structure as one, each leaf stacked on a new leading axis: one
    concatenation per leaf (an ``expand_dims`` per block and leaf made ResNet-1202's gradient
    trace 8,400 operations longer, ~9 s)."""

    def join(*leaves):
        if not leaves[0].ndim:
            return jnp.stack(leaves)
        return jax.lax.concatenate(leaves, 0).reshape(len(leaves), *leaves[0].shape)

    return jax.tree_util.tree_map(join, *trees)


def unstack(tree: Any, n: int) -> list[Any]:
    """The inverse of ``stack`` for ``n`` trees: one split of each leaf."""

    def split(v):
        if v.ndim == 1:
            return list(v)
        return jax.lax.split(v.reshape(-1, *v.shape[2:]), (v.shape[1],) * n, axis=0)

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    parts = [split(v) for v in leaves]
    return [jax.tree_util.tree_unflatten(treedef, [p[k] for p in parts]) for k in range(n)]
