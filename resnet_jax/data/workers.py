"""The input pipeline's per-example work in grain worker processes, in key order whatever
their number. Each worker is a ``spawn``ed interpreter (never a fork of a process running
JAX threads), so ``fn`` must be picklable; arrays come back in grain's shared memory,
uncopied. Workers ignore the job's Ctrl-C (the parent stops them) and die with it.
"""

from __future__ import annotations

import functools
import gc
import itertools
import multiprocessing
import os
import re
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence

import numpy as np


def default_num_workers() -> int:
    """One worker per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def kill_all() -> None:
    """Kills this process's worker processes (multiprocessing's children), for an input
    that stopped answering: its workers would never end, and grain would wait for them at
    exit. (SIGKILL ends even a stopped process.)"""
    for process in multiprocessing.active_children():
        process.kill()


def _exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is not None:
        parent.join()  # returns when the parent process is gone
        os._exit(1)


def _init_worker(index: int, count: int) -> None:
    del index, count
    # A process group of its own: a Ctrl-C or a scheduler's SIGTERM to the job's group
    # reaches only the parent, which finishes its step, checkpoints and stops the workers.
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, daemon=True).start()


_TRACKER_QUIET = 'ignore:resource_tracker:UserWarning'


def _grain():
    """grain, importable from code that never parsed absl flags (tests, notebooks):
    grain reads its absl flags when it starts workers; their defaults are what we want."""
    import grain
    from absl import flags

    # multiprocessing's resource tracker (started with the first worker, with these options)
    # unlinks the shared-memory blocks of a process that died or was ended by the stop
    # watchdog (faults.StopRequest) and warns of each in a multi-line warning: the cleanup
    # is the fix, so the warning only buries the run's own one-line error.
    if _TRACKER_QUIET not in sys.warnoptions:
        sys.warnoptions.append(_TRACKER_QUIET)

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return grain


def shared_array(shape: Sequence[int], dtype) -> np.ndarray:
    """An array in shared memory: returned from a worker, it is not copied again there."""
    from grain.multiprocessing import SharedMemoryArray

    return SharedMemoryArray(tuple(shape), dtype)


class InputError(RuntimeError):
    """The input pipeline failed (a worker process died or raised): one line naming the
    batch or image and the cause."""


def _failure(error: BaseException, what: str) -> str:
    code = re.search(r'terminated unexpectedly with exit code (-?\d+)', str(error))
    if code:  # grain's message for a worker that died (its other items may still arrive)
        n = int(code.group(1))
        how = f'killed by {signal.Signals(-n).name}' if n < 0 else f'exit code {n}'
        if n == -9:
            how += ', as the kernel kills a process when memory runs out'
        return f'an input worker process died ({how}) building {what} or one after it'
    lines = [line for line in str(error).splitlines() if line.strip()]
    return (
        f'the input pipeline failed at {what}: {type(error).__name__}: {lines[0] if lines else ""}'
    )


def reported(items: Iterator, describe: Callable[[int], str]) -> Iterator:
    """``items``, a failure raised as one-line InputError naming item ``n`` by
    ``describe(n)`` (a worker's exception arrives in its item's place)."""
    for n in itertools.count():
        try:
            item = next(items)
        except StopIteration:
            return
        except Exception as e:
            raise InputError(_failure(e, describe(n))) from e
        yield item


def map_in_workers(
    fn: Callable,
    keys: range | Sequence[int],
    num_workers: int,
    buffer_size: int = 1,
    group: int = 1,
    combine: Callable | None = None,
) -> Iterator:
    """``fn(key)`` for every key, in order, computed in ``num_workers`` processes.

    With ``group > 1``, every ``group`` consecutive results are merged in the parent by
    ``combine(list_of_results)`` (e.g. the chunks of one batch). The returned iterator's
    ``close()`` stops the workers (they also stop when it is garbage collected).
    """
    grain = _grain()
    if isinstance(keys, range):
        ds = grain.MapDataset.range(keys.start, keys.stop, keys.step)
    else:
        ds = grain.MapDataset.source(keys)
    ds = ds.map(fn).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer_size),
        worker_init_fn=_init_worker,
    )
    if group > 1:
        ds = ds.batch(group, batch_fn=functools.partial(_guarded, combine))
    return _Closing(iter(ds))


def _guarded(combine: Callable, parts: list):
    return combine(_guard(parts))


class _Closing:
    """grain's iterator, its arrays guarded (``_guard``); ``close()`` also frees those
    grain's own reference cycles hold, so grain closes and unlinks their blocks now, not
    at exit (where its thread is gone: they would be left to the resource tracker, with a
    warning)."""

    def __init__(self, iterator):
        self._iterator = iterator

    def __iter__(self):
        return self

    def __next__(self):
        return _guard(next(self._iterator))

    def close(self) -> None:
        self._iterator.close()
        gc.collect()


def _guard(value):
    """A worker's result (arrays, or lists or dicts of them) with each shared-memory block
    held until its array is gone: grain closes the block on its own thread, and the cycle
    collector, freeing array and block together, would close its descriptor a second time
    at once (an orbax save then lost its file: ``OSError: [Errno 22]``)."""
    from grain.multiprocessing import SharedMemoryArray

    if isinstance(value, dict):
        return {k: _guard(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_guard(v) for v in value)
    if isinstance(value, SharedMemoryArray) and value.shm is not None:
        weakref.finalize(value, _release, value.shm)
    return value


def _release(block) -> None:
    """Drops the guard's reference to ``block``; grain closes it."""
    del block
