"""Execution plans: how the paper's networks run fastest on a backend, computing the same.

``resnet_jax.models`` builds the paper's network with plain ``lax`` operations, the same
program on every backend. An execution plan hands a model other implementations of the
same function (``apply_to``) and gives the compiler options of the programs that run them:

* ``'xla'``: the model as written, XLA's defaults; only stages of at least
  ``DEEP_STAGE_BLOCKS`` identical blocks (CIFAR ResNet-1202's 199) run as one
  ``lax.scan``, so that the program XLA compiles does not grow with depth. Every net of
  Table 1 and the CIFAR nets up to ResNet-110 stay unrolled.
* ``'cpu'``: the forms XLA:CPU runs fastest (``resnet_jax.backends.cpu_ops``): k x k
  convolutions whose gradients are convolutions in the forward's layout, the weight
  gradient summed over chunks of the batch; 1x1 convolutions as matrix products; the
  stem's max pool as strided slices; each stage's identical blocks as one ``lax.scan``
  (the program no longer grows with depth); convolutions left to XLA's multi-threaded
  kernels. Same parameters, same values and gradients (``tests/backends``); forward-mode
  AD cannot go through it.
* ``'auto'``: ``'cpu'`` on the CPU backend, ``'xla'`` elsewhere.

The train loop, the benchmark and evaluation choose the plan once, from their mesh's
platform (``config.execution``), and hand it the steps to compile (``compile_steps``),
which run on the plan's ``StateLayout`` of the train state; the checkpointer converts it
to and from the model's own tree, the only layout checkpoints, evaluation and research
code see. Research code opts in with one call::

    plan = plans.get_plan('auto')              # for jax.default_backend()
    fast_model = plan.apply_to(model)          # same variables, same function
    step = jax.jit(fn, compiler_options=dict(plan.compiler_options) or None)

XLA:CPU reads some options only from the process's ``XLA_FLAGS``, before JAX starts its
backends: see ``resnet_jax.backends.xla_options``.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax

from resnet_jax import models
from resnet_jax.backends import cpu_ops
from resnet_jax.models import layers

PLANS = ('auto', 'xla', 'cpu')


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    """Parts of a model replaced by faster forms of the same function, and the compiler
    options that go with them.

    Attributes:
      name: 'xla' or 'cpu'.
      conv_general_dilated: the convolution the model's convs compute with (None: lax's).
      max_pool: the stem's max pool (None: ``layers.max_pool``).
      scan_min_blocks: a stage's identical blocks (all but its first) run as one
        ``lax.scan`` when there are at least this many (0: never).
      compiler_options: XLA options for every program that runs the model.
    """

    name: str
    conv_general_dilated: Callable[..., jax.Array] | None = None
    max_pool: Callable[..., jax.Array] | None = None
    scan_min_blocks: int = 0
    compiler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def apply_to(self, model: models.ResNet) -> models.ResNet:
        """``model`` with the plan's parts in place of its default ones (parts handed in by
        the user stay): the same variables, the same function."""
        parts = {}
        if self.conv_general_dilated is not None and model.conv is layers.conv:
            parts['conv'] = functools.partial(layers.conv,
                                              conv_general_dilated=self.conv_general_dilated)
        if self.max_pool is not None and model.max_pool is layers.max_pool:
            parts['max_pool'] = self.max_pool
        if self.scan_groups(model):
            parts['stage'] = functools.partial(scanned_stage, min_blocks=self.scan_min_blocks)
        return model.clone(**parts) if parts else model

    def scan_groups(self, model: models.ResNet) -> list[list[str]]:
        """The blocks ``apply_to(model)`` runs as one ``lax.scan``, per stage."""
        if not self.scan_min_blocks or model.stage is not models.unrolled_stage:
            return []
        groups = [models.block_names(i, n)[1:] for i, n in enumerate(model.stage_sizes)]
        return [g for g in groups if len(g) >= self.scan_min_blocks]

    def jit(self, fn: Callable, **jit_options) -> Callable:
        """``jax.jit(fn, **jit_options)`` with the plan's compiler options."""
        return jax.jit(fn, compiler_options=dict(self.compiler_options) or None,
                       **jit_options)


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """How a plan's compiled steps hold a train state: the model's own tree, or, where the
    plan scans a stage's identical blocks, with their variables (and every tree keyed like
    them: the momentum, an EMA) stacked under one key per stage (``packed_name``). A step
    then runs with no stacking and no per-block write-back, on a few stacked arrays where
    the model's tree has one per block (ResNet-1202: 3,605 per tree), which is what the
    size of its program, and its compile time, grow with.

    The checkpointer is the one place that converts: ``from_model`` when a run starts (a
    fresh, restored or pretrained state), ``to_model`` when it saves, so that checkpoints,
    evaluation and research code see only the model's own tree."""

    groups: tuple[tuple[str, ...], ...] = ()

    def from_model(self, state: Any) -> Any:
        """``state`` (the model's own tree) as the steps take it."""
        return _pack_state([list(g) for g in self.groups], state)

    def to_model(self, state: Any) -> Any:
        """The inverse of ``from_model``: the model's own tree."""
        return _unpack_state([list(g) for g in self.groups], state)


class CompiledSteps(NamedTuple):
    """What ``compile_steps`` returns: the jitted ``train(state, batch) -> (state,
    metrics)`` and ``evaluate(state, batch) -> metrics``, on a state in ``layout``."""
    train: Callable
    evaluate: Callable
    layout: StateLayout


def compile_steps(train_step: Callable, eval_step: Callable, model: models.ResNet,
                  mesh: jax.sharding.Mesh, execution: str = 'auto',
                  compiler_options: Mapping[str, Any] | None = None) -> CompiledSteps:
    """The train and eval steps of ``model``, compiled for the devices of ``mesh`` by the
    plan ``execution`` of their platform.

    ``train_step(model, state, batch) -> (state, metrics)`` and ``eval_step(model, state,
    batch) -> metrics`` are pure functions of a train state whose ``params`` and
    ``batch_stats`` are keyed like the model's variables. They run with the plan's model
    (``apply_to``), the state replicated and the batch split along its first axis over
    ``mesh`` (XLA inserts the gradient all-reduce), the state donated to the train step,
    which takes and returns it in the plan's ``StateLayout``. ``compiler_options`` are
    added to the plan's own.
    """
    plan = plan_for_mesh(mesh, execution)
    if compiler_options:
        plan = dataclasses.replace(plan, compiler_options={**plan.compiler_options,
                                                           **compiler_options})
    fast = plan.apply_to(model)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    layout = StateLayout(tuple(tuple(g) for g in plan.scan_groups(model)))
    return CompiledSteps(
        plan.jit(functools.partial(train_step, fast), in_shardings=(replicated, split),
                 out_shardings=replicated, donate_argnums=(0,)),
        plan.jit(functools.partial(eval_step, fast), in_shardings=(replicated, split),
                 out_shardings=replicated),
        layout)


# --- the scanned blocks' variables, stacked (StateLayout) -----------------------------------

def _pack(groups: list[list[str]], layers_tree: Mapping[str, Any]) -> dict[str, Any]:
    """``layers_tree`` (one collection of variables, or any tree keyed like it, e.g. the
    momentum) with each scan group's blocks stacked under one key (``packed_name``), the
    layout ``scanned_stage`` takes as it is."""
    out = dict(layers_tree)
    for names in groups:
        if names[0] in out:
            out[packed_name(names)] = _stack([out.pop(n) for n in names])
    return out


def _unpack(groups: list[list[str]], layers_tree: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of ``_pack``: every block under its own name again."""
    out = dict(layers_tree)
    for names in groups:
        stacked = out.pop(packed_name(names), None)
        if stacked is not None:
            out.update(zip(names, _unstack(stacked, len(names))))
    return out


def _pack_state(groups: list[list[str]], tree: Any) -> Any:
    """Every mapping in ``tree`` (a train state) that holds the model's layers, packed."""
    return (_map_layer_dicts(functools.partial(_pack, groups), tree, groups[0][0])
            if groups else tree)


def _unpack_state(groups: list[list[str]], tree: Any) -> Any:
    """The inverse of ``_pack_state``: the model's own tree."""
    return (_map_layer_dicts(functools.partial(_unpack, groups), tree,
                             packed_name(groups[0])) if groups else tree)


def _map_layer_dicts(fn, tree, marker: str):
    """``fn`` applied to every mapping in ``tree`` that holds the key ``marker``."""
    def found(x):
        return isinstance(x, Mapping) and marker in x
    return jax.tree_util.tree_map(lambda x: fn(x) if found(x) else x, tree, is_leaf=found)


# --- choosing a plan -------------------------------------------------------------------------

# A stage with this many identical blocks runs as one lax.scan on every plan: unrolled,
# CIFAR ResNet-1202 (199 per stage) takes minutes to compile, on XLA:CPU and on a GPU
# alike; ResNet-152's 35 stay unrolled.
DEEP_STAGE_BLOCKS = 64

XLA = ExecutionPlan('xla', scan_min_blocks=DEEP_STAGE_BLOCKS)
CPU_SCAN_MIN_BLOCKS = 2  # the CPU plan scans every stage's identical blocks


@functools.cache
def cpu_plan() -> ExecutionPlan:
    """The XLA:CPU plan (see the module docstring)."""
    return ExecutionPlan('cpu', conv_general_dilated=cpu_ops.conv_general_dilated,
                         max_pool=cpu_ops.sliced_max_pool,
                         scan_min_blocks=CPU_SCAN_MIN_BLOCKS,
                         compiler_options=_cpu_compiler_options())


def get_plan(execution: str = 'auto', platform: str | None = None) -> ExecutionPlan:
    """The plan named ``execution`` ('auto', 'xla', 'cpu') for ``platform`` (a JAX
    platform such as 'cpu', 'gpu', 'tpu'; default: ``jax.default_backend()``)."""
    if execution not in PLANS:
        raise ValueError(f'unknown execution {execution!r}; allowed: {", ".join(PLANS)}')
    platform = platform or jax.default_backend()
    if execution == 'auto':
        execution = 'cpu' if platform == 'cpu' else 'xla'
    return cpu_plan() if execution == 'cpu' else XLA


def plan_for_mesh(mesh: jax.sharding.Mesh, execution: str = 'auto') -> ExecutionPlan:
    """The plan for the devices of ``mesh`` (what the train loop, the benchmark and
    evaluation run)."""
    return get_plan(execution, mesh.devices.flat[0].platform)


# XLA:CPU (jax 0.10) hands convolutions, matrix products and reductions to YNNPACK, which
# runs each convolution on one thread, where XLA's own (Eigen) convolutions use every
# core; its reductions (BatchNorm's statistics) are faster, so only those are handed to
# it (experiments/results/performance.md). Each option is kept where this XLA:CPU has it.
_CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}


def _cpu_compiler_options() -> dict:
    """Those of ``_CPU_OPTIONS`` that this XLA:CPU has (the others: its defaults)."""
    kept = {}
    one = jax.device_put(1.0, jax.devices('cpu')[0])  # compiled for the CPU backend
    for key, value in _CPU_OPTIONS.items():
        try:
            jax.jit(lambda x: x + 1, compiler_options={key: value}).lower(one).compile()
        except jax.errors.JaxRuntimeError:
            continue
        kept[key] = value
    return kept


# --- scanned stages --------------------------------------------------------------------------

def packed_name(names: Sequence[str]) -> str:
    """The key of blocks ``names`` stacked by a ``StateLayout``: 'conv2_2..conv2_200'."""
    return f'{names[0]}..{names[-1]}'


def _stack(trees: Sequence[Any]) -> Any:
    """Same-shaped trees as one tree of arrays with a leading axis."""
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


def scanned_stage(parent: nn.Module, make_block: Callable[..., nn.Module],
                  names: Sequence[str], x: jax.Array, min_blocks: int = 2) -> jax.Array:
    """Applies the identical blocks ``names`` as one ``lax.scan`` (a ``ResNet.stage``).

    Their variables are where the unrolled net keeps them (``params/conv2_2``, ...),
    stacked here for the scan, with the updated mutable collections (BatchNorm statistics)
    written back block by block; or already stacked under ``packed_name(names)``
    (a ``StateLayout``), used and updated as they are. Every collection the blocks
    have is scanned. Initialisation, fewer than ``min_blocks`` blocks, random streams
    other than 'params' (dropout), and writes to collections the blocks do not have yet
    (``capture_intermediates``, ``sow``) run the blocks unrolled: the same function, every
    block its own submodule (the last three with a one-line warning).
    """
    key = packed_name(names)
    packed = any(key in tree for tree in parent.variables.values())
    collections = [col for col, tree in parent.variables.items()
                   if key in tree or names[0] in tree]
    reason = None
    if not parent.is_initializing():
        rngs = sorted(set(parent.scope.rngs) - {'params'})
        mutable = _mutable_names(parent)
        extra = (['<filter>'] if mutable is None
                 else [c for c in mutable if c not in collections])
        if rngs:
            reason = f'random streams {rngs}'
        elif extra:
            reason = f'writes to {extra}'
    if parent.is_initializing() or len(names) < min_blocks or reason:
        if packed:
            raise ValueError(f'{key}: variables stacked for a scan cannot run unrolled '
                             f'({reason or "initialisation"}); pass the model\'s own variables')
        if reason:
            warnings.warn(f'scanned stage {key}: {reason}; running its blocks unrolled '
                          '(the same function)', stacklevel=2)
        return models.unrolled_stage(parent, make_block, names, x)

    stored = {col: parent.variables[col][key] if packed else
              _stack([parent.variables[col][n] for n in names]) for col in collections}
    mutable = [col for col in collections if parent.is_mutable_collection(col)]
    block = make_block(parent=None)

    def body(carry, variables):
        if not mutable:
            return block.apply(variables, carry), None
        return block.apply(variables, carry, mutable=mutable)

    # The backward pass keeps the convolutions' outputs and recomputes the cheap
    # BatchNorm / ReLU / addition from them: stacking every intermediate for the loop
    # cost more memory traffic than the recomputation (CIFAR ResNet-110 on CPU: 16%
    # faster, 40% less peak memory).
    body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_saveable,
                          prevent_cse=False)
    x, updates = jax.lax.scan(body, x, stored)
    for col in mutable:
        if packed:
            parent.put_variable(col, key, updates[col])
        else:
            for name, value in zip(names, _unstack(updates[col], len(names))):
                parent.put_variable(col, name, value)
    return x
