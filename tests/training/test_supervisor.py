"""The watch over each process of a multi-process run, on real child processes (the
two-process runs are in test_faults)."""

import subprocess
import sys
import time

from resnet_jax.training import supervisor


def _child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, '-c', code], stderr=subprocess.PIPE)


def test_the_output_passes_until_jaxs_report_of_a_failed_peer(capfd):
    child = _child(
        'import os, sys\n'
        "sys.stderr.write('preparing 1/2\\rpreparing 2/2\\nwarning: one line\\n')\n"
        "sys.stderr.write('E1207 coordination_service.cc:1549] Use error polling to propagate "
        'the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy '
        "(stopped sending heartbeats):\\n1\\nstack\\n' * 3000)\n"  # more than a pipe holds
        'sys.stderr.flush(); os.abort()'
    )
    report = supervisor._relay(child, {})
    assert child.wait() < 0
    assert capfd.readouterr().err == 'preparing 1/2\rpreparing 2/2\nwarning: one line\n'
    assert report.startswith(b'E1207 coordination_service.cc:1549] Use error polling')
    assert supervisor._peers(report) == ['1']
    assert len(report) == 1 << 16  # the rest read and dropped: the child never blocks


def test_a_child_that_outlives_its_stop_deadline_is_killed():
    """The watch's last resort after a stop signal (where no Python handler hears it)."""
    child = _child(
        'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'
    )
    stop = {'deadline': time.monotonic() + 1}
    start = time.monotonic()
    assert supervisor._relay(child, stop) is None
    assert stop['killed'] and child.wait() == -9 and time.monotonic() - start < 5


def test_a_child_that_exits_ends_the_watch_though_its_own_children_hold_the_stream():
    """The stream stays open while a process the child started lives on (input workers,
    multiprocessing's resource tracker): the watch ends with the child."""
    child = _child(
        'import subprocess, sys\n'
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
        "sys.stderr.write('done\\n')"
    )
    start = time.monotonic()
    assert supervisor._relay(child, {}) is None
    assert child.wait() == 0 and time.monotonic() - start < 10


def test_the_peers_are_read_from_jaxs_report_in_either_spelling():
    report = (
        b'E1207 coordination_service.cc] ... The following tasks are unhealthy (stopped '
        b'sending heartbeats):\n1\n/job:jax_worker/replica:0/task:3\nThe tasks have crashed.'
    )
    assert supervisor._peers(report) == ['1', '3']
    assert supervisor._peers(b'Polled an error from coordination service: UNAVAILABLE') == []
