"""A multi-process run's processes each under a watch of their own: when a peer dies, JAX's
distributed client ends the survivors with ``abort()`` (exit 134) and some 70 lines of C++
and Python stacks, from a thread Python cannot reach. So ``resnet-jax train`` runs the
process of a multi-process run as a child, passes its output through, and turns such an
end into one line naming the peer that stopped and the last complete checkpoint (exit 1).
Signals are handed to the child; every other end is the child's own exit code.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

CHILD = 'RESNET_JAX_SUPERVISED'  # set in the child's environment

# The first line of JAX's report of a failed peer: what follows is its stack traces.
_PEER_FAILED = re.compile(
    rb'error polling to propagate|JAX distributed service detected fatal errors|'
    rb'Polled an error from coordination service'
)
_UNHEALTHY = re.compile(rb'tasks are unhealthy \(stopped sending heartbeats\):[ \t]*\n')
_TASK = re.compile(rb'\s*(?:/job:[^/\s]+/replica:\d+/task:)?(\d+)[\s,]*')


def process_tag(process_id: int | None) -> str:
    """``[process N] `` for the error lines of the watch, from the flag or the launcher's
    variables (Slurm, Open MPI, a TPU pod's worker id)."""
    for value in (
        process_id,
        *(os.environ.get(v) for v in ('SLURM_PROCID', 'OMPI_COMM_WORLD_RANK', 'TPU_WORKER_ID')),
    ):
        if value is not None and str(value).isdigit():
            return f'[process {value}] '
    return ''


def needed() -> bool:
    """Whether this process is to run under a watch (not yet under one). The watched
    process dies with its watch, by SIGKILL (as a scheduler's ``kill -9`` of the watch
    meant), within half a second."""
    watch = os.environ.get(CHILD)
    if watch:
        threading.Thread(target=_die_with, args=(int(watch),), daemon=True).start()
    return not watch


def _die_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


def run(
    workdir: str, heartbeat_timeout_seconds: int, stop_grace_seconds: int, process_tag: str
) -> int:
    """Runs this command again as a child and returns the exit code to end with. A child
    still running ``stop_grace_seconds`` + 3 s after a stop signal is killed (0: never):
    with JAX's preemption service a SIGTERM reaches no Python handler there, so the run's
    own watchdog (``faults.StopRequest``) cannot act."""
    stop, children = {}, []

    def forward(signum, frame):  # (installed first: a signal is never lost to a default)
        del frame
        stop.setdefault('signal', signal.Signals(signum).name)
        if stop_grace_seconds:
            stop.setdefault('deadline', time.monotonic() + stop_grace_seconds + 3)
        for child in children:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    child = subprocess.Popen(
        [sys.executable, *sys.orig_argv[1:]],
        env={**os.environ, CHILD: str(os.getpid())},
        stderr=subprocess.PIPE,
    )
    children.append(child)
    if 'signal' in stop:
        child.send_signal(signal.Signals[stop['signal']])
    report = _relay(child, stop)
    code = child.wait()
    if stop.get('killed'):
        print(
            f'{process_tag}error: {stop["signal"]} received, but the run did not stop within '
            f'{stop_grace_seconds + 3} s; ended. The last complete checkpoint: '
            f'{_last_checkpoint(workdir)}.',
            file=sys.stderr,
            flush=True,
        )
        return 1
    if report is None or code >= 0:  # (a report the child survived is passed on)
        sys.stderr.buffer.write(report or b'')
        return code if code >= 0 else 128 - code
    peers = _peers(report)
    who = (
        f'process {", ".join(peers)} stopped answering (no heartbeat for '
        f'{heartbeat_timeout_seconds} s, --heartbeat_timeout_seconds)'
        if peers
        else "another process ended (its own line says why) or JAX's service failed"
    )
    print(
        f'{process_tag}error: {who}; this process stopped with it. The last complete '
        f'checkpoint: {_last_checkpoint(workdir)}.'
        + (' Relaunch every process to resume.' if peers else ''),
        file=sys.stderr,
        flush=True,
    )
    return 1


def _peers(report: bytes) -> list[str]:
    """The task ids JAX lists after "tasks are unhealthy ...:", one per line."""
    found = _UNHEALTHY.search(report)
    out = []
    for line in report[found.end() :].splitlines() if found else []:
        task = _TASK.fullmatch(line)
        if not task:
            break
        out.append(task.group(1).decode())
    return out


def _relay(child: subprocess.Popen, stop: dict) -> bytes | None:
    """Copies the child's stderr to ours, a line (or a progress line's ``\\r``) at a time,
    up to JAX's report of a failed peer; returns that report (the rest) or None if there
    was none. Ends with the child, not with the stream, which processes the child started
    (input workers, a resource tracker) may hold open. Kills a child that outlives
    ``stop['deadline']`` (``stop['killed']``): with JAX's preemption service a SIGTERM
    reaches no Python handler there, so its own watchdog cannot help."""
    out, pending, report = sys.stderr.buffer, b'', None
    fd = child.stderr.fileno()
    while True:  # one read per pass, so the deadline is checked however much is written
        ended = child.poll() is not None
        if not ended and time.monotonic() > stop.get('deadline', float('inf')):
            stop['killed'] = True
            child.kill()
        readable = select.select([fd], [], [], 0 if ended else 0.5)[0]
        chunk = os.read(fd, 1 << 16) if readable else b''
        if readable and not chunk and not ended:  # end of stream before the child's end
            time.sleep(0.05)
        if report is not None:
            report += chunk[: max(0, (1 << 16) - len(report))]
        elif chunk:
            pending += chunk
            found = _PEER_FAILED.search(pending)
            if found:
                start = pending.rfind(b'\n', 0, found.start()) + 1
                pending, report = pending[:start], pending[start:]
            end = (
                len(pending)
                if report is not None
                else max(pending.rfind(b'\n'), pending.rfind(b'\r')) + 1
            )
            out.write(pending[:end])
            out.flush()
            pending = pending[end:]
        if ended and not chunk:  # (the stream may stay open: the child's children hold it)
            out.write(pending)
            out.flush()
            return report


# What a collective says when a peer's end of it is gone (CPU: Gloo; GPU: NCCL).
_COLLECTIVE_BROKEN = re.compile(r'closed by peer|reset by peer|remote process exited')


def await_verdict(error: BaseException, workdir: str, heartbeat_timeout_seconds: int) -> None:
    """In the watched process, for an error of a multi-process run: a collective that
    broke because a peer died is not reported here, where it names only an address. JAX's
    distributed service names the peer within the heartbeat timeout and ends this process,
    and the watch reports that; if it does not, one line, exit 1. Other errors return."""
    if not os.environ.get(CHILD) or not _COLLECTIVE_BROKEN.search(str(error)):
        return
    time.sleep(heartbeat_timeout_seconds + 15)
    first = str(error).strip().splitlines()[0][:300]
    print(
        f'error: a collective with another process failed ({first}); the last complete '
        f'checkpoint: {_last_checkpoint(workdir)}. Relaunch every process to resume.',
        file=sys.stderr,
        flush=True,
    )
    os._exit(1)


def _last_checkpoint(workdir: str) -> str:
    from resnet_jax import paths
    from resnet_jax.training import run_identity

    return run_identity.describe_latest(paths.resolve(workdir) / 'checkpoints')
