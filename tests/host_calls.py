"""``python tests/host_calls.py OUT.json <resnet_jax.main flags>``: runs the launcher and
writes, per process, how often it called anything that crosses hosts outside a compiled
step: JAX's multihost helpers and every method of the distributed runtime client (the
key-value store and barriers that orbax and JAX use). Also the counts so far at the first
preemption check of each step (``by_step``), which the loop makes after every step.
"""

import atexit
import collections
import functools
import json
import pathlib
import sys

from jax.experimental import multihost_utils

from resnet_jax import main
from resnet_jax.training import loop

COUNTS: collections.Counter = collections.Counter()
BY_STEP: dict = {}


def counted(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        COUNTS[name] += 1
        return fn(*args, **kwargs)

    return wrapper


class CountingClient:
    """The distributed runtime client, every method call counted."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        value = getattr(self._client, name)
        return counted(f'client.{name}', value) if callable(value) else value


for name in ('process_allgather', 'sync_global_devices', 'broadcast_one_to_all'):
    setattr(multihost_utils, name, counted(name, getattr(multihost_utils, name)))


def check(step, _reached=multihost_utils.reached_preemption_sync_point):
    BY_STEP.setdefault(step, dict(COUNTS))
    COUNTS['reached_preemption_sync_point'] += 1
    return _reached(step)


multihost_utils.reached_preemption_sync_point = check


def train_counting(*args, **kwargs):
    from jax._src import distributed  # the backend holds the real client by now

    # Written by the process that trains (not by the watch that runs it: resnet-jax train
    # runs each process of a multi-process run under one, with this same command line).
    atexit.register(
        lambda: pathlib.Path(out).write_text(json.dumps({'counts': COUNTS, 'by_step': BY_STEP}))
    )
    if distributed.global_state.client is not None:
        distributed.global_state.client = CountingClient(distributed.global_state.client)
    return original(*args, **kwargs)


original, loop.train_and_evaluate = loop.train_and_evaluate, train_counting
out = sys.argv.pop(1)
main.run()
