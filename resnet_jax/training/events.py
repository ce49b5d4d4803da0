"""The run's TensorBoard event file and console metric lines, written without TensorFlow,
whose import costs every launch seconds (``experiments/results/performance.md``)."""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import socket
import time

import jax
from etils import epath

from resnet_jax import paths
from resnet_jax.training import progress

# Event files of this process: two writers opened in the same second never share a name.
_EVENT_FILES = itertools.count()


class RunWriter:
    """The run's scalars on process 0: a console line per step (speed and ETA go to the
    progress line) and an event file written from a background thread, so the loop never
    waits on the file system; a failed write is raised by the next call or ``close``."""

    def __init__(self, workdir: epath.Path | None):
        self._records = None
        if workdir is not None:
            # TensorBoard's record framing alone: its public ``summary.Writer`` writes
            # through ``tf.io.gfile``, importing TensorFlow (installed with tfds) in each launch.
            from tensorboard.compat.proto import event_pb2
            from tensorboard.summary.writer.record_writer import RecordWriter

            self._event = event_pb2.Event
            name = (
                f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.'
                f'{os.getpid()}.{next(_EVENT_FILES)}'
            )  # TensorBoard's naming
            path = epath.Path(workdir) / name
            # (in a bucket the object appears whole when the file is closed: at the end)
            file = open(path, 'xb') if paths.is_local(path) else path.open('wb')  # noqa: SIM115
            self._records = RecordWriter(file)
            self._append(self._event(wall_time=time.time(), file_version='brain.Event:2'))
        self._thread = concurrent.futures.ThreadPoolExecutor(1, 'resnet_jax_metric_writer')
        self._pending: list[concurrent.futures.Future] = []

    def _append(self, event) -> None:
        self._records.write(event.SerializeToString())

    def _write_event(self, step: int, scalars: dict[str, float], wall_time: float) -> None:
        event = self._event(wall_time=wall_time, step=step)
        for tag, value in scalars.items():
            event.summary.value.add(tag=tag, simple_value=value)
        self._append(event)
        self._records.flush()

    def _raise_failures(self, wait: bool) -> None:
        done = [f for f in self._pending if wait or f.done()]
        self._pending = [f for f in self._pending if f not in done]
        for future in done:
            future.result()

    def write_scalars(self, step: int, scalars) -> None:
        if self._records is None:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        console = {k: v for k, v in scalars.items() if k not in progress.SCALARS}
        if console:
            progress.print_line(
                f'[{step}] ' + ', '.join(f'{k}={v:.6g}' for k, v in console.items())
            )
        self._raise_failures(wait=False)
        self._pending.append(
            self._thread.submit(self._write_event, int(step), scalars, time.time())
        )

    def close(self, raise_failures: bool = True) -> None:
        """Waits for the pending writes and closes the file; ``raise_failures=False`` when
        the run is failing already (its own error is the one to report)."""
        try:
            if raise_failures:
                self._raise_failures(wait=True)
        finally:
            self._thread.shutdown()
            if self._records is not None:
                records, self._records = self._records, None
                try:
                    records.close()
                except OSError:
                    if raise_failures:
                        raise


def create_writer(workdir: epath.Path) -> RunWriter:
    """The run's metric writer: TensorBoard and the console on process 0 only."""
    return RunWriter(workdir if jax.process_index() == 0 else None)
