"""Worker processes' arrays in this process: in shared memory, each block closed once and
unlinked."""

import gc
import itertools
import os
import pathlib
import signal
import time
from multiprocessing import shared_memory

import numpy as np
import pytest
from grain.multiprocessing import SharedMemoryArray

from resnet_jax.data import workers


def _block(key: int) -> np.ndarray:
    out = workers.shared_array((64, 64), np.float32)
    out[...] = key
    return out


def test_worker_arrays_arrive_uncopied_and_each_block_is_closed_once(monkeypatch):
    """A worker's array arrives in shared memory, not copied; left in a cycle for the
    collector, its block is still closed and unlinked, and never by two threads at once
    (grain closes it on its own thread; the collector finalizing the array and its block
    together would close one file descriptor twice, and a file opened in between would
    lose it)."""
    closes = []
    close = shared_memory.SharedMemory.close

    def recorded_close(self):
        start = time.perf_counter()
        time.sleep(0.02)  # a window wide enough for a second close to overlap
        close(self)
        closes.append((self.name, start, time.perf_counter()))

    monkeypatch.setattr(shared_memory.SharedMemory, 'close', recorded_close)
    items = workers.map_in_workers(_block, range(6), num_workers=2)
    received = []
    try:
        for key, array in enumerate(itertools.islice(items, 6)):
            assert isinstance(array, SharedMemoryArray)
            received.append(array.shm.name)
            assert array.shape == (64, 64) and (array == key).all()
            cycle = [array]
            cycle.append(cycle)
            del array, cycle
            gc.collect()
    finally:
        items.close()
    del items
    gc.collect()

    def left():  # grain closes and unlinks blocks on a thread of its own
        return [
            n
            for n in received
            if (pathlib.Path('/dev/shm') / n.lstrip('/')).exists()
            or n not in {c[0] for c in closes}
        ]

    deadline = time.monotonic() + 10
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left()
    spans = {}
    for name, start, end in closes:
        spans.setdefault(name, []).append((start, end))
    for name, times in spans.items():  # a second close (a no-op) starts after the first
        times.sort()
        assert all(a[1] <= b[0] for a, b in zip(times, times[1:])), (name, times)


def _dies_or_raises_at_3(key: int) -> int:
    if key == 3:
        if os.environ.get('TEST_WORKER_FAILURE') == 'die':
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer does
        raise ValueError(f'cannot decode img{key}.png')
    return key


@pytest.mark.parametrize('failure', ['raise', 'die'])
def test_a_worker_that_raises_or_dies_is_one_line_in_this_process_within_seconds(
    failure, monkeypatch
):
    """A worker's exception arrives in its item's place; a worker killed (SIGKILL) is
    noticed in seconds; both as one InputError line naming the item, never a wait."""
    monkeypatch.setenv('TEST_WORKER_FAILURE', failure)  # (spawned workers inherit it)
    items = workers.map_in_workers(_dies_or_raises_at_3, range(1000), num_workers=2)
    start = time.monotonic()
    received = []
    with pytest.raises(workers.InputError) as raised:
        try:
            for item in workers.reported(items, lambda n: f'item {n}'):
                received.append(item)
        finally:
            items.close()
    message = str(raised.value)
    assert '\n' not in message and time.monotonic() - start < 30
    if failure == 'raise':
        assert received == [0, 1, 2]
        assert message == 'the input pipeline failed at item 3: ValueError: cannot decode img3.png'
    else:
        assert received == list(range(len(received))) and len(received) <= 3
        assert message == (
            'an input worker process died (killed by SIGKILL, as the kernel kills a process '
            f'when memory runs out) building item {len(received)} or one after it'
        )
