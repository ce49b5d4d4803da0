"""Execution plans: how the paper's networks run fastest on a backend, computing the same.

``resnet_jax.models`` builds the paper's network with plain ``lax`` operations, the same
program on every backend. An execution plan hands a model other implementations of the
same function (``apply_to``), lays out the train state for them (``pack`` / ``unpack``)
and gives the compiler options of the programs that run them:

* ``'xla'``: the model as written, XLA's defaults; only stages of at least
  ``DEEP_STAGE_BLOCKS`` identical blocks (CIFAR ResNet-1202's 199) run as one
  ``lax.scan``, so that the program XLA compiles does not grow with depth. Every net of
  Table 1 and the CIFAR nets up to ResNet-110 stay unrolled.
* ``'cpu'``: the forms XLA:CPU runs fastest (``resnet_jax.cpu_paths``): k x k
  convolutions whose gradients are convolutions in the forward's layout, the weight
  gradient summed over chunks of the batch; 1x1 convolutions as matrix products; the
  stem's max pool as strided slices; each stage's identical blocks as one ``lax.scan``
  (the program no longer grows with depth); the train state with those blocks' variables
  stacked; convolutions left to XLA's multi-threaded kernels. Same parameters, same values
  and gradients (``tests/test_execution.py``); forward-mode AD cannot go through it.
* ``'auto'``: ``'cpu'`` on the CPU backend, ``'xla'`` elsewhere.

The train loop, ``resnet_jax.benchmark`` and ``resnet_jax.evaluate`` choose the plan from
their mesh's platform (``config.execution``). Research code opts in with one call::

    plan = execution.get_plan('auto')          # for jax.default_backend()
    fast_model = plan.apply_to(model)          # same variables, same function
    step = jax.jit(fn, compiler_options=plan.compiler_options)

XLA:CPU reads some options only from the process's ``XLA_FLAGS``, when JAX starts its
backends: the launchers call ``configure_process(model)`` first thing, which adds the CPU
plan's for deep nets (``PROCESS_OPTIONS``); research code may too, before its first JAX
computation.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import warnings
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax import cpu_paths, layers, models

PLANS = ('auto', 'xla', 'cpu')


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    """Parts of a model replaced by faster forms of the same function, and the layout and
    compiler options that go with them.

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

    def pack(self, model: models.ResNet, layers_tree: Mapping[str, Any]) -> dict[str, Any]:
        """``layers_tree`` (one collection of variables, or any tree keyed like it, e.g. the
        momentum) with each scan group's blocks stacked under one key (``packed_name``).

        ``apply_to(model)`` takes the packed layout as it is, so a train state kept packed
        runs a step with no stacking and no per-block write-back, and with a few stacked
        leaves where the model's tree has thousands (ResNet-1202: 3,605), which is what its
        compile and relaunch time grow with. ``unpack`` restores the model's own tree.
        """
        out = dict(layers_tree)
        for names in self.scan_groups(model):
            if names[0] in out:
                out[packed_name(names)] = _stack([out.pop(n) for n in names])
        return out

    def unpack(self, model: models.ResNet, layers_tree: Mapping[str, Any]) -> dict[str, Any]:
        """The inverse of ``pack``: every block under its own name again."""
        out = dict(layers_tree)
        for names in self.scan_groups(model):
            stacked = out.pop(packed_name(names), None)
            if stacked is not None:
                out.update(zip(names, _unstack(stacked, len(names))))
        return out

    def pack_state(self, model: models.ResNet, tree: Any) -> Any:
        """Every mapping in ``tree`` (e.g. a train state) that holds the model's layers,
        packed."""
        groups = self.scan_groups(model)
        return (_map_layer_dicts(functools.partial(self.pack, model), tree, groups[0][0])
                if groups else tree)

    def unpack_state(self, model: models.ResNet, tree: Any) -> Any:
        """The inverse of ``pack_state``: the model's own tree, as checkpoints store it."""
        groups = self.scan_groups(model)
        return (_map_layer_dicts(functools.partial(self.unpack, model), tree,
                                 packed_name(groups[0])) if groups else tree)


def _map_layer_dicts(fn, tree, marker: str):
    """``fn`` applied to every mapping in ``tree`` that holds the key ``marker``."""
    def found(x):
        return isinstance(x, Mapping) and marker in x
    return jax.tree_util.tree_map(lambda x: fn(x) if found(x) else x, tree, is_leaf=found)


# --- choosing a plan -------------------------------------------------------------------------

# A stage with this many identical blocks runs as one lax.scan on every plan: unrolled,
# CIFAR ResNet-1202 (199 per stage) took minutes to compile on XLA:CPU and did not finish
# init, compile and three steps within 75 s on an H200; ResNet-152's 35 stay unrolled.
DEEP_STAGE_BLOCKS = 64

XLA = ExecutionPlan('xla', scan_min_blocks=DEEP_STAGE_BLOCKS)
CPU_SCAN_MIN_BLOCKS = 2  # the CPU plan scans every stage's identical blocks


@functools.cache
def cpu_plan() -> ExecutionPlan:
    """The XLA:CPU plan (see the module docstring)."""
    return ExecutionPlan('cpu', conv_general_dilated=cpu_paths.conv_general_dilated,
                         max_pool=cpu_paths.sliced_max_pool,
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
# ran each convolution on one thread here, where XLA's own (Eigen) convolutions use every
# core: 3x3 convolutions of CIFAR ResNets at batch 128 on 2 cores ran at 215-235 GFLOP/s
# with YNNPACK and 340-400 without. Its reductions stay (BatchNorm's statistics, 30%
# slower without), so only those are handed to it. Each option is kept where this
# XLA:CPU has it.
_CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}


def _cpu_compiler_options() -> dict:
    """Those of ``_CPU_OPTIONS`` that this XLA:CPU has (the others: its defaults)."""
    kept = {}
    for key, value in _CPU_OPTIONS.items():
        try:
            jax.jit(lambda x: x + 1, backend='cpu',
                    compiler_options={key: value}).lower(1.0).compile()
        except jax.errors.JaxRuntimeError:
            continue
        kept[key] = value
    return kept


# XLA:CPU backend options (``--xla_backend_extra_options``) of the CPU plan for deep nets.
# XLA reads them from the process's XLA_FLAGS only (jax.jit's compiler_options cannot
# carry that map option), once, when JAX starts its backends: a launcher sets them first
# thing, for the net it will run (``configure_process``). Other backends ignore them (XLA
# hands only options without the 'xla_' prefix to LLVM; only XLA:CPU reads these keys).
#
# Each option is set for a net whose longest scanned stage has at least its number of
# blocks. Disabling LLVM's loop unrolling and SLP vectorizer on the loop kernels cuts the
# compile of a CIFAR net's train step by 12-40% (ResNet-56 and deeper: 8 blocks, their
# steps unchanged; ResNet-20's and 32's keep XLA's defaults). Multi-output fusion makes
# sibling fusions that read one operand one kernel, e.g. the weight gradient's per-chunk
# transposes of one input: it cuts the compile most, but that kernel runs on one thread,
# and on an AVX-512 host ResNet-56's and 110's steps took 11% longer with it (1.43 / 2.68 s
# against 1.28 / 2.42 s with the other two alone). So only nets of 64-block stages get it
# (ResNet-1202: `benchmark` compile 10.3 s without it, 4.1 s with it;
# experiments/results/performance.md).
PROCESS_OPTIONS = {'xla_cpu_disable_loop_unrolling': 8, 'xla_cpu_disable_slp_vectorizer': 8,
                   'xla_cpu_use_multi_output_fusion': 64}

_EXTRA_OPTIONS = re.compile(r'--xla_backend_extra_options=(\S*)')


def process_options_for(model: models.ResNet, execution: str = 'auto') -> tuple[str, ...]:
    """The XLA:CPU process options (those of ``PROCESS_OPTIONS`` for the depth of its
    longest scanned stage) of a launch that runs ``model`` with the plan ``execution``
    ('auto', 'cpu'; 'xla': none)."""
    if execution not in PLANS:
        raise ValueError(f'unknown execution {execution!r}; allowed: {", ".join(PLANS)}')
    if execution == 'xla':
        return ()
    groups = ExecutionPlan('cpu', scan_min_blocks=CPU_SCAN_MIN_BLOCKS).scan_groups(model)
    blocks = max(map(len, groups), default=0)
    return tuple(o for o, least in PROCESS_OPTIONS.items() if blocks >= least)


def _backend_options(xla_flags: str) -> list[str]:
    match = _EXTRA_OPTIONS.search(xla_flags)
    return [o for o in (match.group(1).split(',') if match else []) if o]


def _key(option: str) -> str:
    """A backend option's name ('name' or 'name=value')."""
    return option.split('=', 1)[0]


def xla_flags_with(options: Sequence[str], xla_flags: str = '') -> str:
    """``xla_flags`` (an XLA_FLAGS value) with ``options`` added to its
    ``--xla_backend_extra_options`` (its other options kept, one such flag in all)."""
    given = _backend_options(xla_flags)
    keys = set(map(_key, given))
    added = [o for o in options if _key(o) not in keys]
    if not added:
        return xla_flags
    rest = _EXTRA_OPTIONS.sub('', xla_flags).split()
    return ' '.join([*rest, f'--xla_backend_extra_options={",".join(given + added)}'])


def process_options() -> list[str]:
    """Those of ``PROCESS_OPTIONS`` that this process's ``XLA_FLAGS`` holds."""
    keys = set(map(_key, _backend_options(os.environ.get('XLA_FLAGS', ''))))
    return [o for o in PROCESS_OPTIONS if o in keys]


def configure_process(model: models.ResNet, execution: str = 'auto') -> tuple[str, ...]:
    """Adds the process options of a launch that runs ``model`` (``process_options_for``)
    to ``XLA_FLAGS``, where XLA reads them when JAX starts its backends, and returns them.
    Call it before the process's first JAX computation (the launchers do); after it, XLA
    has read its flags already: this warns and sets nothing."""
    from jax._src import xla_bridge

    options = process_options_for(model, execution)
    current = os.environ.get('XLA_FLAGS', '')
    flags = xla_flags_with(options, current)
    if flags == current:
        return options
    if xla_bridge.backends_are_initialized():
        warnings.warn('execution.configure_process(): JAX has started its backends, so XLA '
                      f'read XLA_FLAGS already; {", ".join(options)} not set',
                      stacklevel=2)
        return ()
    os.environ['XLA_FLAGS'] = flags
    return options


# --- scanned stages --------------------------------------------------------------------------

def packed_name(names: Sequence[str]) -> str:
    """The key of blocks ``names`` stacked by ``ExecutionPlan.pack``: 'conv2_2..conv2_200'."""
    return f'{names[0]}..{names[-1]}'


def _stack(trees: Sequence[Any]) -> Any:
    """Same-shaped trees as one tree of arrays with a leading axis."""
    return jax.tree_util.tree_map(lambda *v: jnp.stack(v), *trees)


def _unstack(tree: Any, n: int) -> list[Any]:
    """The inverse of ``_stack`` for ``n`` trees."""
    return [jax.tree_util.tree_map(lambda v: v[k], tree) for k in range(n)]


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
    (``ExecutionPlan.pack``), used and updated as they are. Every collection the blocks
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
            raise ValueError(f'{key}: variables packed by ExecutionPlan.pack cannot run '
                             f'unrolled ({reason or "initialisation"}); unpack them first')
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
