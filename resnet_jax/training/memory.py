"""Whether a batch fits: the compiled train step's own memory analysis against what a device
holds, checked before a run writes anything, so that a batch too large is one line and not
an out-of-memory error after the first files are written."""

from __future__ import annotations

import os
from collections.abc import Callable

import jax

from resnet_jax.config import ConfigError


def _stats(device: jax.Device) -> dict | None:
    """The allocator's figures of ``device`` (GPU, TPU), None where it keeps none (CPU)."""
    return device.memory_stats() if hasattr(device, 'memory_stats') else None


def peak_bytes(device: jax.Device) -> int | None:
    """The most ``device`` has held at once so far, None where it keeps no count."""
    return (_stats(device) or {}).get('peak_bytes_in_use') or None


def available_bytes(device: jax.Device) -> int | None:
    """What ``device`` may allocate: an accelerator's limit (its allocator's own figure), a
    CPU device's share of the host's available memory (the local CPU devices share it);
    None where neither is known."""
    stats = _stats(device)
    if stats and stats.get('bytes_limit'):
        return int(stats['bytes_limit']) - int(stats.get('bytes_in_use', 0))
    if device.platform != 'cpu':
        return None
    try:
        with open('/proc/meminfo') as f:  # Linux: what the kernel can hand out without swap
            meminfo = dict(line.split(':', 1) for line in f)
        host = int(meminfo['MemAvailable'].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            host = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
        except (ValueError, OSError, AttributeError):
            return None
    return host // max(len(jax.local_devices(backend='cpu')), 1)


def need_bytes(compiled: jax.stages.Compiled) -> int | None:
    """A compiled step's peak memory on one device by its own analysis: the arguments and
    outputs, less what donated arguments alias, and the temporaries (None: not known)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
        + analysis.temp_size_in_bytes
    )


def _size(count: int) -> str:
    return f'{count / 2**30:.1f} GiB' if count >= 2**30 else f'{count / 2**20:.0f} MiB'


class OutOfMemoryError(RuntimeError):
    """A device ran out of memory although the estimate let the batch through."""

    def __init__(self, batch_size: int, largest: int):
        allows = f'the estimate allows about {largest}' if largest else 'no estimate'
        super().__init__(
            f'out of memory at batch_size={batch_size} ({allows}); lower batch_size or raise '
            'grad_accum_steps'
        )


def check_fits(
    compile_at: Callable[[int], jax.stages.Compiled], batch_size: int, unit: int, device
) -> int:
    """The largest batch the estimate of ``compile_at(batch_size)`` allows (0: unknown), or
    ConfigError (one line) where that step needs more memory than ``device`` has free,
    naming the largest batch. A step's memory is close to a line in the batch, though not
    through zero (XLA's workspace, other kernels at other sizes), so a refusal compiles a
    second size to draw it; batches are multiples of ``unit``."""
    need, available = need_bytes(compile_at(batch_size)), available_bytes(device)
    if need is None or available is None:
        return 0
    if need <= available:
        return available * batch_size // need // unit * unit
    guess = max(min(batch_size * available // need, batch_size // 2) // unit * unit, unit)
    second = need_bytes(compile_at(guess)) if guess < batch_size else None
    if second is not None and need > second:
        slope = (need - second) / (batch_size - guess)
        # A tenth kept back: not quite a line (cifar_resnet8, CPU: 304 drawn, 68 MiB for 64)
        largest = int(0.9 * (available - (need - slope * batch_size)) / slope) // unit * unit
    else:
        largest = guess
    raise ConfigError(
        f'batch_size={batch_size} needs about {_size(need)} per device, more than the '
        f'{_size(available)} a {device.platform} device has free; the estimate '
        f'allows at most about {max(largest, 0)} (or raise grad_accum_steps)'
    )
