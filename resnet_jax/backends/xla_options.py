"""XLA:CPU options that a launcher sets in ``XLA_FLAGS`` before JAX starts its backends.

XLA reads its backend options (``--xla_backend_extra_options``) from the process's
``XLA_FLAGS`` only, once, when JAX starts its backends; ``jax.jit``'s
``compiler_options`` cannot carry them. This module imports no JAX: the launchers call
``configure`` after the config is validated and before the first JAX computation. Other
backends ignore these options (only XLA:CPU reads these keys).

Each option is set for a net whose longest scanned stage (its identical blocks) has at
least the number of blocks given in ``PROCESS_OPTIONS``: disabling LLVM's loop unrolling
and SLP vectorizer on the loop kernels shortens the compile of a CIFAR net's train step
from ResNet-56 on, its step unchanged; multi-output fusion shortens it most but makes
the weight gradient's sibling transposes one single-threaded kernel, so only the nets of
64-block stages (ResNet-1202) get it. The measurements are in
``experiments/results/performance.md``.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

PROCESS_OPTIONS = {'xla_cpu_disable_loop_unrolling': 8, 'xla_cpu_disable_slp_vectorizer': 8,
                   'xla_cpu_use_multi_output_fusion': 64}
PLANS_WITH_OPTIONS = ('auto', 'cpu')  # the execution plans whose launches set them

_EXTRA_OPTIONS = re.compile(r'--xla_backend_extra_options=(\S*)')


def options_for(stage_sizes: Sequence[int], execution: str = 'auto') -> tuple[str, ...]:
    """The options of a launch that runs a net of ``stage_sizes`` blocks per stage with the
    plan ``execution`` ('auto' and 'cpu': the CPU plan's scans, every stage's blocks but
    its first; 'xla': none)."""
    if execution not in PLANS_WITH_OPTIONS:
        return ()
    blocks = max((n - 1 for n in stage_sizes), default=0)
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


def configure(stage_sizes: Sequence[int], execution: str = 'auto') -> tuple[str, ...]:
    """Adds the options of a launch (``options_for``) to ``XLA_FLAGS`` and returns them.
    Call it before the process's first JAX computation: XLA reads the variable once, when
    JAX starts its backends (research code: ``configure(model.stage_sizes)`` first
    thing)."""
    options = options_for(stage_sizes, execution)
    os.environ['XLA_FLAGS'] = xla_flags_with(options, os.environ.get('XLA_FLAGS', ''))
    return options
