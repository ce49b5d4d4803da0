"""What long runs meet: preemption (``StopRequest``), diverging losses (``NonFiniteGuard``),
shared workdirs (``WorkdirLock``) and unwritable ones (``check_workdir``)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import sys
import threading
import traceback

import jax
import numpy as np
from etils import epath

from resnet_jax import paths
from resnet_jax.config import ConfigError


def _is_closed_loop_callback(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'


def quiet_closed_loop_callbacks() -> None:
    """Drops the tracebacks of callbacks that find their asyncio loop closed: when an orbax
    save or restore fails, tensorstore still completes its other operations on the closed
    loop; the failure itself is raised and reported. Other errors print as before."""
    previous_excepthook, previous_unraisable = sys.excepthook, sys.unraisablehook

    def excepthook(kind, value, traceback):
        if not _is_closed_loop_callback(value):
            previous_excepthook(kind, value, traceback)

    def unraisablehook(unraisable):
        if not _is_closed_loop_callback(unraisable.exc_value):
            previous_unraisable(unraisable)

    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


class NonFiniteLossError(RuntimeError):
    """The loss or parameters became NaN or infinite; the run stops without checkpointing
    that state. ``checkpoints``: those on disk with their loss and norm, to resume from."""

    def __init__(self, step: int, what: str, value: float, checkpoints: str | None = None):
        self.step, self.what, self.value, self.checkpoints = step, what, value, checkpoints
        advice = 'Lower the learning rate or add warm-up'
        if checkpoints:
            advice = (
                f'Checkpoints on disk: {checkpoints}. {advice}, and relaunch with '
                '--resume_step=STEP to resume from an earlier one (the later ones are '
                'kept aside)'
            )
        super().__init__(
            f'the training {what} is {value} at step {step}; stopped without '
            f'saving that state. {advice}.'
        )


def check_workdir(workdir) -> None:
    """Raises ConfigError (one line) unless files can be written in ``workdir``, or in the
    folder that would hold it, whatever the reason; creates nothing. A bucket has no folders
    to create: only the bucket must exist."""
    path = paths.resolve(workdir)
    if paths.is_local(workdir):
        existing = path
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f'workdir {workdir} cannot be created: {existing} is not a directory')
        if existing != path:  # a folder made and removed, as creating it would
            probe = existing / f'.write-test-{os.getpid()}'
            try:
                probe.mkdir()
                probe.rmdir()
            except OSError as e:
                raise ConfigError(
                    f'workdir {workdir} cannot be created: {paths.describe(e)}'
                ) from None
            return
    check_writable(path, 'workdir', workdir)


def create_workdir(workdir) -> epath.Path:
    """``workdir`` (checked by ``check_workdir``), created if needed, as an absolute path."""
    path = paths.resolve(workdir)
    if paths.is_local(workdir):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f'workdir {workdir} cannot be created: {e.strerror or e}') from None
    return path


check_writable = paths.check_writable


# What a file system says when it cannot take a write.
WRITE_ERRNOS = frozenset(
    (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO)
)


def is_write_failure(error: OSError, workdir) -> bool:
    """Whether ``error`` is a write in ``workdir`` that the file system refused."""
    if error.filename:
        return os.fspath(paths.resolve(error.filename)).startswith(
            os.fspath(paths.resolve(workdir))
        )
    return error.errno in WRITE_ERRNOS


class WorkdirLock(contextlib.AbstractContextManager):
    """An exclusive advisory lock on ``workdir/.lock`` held by process 0 for the run; the
    kernel releases it when the process dies, even by ``kill -9``. A bucket has no such
    lock (a lease object would outlive a killed run): there, one run per workdir is the
    user's to keep."""

    def __init__(self, workdir: epath.Path):
        self.path = workdir / '.lock'
        self.file = None

    def __enter__(self):
        if jax.process_index() != 0 or not paths.is_local(self.path):
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, 'a+')
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            owner = self.file.read().strip() or 'another process'
            self.file.close()
            self.file = None
            raise ConfigError(
                f'workdir {self.path.parent} is in use by another run '
                f'({owner}); wait for it or use another --workdir'
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f'pid {os.getpid()} on {os.uname().nodename}')
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None
        return False


class StopRequest(contextlib.AbstractContextManager):
    """SIGTERM / SIGINT ask the loop to stop at a step that every process reaches. On several
    processes JAX's preemption service (what orbax uses) agrees on that step in the
    background, so no step waits on another host (SIGINT is handed to it as a SIGTERM);
    without the service, one all-gather at the ``boundary`` steps.

    With ``grace_seconds``, a run that has not ended that long after the signal (its input
    stuck, a save that hangs) is ended by a watchdog thread: one line naming where the main
    thread waits and the last complete checkpoint (``checkpoints``, a folder), exit 1. The
    thread hears the signal through ``signal.set_wakeup_fd``, which the interpreter's C
    handler writes even while the main thread is blocked in C and runs no Python handler."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpoints=None, grace_seconds: float | None = None):
        self.signal_name: str | None = None
        self.checkpoints = checkpoints
        self.grace_seconds = grace_seconds
        self._previous = {}
        self._service = False
        self._done = threading.Event()
        self._wakeup = None

    def _handle(self, signum, frame):
        del frame
        self.signal_name = signal.Signals(signum).name
        if self._service and signum != signal.SIGTERM:
            signal.raise_signal(signal.SIGTERM)  # to the preemption service's handler

    def __enter__(self):
        self._service = jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)
        # With the service, SIGTERM stays with its (C++) handler.
        signals = (signal.SIGINT,) if self._service else self.SIGNALS
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        if self._previous and self.grace_seconds:
            reader, writer = socket.socketpair()
            writer.setblocking(False)
            self._wakeup = (reader, writer, signal.set_wakeup_fd(writer.fileno()))
            threading.Thread(target=self._watch, args=(reader,), daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._wakeup is not None:
            reader, writer, previous = self._wakeup
            signal.set_wakeup_fd(previous)
            writer.close()  # ends the watchdog's wait
        return False

    def _watch(self, reader: socket.socket) -> None:
        with reader:
            stops = {int(sig) for sig in self.SIGNALS}
            signum = None
            while signum not in stops:  # (every signal with a Python handler is written)
                try:
                    got = reader.recv(1)
                except OSError:
                    return
                if not got:
                    return
                signum = got[0]
            if self._done.wait(self.grace_seconds):
                return
            name = signal.Signals(signum).name
            where = _where_main_waits()
            tag = f'[process {jax.process_index()}] ' if jax.process_count() > 1 else ''
            last = 'none'
            if self.checkpoints is not None:
                from resnet_jax.training import run_identity

                last = run_identity.describe_latest(self.checkpoints)
            print(
                f'{tag}error: {name} received, but the run did not end within '
                f'{self.grace_seconds:.0f} s (waiting in {where}); ended. The last complete '
                f'checkpoint: {last}.',
                file=sys.stderr,
                flush=True,
            )
            from resnet_jax.data import workers

            workers.kill_all()  # (stuck ones would not follow their parent)
            os._exit(1)

    def requested(self, step: int, boundary: bool = True) -> bool:
        """Whether to stop after ``step``, the same on every process (each calls it after every
        step); ``boundary``: a step where processes without the service may exchange flags."""
        local = self.signal_name is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        if self._service:
            return multihost_utils.reached_preemption_sync_point(step)
        if not boundary:
            return False
        return bool(np.max(multihost_utils.process_allgather(np.int32(local))))


class NonFiniteGuard:
    """Checks each step's loss and parameter norm one step late (so the device keeps a
    step queued). The loss of step s is computed before its update, so the parameter norm
    after the update is what keeps a diverged state out of the checkpoint of step s."""

    def __init__(self):
        self._pending: list[tuple[int, jax.Array, jax.Array]] = []
        self._last: tuple[int, float, float] | None = None  # the last step checked

    def add(self, step: int, loss: jax.Array, param_norm: jax.Array) -> None:
        self._pending.append((step, loss, param_norm))
        while len(self._pending) > 1:
            self._check_one()

    def check_all(self) -> None:
        """Raises NonFiniteLossError for the first non-finite loss not yet checked."""
        while self._pending:
            self._check_one()

    def values_at(self, step: int) -> tuple[float | None, float | None]:
        """The loss and parameter norm of ``step`` if it is the last step checked."""
        if self._last is None or self._last[0] != step:
            return None, None
        return self._last[1], self._last[2]

    def _check_one(self) -> None:
        step, loss, param_norm = self._pending.pop(0)
        values = []
        for what, array in (('loss', loss), ('parameter norm', param_norm)):
            value = float(np.asarray(array.addressable_data(0)))
            if not np.isfinite(value):
                self._pending.clear()
                raise NonFiniteLossError(step, what, value)
            values.append(value)
        self._last = (step, *values)


def _where_main_waits() -> str:
    """The innermost frames of the main thread: this package's, and the one it waits in."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return 'an unknown place'
    stack = traceback.extract_stack(frame)
    ours = [f for f in stack if f'{os.sep}resnet_jax{os.sep}' in f.filename]
    where = f'{stack[-1].name} ({os.path.basename(stack[-1].filename)}:{stack[-1].lineno})'
    if ours and ours[-1] is not stack[-1]:
        where += f', called from {ours[-1].name} ({os.path.basename(ours[-1].filename)})'
    if any(f'{os.sep}data{os.sep}' in f.filename for f in ours):
        where = f'the input pipeline: {where}'
    return where
