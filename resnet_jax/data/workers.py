"""Running the input pipeline's per-example work in worker processes, with grain.

``map_in_workers(fn, keys, num_workers)`` yields ``fn(key)`` for every key, in order,
computed by ``num_workers`` processes: grain's ``MapDataset`` over the keys, ``map(fn)``
and ``mp_prefetch``. Worker ``i`` of ``W`` computes keys ``i, i + W, ...`` and grain
interleaves them back into key order, so the output does not depend on ``W``.

How grain runs them (grain 0.2): each worker is started with the ``spawn`` method (a fresh
interpreter, never a fork of a process that has started JAX or TensorFlow threads) and
receives the dataset pickled with cloudpickle, so ``fn`` must be picklable (a function, a
bound method or a ``functools.partial`` of picklable objects). numpy arrays that ``fn``
returns travel through shared memory; an array allocated as grain's
``SharedMemoryArray`` in the worker (see ``shared_array``) reaches the parent without a
copy. Each worker keeps ``buffer_size`` results ready.

In this process, a worker's shared-memory block is closed in the thread that drops its
array (``_close_blocks_where_dropped``), not on grain's background thread.

Workers run in a process group of their own (a Ctrl-C or a SIGTERM to the job's group
reaches only the parent, which stops them when it is done) and exit when their parent
dies, even by ``kill -9``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from typing import Callable, Iterator, Sequence

import numpy as np


def default_num_workers() -> int:
    """One worker per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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


def _grain():
    """grain, importable from code that never parsed absl flags (tests, notebooks):
    grain reads its absl flags when it starts workers; their defaults are what we want."""
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    _close_blocks_where_dropped()
    return grain


class _CloseWhereDropped:
    """Takes the place of grain's "async del" thread pool: ``apply_async`` closes the
    block at once, in the calling thread."""

    def apply_async(self, fn, args=(), kwds=None):
        fn(*args, **(kwds or {}))


def _close_blocks_where_dropped() -> None:
    """Makes grain close a worker's shared-memory block in the thread that drops its array.

    grain 0.2 closes blocks on a background thread ("async del"). When an array is freed
    by the cycle collector (grain's prefetch thread leaves each iterator's last element
    in a cycle, through a ``StopIteration``'s traceback), the collector also finalizes the
    array's ``SharedMemory``. Both threads then run ``SharedMemory.close()`` at once: the
    file descriptor is closed twice, and a thread that reused the number in between loses
    its file (seen as an orbax save failing with ``OSError: [Errno 22]`` from its event
    loop). Closed in one thread, the second close finds the block closed and does nothing.
    It is one munmap and one close per array, the path grain itself takes whenever its
    pool is busy."""
    from grain.multiprocessing import SharedMemoryArray

    with SharedMemoryArray._lock:
        if not isinstance(SharedMemoryArray._del_thread_pool, _CloseWhereDropped):
            SharedMemoryArray._del_thread_pool = _CloseWhereDropped()
            SharedMemoryArray._outstanding_del_requests = threading.Semaphore(1)


def shared_array(shape: Sequence[int], dtype) -> np.ndarray:
    """An array in shared memory: returned from a worker, it reaches the parent as is."""
    from grain.multiprocessing import SharedMemoryArray

    return SharedMemoryArray(tuple(shape), dtype)


def map_in_workers(fn: Callable, keys: range | Sequence[int], num_workers: int,
                   buffer_size: int = 1, group: int = 1,
                   combine: Callable | None = None) -> Iterator:
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
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=buffer_size),
                        worker_init_fn=_init_worker)
    if group > 1:
        ds = ds.batch(group, batch_fn=combine)
    return iter(ds)


def to_local(value):
    """A worker's result (an array, or a list or dict of them) with its shared-memory
    blocks unlinked now: the arrays stay valid and their memory is freed with them, rather
    than whenever the garbage collector frees the last reference, so nothing is left in
    /dev/shm even at exit."""
    if isinstance(value, dict):
        return {k: to_local(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_local(v) for v in value)
    shm = getattr(value, 'shm', None)
    if shm is not None and getattr(value, '_unlink_on_del', False):
        value._unlink_on_del = False
        try:
            shm.unlink()
        except FileNotFoundError:
            pass
    return value
