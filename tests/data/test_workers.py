"""Worker processes' arrays in this process: their shared memory is released exactly once."""

import gc
import itertools
import threading
from multiprocessing import shared_memory

import numpy as np

from resnet_jax.data import workers


def _block(key: int) -> np.ndarray:
    out = workers.shared_array((64, 64), np.float32)
    out[...] = key
    return out


def test_arrays_freed_by_the_cycle_collector_are_closed_once_in_its_thread(monkeypatch):
    """A worker's array freed by the cycle collector (as arrays held by a traceback or a
    generator are) has its block closed in the collecting thread. On grain's background
    thread the same ``SharedMemory`` would be closed by two threads at once, and its file
    descriptor closed twice."""
    closes = []
    close = shared_memory.SharedMemory.close

    def recorded_close(self):
        closes.append((self.name, threading.current_thread()))
        close(self)

    monkeypatch.setattr(shared_memory.SharedMemory, 'close', recorded_close)
    items = workers.map_in_workers(_block, range(6), num_workers=2)
    received = []
    try:
        for key, array in enumerate(itertools.islice(items, 6)):
            assert array.shape == (64, 64) and (array == key).all()
            received.append(array.shm.name)
            cycle = [array]
            cycle.append(cycle)
            del array, cycle
            gc.collect()
    finally:
        items.close()
    del items
    gc.collect()
    threads = {}
    for name, thread in closes:
        threads.setdefault(name, set()).add(thread)
    assert set(received) <= set(threads)  # every block received was closed
    assert all(len(t) == 1 for t in threads.values()), threads  # each by one thread
