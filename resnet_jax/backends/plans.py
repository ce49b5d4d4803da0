"""Execution plans: other implementations of a model's parts, with the same variables,
values and gradients, that run faster on a backend, and their compiler options.

* ``'xla'``: the model as written; only stages of ``DEEP_STAGE_BLOCKS`` or more run as
  one ``lax.scan``.
* ``'cpu'``: ``cpu_ops``' forms, each stage's identical blocks as one ``lax.scan``.
* ``'auto'``: ``'cpu'`` on the CPU backend, ``'xla'`` elsewhere.

    fast_model = plans.get_plan('auto').apply_to(model)  # research code opts in
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax

from resnet_jax import models
from resnet_jax.backends import cpu_ops
from resnet_jax.models import layers

PLANS = ('auto', 'xla', 'cpu')


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    """A model's parts replaced by faster forms of the same function (None: the model's),
    its compiler options, and ``scan_min_blocks``: a stage's identical blocks run as one
    ``lax.scan`` when there are at least this many (0: never)."""

    name: str
    conv_general_dilated: Callable[..., jax.Array] | None = None
    max_pool: Callable[..., jax.Array] | None = None
    scan_min_blocks: int = 0
    compiler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def apply_to(self, model: models.ResNet) -> models.ResNet:
        """``model`` with the plan's parts in place of its defaults (the user's stay)."""
        parts = {}
        if self.conv_general_dilated is not None and model.conv is layers.conv:
            parts['conv'] = functools.partial(
                layers.conv, conv_general_dilated=self.conv_general_dilated
            )
        if self.max_pool is not None and model.max_pool is layers.max_pool:
            parts['max_pool'] = self.max_pool
        if self.scan_groups(model):
            parts['stage'] = functools.partial(scanned_stage, min_blocks=self.scan_min_blocks)
        return model.clone(**parts) if parts else model

    def scan_groups(self, model: models.ResNet) -> list[list[str]]:
        """The blocks ``apply_to(model)`` runs as one ``lax.scan``, per stage."""
        # (with stochastic depth a stage's blocks differ in training, and run unrolled)
        if (
            not self.scan_min_blocks
            or model.stage is not models.unrolled_stage
            or model.drop_path_rate
        ):
            return []
        groups = [models.block_names(i, n)[1:] for i, n in enumerate(model.stage_sizes)]
        return [g for g in groups if len(g) >= self.scan_min_blocks]

    def jit(self, fn: Callable, **jit_options) -> Callable:
        """``jax.jit(fn, **jit_options)`` with the plan's compiler options."""
        return jax.jit(fn, compiler_options=dict(self.compiler_options) or None, **jit_options)


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """How a plan's steps hold a train state: each scanned stage's variables (and momentum,
    EMA) stacked under one key (``packed_name``), as ResNet-1202's 3,605 arrays per tree
    made its compile slow. The checkpointer converts; everything else sees the model's."""

    groups: tuple[tuple[str, ...], ...] = ()

    def from_model(self, state: Any) -> Any:
        """``state`` (the model's own tree) as the steps take it."""
        return _pack_state([list(g) for g in self.groups], state)

    def to_model(self, state: Any) -> Any:
        """The inverse of ``from_model``: the model's own tree."""
        return _unpack_state([list(g) for g in self.groups], state)


class CompiledSteps(NamedTuple):
    """Jitted ``train(state, batch)`` and ``evaluate(state, batch)``, on a state in ``layout``."""

    train: Callable
    evaluate: Callable
    layout: StateLayout


def compile_steps(
    train_step: Callable,
    eval_step: Callable,
    model: models.ResNet,
    mesh: jax.sharding.Mesh,
    execution: str = 'auto',
    compiler_options: Mapping[str, Any] | None = None,
) -> CompiledSteps:
    """``train_step(model, state, batch) -> (state, metrics)`` and ``eval_step(model, state,
    batch) -> metrics`` compiled for ``mesh`` by its platform's plan ``execution``: the
    plan's model, the state replicated (donated to ``train``; in the plan's
    ``StateLayout``), the batch split over ``mesh``; ``compiler_options`` added."""
    plan = plan_for_mesh(mesh, execution)
    if compiler_options:
        plan = dataclasses.replace(
            plan, compiler_options={**plan.compiler_options, **compiler_options}
        )
    fast = plan.apply_to(model)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    layout = StateLayout(tuple(tuple(g) for g in plan.scan_groups(model)))
    return CompiledSteps(
        plan.jit(
            functools.partial(train_step, fast),
            in_shardings=(replicated, split),
            out_shardings=replicated,
            donate_argnums=(0,),
        ),
        plan.jit(
            functools.partial(eval_step, fast),
            in_shardings=(replicated, split),
            out_shardings=replicated,
        ),
        layout,
    )


def _pack(groups: list[list[str]], layers_tree: Mapping[str, Any]) -> dict[str, Any]:
    """``layers_tree`` with each scan group's blocks stacked under ``packed_name``."""
    out = dict(layers_tree)
    for names in groups:
        if names[0] in out:
            out[packed_name(names)] = _stack([out.pop(n) for n in names])
    return out


def _unpack(groups: list[list[str]], layers_tree: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(layers_tree)
    for names in groups:
        stacked = out.pop(packed_name(names), None)
        if stacked is not None:
            out.update(zip(names, _unstack(stacked, len(names))))
    return out


def _pack_state(groups: list[list[str]], tree: Any) -> Any:
    """Every mapping in ``tree`` (a train state) that holds the model's layers, packed."""
    return (
        _map_layer_dicts(functools.partial(_pack, groups), tree, groups[0][0]) if groups else tree
    )


def _unpack_state(groups: list[list[str]], tree: Any) -> Any:
    return (
        _map_layer_dicts(functools.partial(_unpack, groups), tree, packed_name(groups[0]))
        if groups
        else tree
    )


def _map_layer_dicts(fn, tree, marker: str):
    """``fn`` applied to every mapping in ``tree`` that holds the key ``marker``."""

    def found(x):
        return isinstance(x, Mapping) and marker in x

    return jax.tree_util.tree_map(lambda x: fn(x) if found(x) else x, tree, is_leaf=found)


# Unrolled, ResNet-1202's 199-block stages take minutes to compile on CPU and GPU alike.
DEEP_STAGE_BLOCKS = 64

XLA = ExecutionPlan('xla', scan_min_blocks=DEEP_STAGE_BLOCKS)
CPU_SCAN_MIN_BLOCKS = 2


@functools.cache
def cpu_plan() -> ExecutionPlan:
    return ExecutionPlan(
        'cpu',
        conv_general_dilated=cpu_ops.conv_general_dilated,
        max_pool=cpu_ops.sliced_max_pool,
        scan_min_blocks=CPU_SCAN_MIN_BLOCKS,
        compiler_options=_cpu_compiler_options(),
    )


def get_plan(execution: str = 'auto', platform: str | None = None) -> ExecutionPlan:
    """The plan ``execution`` ('auto', 'xla', 'cpu') for JAX ``platform`` (default:
    ``jax.default_backend()``); ValueError for another name."""
    if execution not in PLANS:
        raise ValueError(f'unknown execution {execution!r}; allowed: {", ".join(PLANS)}')
    platform = platform or jax.default_backend()
    if execution == 'auto':
        execution = 'cpu' if platform == 'cpu' else 'xla'
    return cpu_plan() if execution == 'cpu' else XLA


def plan_for_mesh(mesh: jax.sharding.Mesh, execution: str = 'auto') -> ExecutionPlan:
    return get_plan(execution, mesh.devices.flat[0].platform)


# YNNPACK (jax 0.10) runs each convolution on one thread, Eigen on every core, but its
# reductions (BatchNorm's statistics) faster: only those go to it (performance.md).
_CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}


def _cpu_compiler_options() -> dict:
    kept = {}
    one = jax.device_put(1.0, jax.devices('cpu')[0])  # compiled for the CPU backend
    for key, value in _CPU_OPTIONS.items():
        try:
            jax.jit(lambda x: x + 1, compiler_options={key: value}).lower(one).compile()
        except jax.errors.JaxRuntimeError:
            continue
        kept[key] = value
    return kept


def packed_name(names: Sequence[str]) -> str:
    """The key of blocks ``names`` stacked by a ``StateLayout``: 'conv2_2..conv2_200'."""
    return f'{names[0]}..{names[-1]}'


def _stack(trees: Sequence[Any]) -> Any:
    def stack(*leaves):
        return jax.lax.concatenate([jax.lax.expand_dims(v, (0,)) for v in leaves], 0)

    return jax.tree_util.tree_map(stack, *trees)


def _unstack(tree: Any, n: int) -> list[Any]:
    """The inverse of ``_stack`` for ``n`` trees: one split of each stacked leaf (rather
    than ``n`` indexing operations, which a deep net's step spends seconds tracing)."""

    def split(v):
        return [jax.lax.squeeze(part, (0,)) for part in jax.lax.split(v, (1,) * n, axis=0)]

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    parts = [split(v) for v in leaves]
    return [jax.tree_util.tree_unflatten(treedef, [p[k] for p in parts]) for k in range(n)]


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


def scanned_stage(
    parent: nn.Module,
    make_block: Callable[..., nn.Module],
    names: Sequence[str],
    x: jax.Array,
    train: bool = False,
    min_blocks: int = 2,
) -> jax.Array:
    """Applies the identical blocks ``names`` as one ``lax.scan`` (a ``ResNet.stage``), on
    their variables as the unrolled net keeps them or stacked under ``packed_name(names)``.
    Initialisation, fewer than ``min_blocks`` blocks, random streams other than 'params'
    and writes to new collections (``sow``) run them unrolled, the last two with a warning."""
    key = packed_name(names)
    packed = any(key in tree for tree in parent.variables.values())
    collections = [col for col, tree in parent.variables.items() if key in tree or names[0] in tree]
    reason = None
    if not parent.is_initializing():
        rngs = sorted(set(parent.scope.rngs) - {'params'})
        mutable = _mutable_names(parent)
        extra = ['<filter>'] if mutable is None else [c for c in mutable if c not in collections]
        if rngs:
            reason = f'random streams {rngs}'
        elif extra:
            reason = f'writes to {extra}'
    if parent.is_initializing() or len(names) < min_blocks or reason:
        if packed:
            raise ValueError(
                f'{key}: variables stacked for a scan cannot run unrolled '
                f"({reason or 'initialisation'}); pass the model's own variables"
            )
        if reason:
            warnings.warn(
                f'scanned stage {key}: {reason}; running its blocks unrolled (the same function)',
                stacklevel=2,
            )
        return models.unrolled_stage(parent, make_block, names, x, train)

    stored = {
        col: parent.variables[col][key]
        if packed
        else _stack([parent.variables[col][n] for n in names])
        for col in collections
    }
    mutable = [col for col in collections if parent.is_mutable_collection(col)]
    block = make_block(parent=None)

    def body(carry, variables):
        if not mutable:
            return block.apply(variables, carry, train), None
        return block.apply(variables, carry, train, mutable=mutable)

    # Recomputing BatchNorm / ReLU / addition from the saved conv outputs: CIFAR ResNet-110
    # on CPU 16% faster, 40% less peak memory than stacking every intermediate.
    body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_saveable, prevent_cse=False)
    x, updates = jax.lax.scan(body, x, stored)
    for col in mutable:
        if packed:
            parent.put_variable(col, key, updates[col])
        else:
            for name, value in zip(names, _unstack(updates[col], len(names))):
                parent.put_variable(col, name, value)
    return x
