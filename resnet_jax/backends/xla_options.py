"""XLA options a launcher sets in ``XLA_FLAGS``: XLA reads them there only, once, when JAX
starts (``jit``'s ``compiler_options`` cannot carry them). Imports no JAX."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Sequence

# Least blocks in the longest scanned stage per option: the first two shorten the compile
# from ResNet-56 on; multi-output fusion makes the weight gradient's transposes one
# single-threaded kernel, so only ResNet-1202 gets it (experiments/results/performance.md).
PROCESS_OPTIONS = {
    'xla_cpu_disable_loop_unrolling': 8,
    'xla_cpu_disable_slp_vectorizer': 8,
    'xla_cpu_use_multi_output_fusion': 64,
}
PLANS_WITH_OPTIONS = ('auto', 'cpu')

_EXTRA_OPTIONS = re.compile(r'--xla_backend_extra_options=(\S*)')


def options_for(stage_sizes: Sequence[int], execution: str = 'auto') -> tuple[str, ...]:
    """The options for a net of ``stage_sizes`` blocks per stage run by plan ``execution``."""
    if execution not in PLANS_WITH_OPTIONS:
        return ()
    blocks = max((n - 1 for n in stage_sizes), default=0)
    return tuple(o for o, least in PROCESS_OPTIONS.items() if blocks >= least)


def _backend_options(xla_flags: str) -> list[str]:
    match = _EXTRA_OPTIONS.search(xla_flags)
    return [o for o in (match.group(1).split(',') if match else []) if o]


def _key(option: str) -> str:
    return option.split('=', 1)[0]


def xla_flags_with(options: Sequence[str], xla_flags: str = '') -> str:
    """``xla_flags`` with ``options`` added to its one ``--xla_backend_extra_options``."""
    given = _backend_options(xla_flags)
    keys = set(map(_key, given))
    added = [o for o in options if _key(o) not in keys]
    if not added:
        return xla_flags
    rest = _EXTRA_OPTIONS.sub('', xla_flags).split()
    return ' '.join([*rest, f'--xla_backend_extra_options={",".join(given + added)}'])


def process_options() -> list[str]:
    keys = set(map(_key, _backend_options(os.environ.get('XLA_FLAGS', ''))))
    return [o for o in PROCESS_OPTIONS if o in keys]


def configure(stage_sizes: Sequence[int], execution: str = 'auto') -> tuple[str, ...]:
    """Adds ``options_for``'s options to ``XLA_FLAGS`` and returns them; call it before the
    process's first JAX computation (research code: ``configure(model.stage_sizes)``)."""
    options = options_for(stage_sizes, execution)
    os.environ['XLA_FLAGS'] = xla_flags_with(options, os.environ.get('XLA_FLAGS', ''))
    return options


# XLA:GPU records CUDA graphs as it runs; DALI's GPU work beside them, from another thread,
# breaks their capture (cudaErrorStreamCaptureUnsupported, NVIDIA/DALI#6449): off for runs
# that may decode with DALI.
DALI_FLAGS = ('--xla_gpu_enable_command_buffer=',)


def dali_installed() -> bool:
    """Whether NVIDIA DALI is importable (the ``gpu`` or ``dali`` extra)."""
    try:
        return importlib.util.find_spec('nvidia.dali') is not None
    except ModuleNotFoundError:  # no ``nvidia`` namespace package at all
        return False


def configure_input(decoder: str) -> tuple[str, ...]:
    """Adds ``DALI_FLAGS`` to ``XLA_FLAGS`` where ``dataset.decoder`` may be DALI (not
    where the flag is given already); before JAX starts. Returns what it added."""
    if decoder == 'cpu' or not dali_installed():
        return ()
    flags = os.environ.get('XLA_FLAGS', '')
    added = tuple(f for f in DALI_FLAGS if _key(f) not in flags)
    os.environ['XLA_FLAGS'] = ' '.join([flags, *added]).strip()
    return added
