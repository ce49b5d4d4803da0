"""Execution plans: other implementations of a model's parts, with the same variables,
values and gradients, that run faster on a backend, and their compiler options.

* ``'xla'``: the model as written (which scans its deep stages itself, ``models.stages``).
* ``'cpu'``: ``cpu_ops``' forms, each stage's identical blocks as one ``lax.scan``.
* ``'auto'``: ``'cpu'`` on the CPU backend, ``'xla'`` elsewhere.

    fast_model = plans.get_plan('auto').apply_to(model)  # research code opts in
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

from resnet_jax import models
from resnet_jax.backends import cpu_ops
from resnet_jax.models import layers, stages
from resnet_jax.models.stages import packed_name

PLANS = ('auto', 'xla', 'cpu')


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    """A model's parts replaced by faster forms of the same function (None: the model's),
    its compiler options, and ``scan_min_blocks``: a stage's identical blocks run as one
    ``lax.scan`` when there are at least this many (0: where the model's own stage does)."""

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
        if self.scan_min_blocks and model.stage is models.scanned_stage:
            parts['stage'] = functools.partial(
                models.scanned_stage, min_blocks=self.scan_min_blocks
            )
        return model.clone(**parts) if parts else model

    def scan_groups(self, model: models.ResNet) -> list[list[str]]:
        """The blocks ``apply_to(model)`` runs as one ``lax.scan``, per stage."""
        return models.scan_groups(self.apply_to(model))

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
            out[packed_name(names)] = stages.stack([out.pop(n) for n in names])
    return out


def _unpack(groups: list[list[str]], layers_tree: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(layers_tree)
    for names in groups:
        stacked = out.pop(packed_name(names), None)
        if stacked is not None:
            out.update(zip(names, stages.unstack(stacked, len(names))))
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


XLA = ExecutionPlan('xla')
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
