"""Preemption, kill -9, corrupt checkpoints, diverging losses, locks and multi-process runs.

Every test launches ``python -m resnet_jax.main`` as a user (or a scheduler) would, on a
tiny net, and bounds each process in time.
"""

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time

import forked
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, children
from etils import epath

import resnet_jax
from resnet_jax.evaluation.protocols import PROTOCOLS
from resnet_jax.training import faults, run_identity

pytestmark = pytest.mark.slow

TINY = [
    '--config.model.name=cifar_resnet8',
    '--config.batch_size=16',
    '--config.model.bn_group_size=4',
    '--config.eval_batch_size=360',
]


def tiny_args(workdir, data_dir, steps=300, *extra):
    return [
        f'--workdir={workdir}',
        f'--config.dataset.data_dir={data_dir}',
        *TINY,
        f'--config.num_train_steps={steps}',
        f'--config.lr_boundaries=({steps // 2},)',
        '--config.log_every_steps=7',
        '--config.eval_every_steps=100',
        '--config.checkpoint_every_steps=20',
        *extra,
    ]


def _env(devices):
    """The launched processes' environment: ``devices`` CPU devices, and Python's fault
    handler, so that a process stopped for hanging prints every thread's stack."""
    return dict(
        os.environ,
        XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
        PYTHONFAULTHANDLER='1',
    )


def launch(args, devices=1, **kwargs):
    env = _env(devices)
    return forked.Popen(
        [sys.executable, '-m', 'resnet_jax.main', *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _stacks(proc):
    """A hanging process stopped with SIGABRT (its fault handler prints every thread's
    stack), then killed: its stderr."""
    proc.send_signal(signal.SIGABRT)
    try:
        return proc.communicate(timeout=10)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[1]


def finish(proc, timeout=300):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f'process did not finish in {timeout} s: {_stacks(proc)[-4000:]}')
    return proc.returncode, out, err


def steps_in(workdir):
    """The step folders in a workdir (local or in a bucket), written or being written."""
    directory = epath.Path(workdir) / 'checkpoints'
    return (
        sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
        if (directory.exists())
        else []
    )


def wait_for_checkpoint(workdir, proc, timeout=180):
    deadline = time.time() + timeout
    while not steps_in(workdir):
        assert proc.poll() is None, finish(proc)[2][-2000:]
        assert time.time() < deadline, 'no checkpoint in time'
        time.sleep(0.05)


def results_without_time(workdir):
    results = json.loads((epath.Path(workdir) / 'results.json').read_text())
    results.pop('wall_seconds')
    return results


# The killed runs keep a moving average of the weights too: its state must resume exactly.
# A kill lands within ~1.5 s of the first checkpoint (step 20), some 30 steps at most.
EMA, STEPS = '--config.ema_decay=0.9', 80


def evaluate(workdir, *flags):
    """``resnet-jax evaluate`` on ``workdir``, as the README gives it: its record."""
    proc = forked.run(
        [sys.executable, '-m', 'resnet_jax', 'evaluate', f'--workdir={workdir}', *flags],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def uninterrupted(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp('uninterrupted')
    code, out, err = finish(launch(tiny_args(workdir, data_dir, STEPS, EMA)))
    assert code == 0, err[-2000:]
    return workdir


# (SIGTERM's checkpoint and resume: test_run_stops and test_train's stopped run, cheaper.)
@pytest.mark.parametrize('sig, where', [(signal.SIGKILL, 'disk'), (signal.SIGKILL, 'bucket')])
def test_killed_run_resumes_to_exactly_the_uninterrupted_result(
    sig, where, uninterrupted, data_dir, tmp_path, request
):
    """On a local disk, or in a bucket (conftest's GCS server), where orbax marks a complete
    step with a commit file instead of a rename."""
    workdir = tmp_path if where == 'disk' else f'{request.getfixturevalue("gcs")()}/run'
    proc = launch(tiny_args(workdir, data_dir, STEPS, EMA))
    wait_for_checkpoint(workdir, proc)
    time.sleep(random.Random(sig).uniform(0.0, 1.5))  # a random moment after it
    proc.send_signal(sig)
    code, out, err = finish(proc)
    assert code in (-signal.SIGKILL, 0), err[-2000:]  # killed (or it had already finished)
    code, out, err = finish(launch(tiny_args(workdir, data_dir, STEPS, EMA)))
    assert code == 0, err[-2000:]
    assert results_without_time(workdir) == results_without_time(uninterrupted)
    history = json.loads((epath.Path(workdir) / 'history.json').read_text())
    assert history == json.loads((uninterrupted / 'history.json').read_text())
    if where == 'bucket':  # the README's evaluation command and the loader, from the bucket
        line = evaluate(workdir)
        assert line['top1_error'] == results_without_time(uninterrupted)['eval_top1_error']
        assert (epath.Path(workdir) / 'eval_center.json').exists()
        np.testing.assert_array_equal(
            resnet_jax.load(workdir).variables['params']['fc']['kernel'],
            resnet_jax.load(uninterrupted).variables['params']['fc']['kernel'],
        )


def test_ema_weights_are_evaluated_loaded_and_kept_apart(uninterrupted, data_dir):
    full = uninterrupted
    r = results_without_time(full)
    assert [k for k in r if k.startswith('eval_ema_')] == [
        'eval_ema_loss',
        'eval_ema_top1_error',
        'eval_ema_top5_error',
    ]
    # The average of the last ~10 steps' weights is another network than the last one.
    assert math.isfinite(r['eval_ema_loss']) and 0 <= r['eval_ema_top1_error'] <= 1
    assert r['eval_ema_loss'] != r['eval_loss']
    history = json.loads((full / 'history.json').read_text())
    assert all('eval_ema_top1_error' in e for e in history['eval'])

    # The EMA weights through the evaluation CLI and the Python loader.
    line = evaluate(full, '--weights=ema')
    assert line['weights'] == 'ema'
    assert line['top1_error'] == pytest.approx(r['eval_ema_top1_error'], abs=1e-9)
    assert (full / 'eval_center_ema.json').exists()
    raw, ema_run = resnet_jax.load(full), resnet_jax.load(full, weights='ema')
    assert raw.step == ema_run.step == STEPS
    assert not np.allclose(
        raw.variables['params']['fc']['kernel'], ema_run.variables['params']['fc']['kernel']
    )

    # Resuming it without the EMA (or an EMA-less run with one) is refused in one line.
    code, out, err = finish(launch(tiny_args(full, data_dir, STEPS + 10)))
    assert code == 2 and err.strip().splitlines() == [
        f'error: the checkpoints in {full}/checkpoints (step {STEPS}) were written with ema_decay '
        '0.9 (this config: 0.0); resume with the same values, use another --workdir for a new '
        f'run, or start one from these weights with --config.init_from={full}'
    ]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(uninterrupted, data_dir, tmp_path):
    workdir = tmp_path / 'run'
    code, _, err = finish(launch(tiny_args(workdir, data_dir, 60)))
    assert code == 0, err[-2000:]
    latest = steps_in(workdir)[-1]
    for path in (workdir / 'checkpoints' / str(latest) / 'state').rglob('*'):
        if path.is_file():
            path.write_bytes(b'garbage')
    # A half-written step (what a kill during a save leaves) must be ignored too.
    (workdir / 'checkpoints' / '9999.orbax-checkpoint-tmp-1').mkdir()
    code, out, err = finish(launch(tiny_args(workdir, data_dir, 80)))
    assert code == 0, err[-2000:]
    previous = [s for s in [40, 20] if s < latest][0]
    assert f'warning: checkpoint step {latest} is corrupt (' in out
    assert f'resumed from step {previous}' in out
    assert list((workdir / 'checkpoints').glob(f'corrupt-{latest}-*'))  # kept, not deleted
    assert json.loads((workdir / 'results.json').read_text())['step'] == 80


def test_non_finite_loss_stops_naming_the_step_and_keeps_good_checkpoints(data_dir, tmp_path):
    args = tiny_args(
        tmp_path,
        data_dir,
        200,
        '--config.learning_rate=1e30',
        '--config.scale_lr_with_batch=False',
        '--config.checkpoint_every_steps=1',
    )
    code, out, err = finish(launch(args))
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith('error: the training ') and 'at step' in line
    bad_step = int(line.split('at step ')[1].split(';')[0])
    saved = steps_in(tmp_path)
    assert all(s < bad_step for s in saved)
    for step in saved[-1:]:
        state = ocp.StandardCheckpointer().restore(tmp_path / 'checkpoints' / str(step) / 'state')
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(state['params'])]
        assert all(np.isfinite(x).all() for x in leaves)


def test_second_run_on_a_workdir_in_use_is_refused(data_dir, tmp_path):
    with faults.WorkdirLock(tmp_path):
        code, out, err = finish(launch(tiny_args(tmp_path, data_dir, 5)))
    assert code == 2
    assert err.strip().splitlines() == [
        f'error: workdir {tmp_path} is in use by another run (pid {os.getpid()} on '
        f'{os.uname().nodename}); wait for it or use another --workdir'
    ]
    assert not (tmp_path / 'checkpoints').exists()


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_a_process_that_dies_takes_the_other_down_with_one_line(data_dir, tmp_path):
    """Process 1 killed (kill -9): process 0 ends within the heartbeat timeout (5 s here)
    and a few seconds, exit 1, with one line naming process 1 and the last complete
    checkpoint, which stays readable; no abort and no stack trace."""
    port = _free_port()
    args = tiny_args(
        tmp_path,
        data_dir,
        100_000,
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        '--heartbeat_timeout_seconds=5',
    )
    procs = [launch(args + [f'--process_id={i}'], devices=2) for i in range(2)]
    try:
        wait_for_checkpoint(tmp_path, procs[0], timeout=240)
        (run,) = children(forked.pid(procs[1]), b'resnet_jax.main')  # the process under its watch
        procs[1].kill()
        start = time.monotonic()
        results = _finish_all(procs, timeout=90)
        assert time.monotonic() - start < 5 + 30
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    code, _, err = results[0]
    last = run_identity.step_dirs(tmp_path / 'checkpoints')[0]
    assert code == 1 and err.splitlines() == [
        '[process 0] error: process 1 stopped answering (no heartbeat for 5 s, '
        '--heartbeat_timeout_seconds); this process stopped with it. The last complete '
        f'checkpoint: step {last} in {tmp_path}/checkpoints. Relaunch every process to '
        'resume.'
    ], err[-3000:]
    assert not os.path.exists(f'/proc/{run}')  # it followed its watch
    assert resnet_jax.load(tmp_path).step == last


def _two_processes(command, devices=2):
    """Two processes of ``python <command>`` (``{i}`` in an argument: the process index)
    joined on 127.0.0.1, with ``devices`` CPU devices each."""
    port = _free_port()
    return [
        forked.Popen(
            [
                sys.executable,
                *(arg.replace('{i}', str(i)) for arg in command),
                f'--coordinator_address=127.0.0.1:{port}',
                '--num_processes=2',
                f'--process_id={i}',
                '--heartbeat_timeout_seconds=20',
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(devices),
        )
        for i in range(2)
    ]


def _finish_all(procs, timeout=300):
    """Each process's ``(code, out, err)``; where any is still running after ``timeout`` s,
    a failure with every process's exit code and the end of its stderr (a hanging one's
    stacks)."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
                results.append((proc.returncode, out, err))
            except subprocess.TimeoutExpired:
                break
        else:
            return results
        reports = [
            f'process {i}: exit code {code}: {err[-1500:]}'
            for i, (code, _, err) in enumerate(results)
        ]
        for i, proc in enumerate(procs[len(results) :], len(results)):
            if proc.poll() is None:
                reports.append(f'process {i}: running after {timeout} s: {_stacks(proc)[-3000:]}')
            else:
                reports.append(
                    f'process {i}: exit code {proc.returncode}: {proc.communicate()[1][-1500:]}'
                )
        pytest.fail('\n'.join(reports))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def test_steady_state_steps_make_no_cross_host_call(data_dir, tmp_path):
    """Between log steps nothing crosses hosts outside the compiled step: in a run of 12
    steps (logging, evaluating and checkpointing at the last step only) each process makes
    the same cross-host calls by the end of step 1 as by the end of step 11; only the
    preemption check runs each step, and it is local (JAX's preemption service agrees on a
    stop step in the background)."""
    args = [
        f'--workdir={tmp_path / "run"}',
        f'--config.dataset.data_dir={data_dir}',
        *TINY,
        '--config.num_train_steps=12',
        '--config.lr_boundaries=(100,)',
        *(f'--config.{k}_every_steps=12' for k in ('log', 'eval', 'checkpoint')),
    ]
    command = [str(REPO / 'tests' / 'host_calls.py'), str(tmp_path / 'calls_{i}.json'), *args]
    for code, _out, err in _finish_all(_two_processes(command), timeout=150):
        assert code == 0, err[-3000:]
    for i in range(2):
        calls = json.loads((tmp_path / f'calls_{i}.json').read_text())
        by_step = {int(step): counts for step, counts in calls['by_step'].items()}
        assert sorted(by_step)[:12] == list(range(1, 13))
        assert sum(by_step[1].values()) > 0  # the set-up's calls, counted
        # One preemption check per step, and nothing else, from step 1 to step 11
        assert by_step[11].pop('reached_preemption_sync_point') == 10
        assert by_step[1].pop('reached_preemption_sync_point', 0) == 0
        assert by_step[11] == by_step[1], (by_step[1], by_step[11])
        final = calls['counts']  # the final log, evaluation and checkpoint do cross hosts
        assert sum(final.values()) > sum(by_step[11].values()) + 10


def test_one_device_per_process_saves_and_stops(data_dir, tmp_path):
    """Two processes with one device each (one process per GPU): SIGTERM to one stops both
    at the same step with a checkpoint."""
    # Saved right after a log step (the metrics freshly reset), where JAX's device_put of a
    # device array gave an array orbax refused (see loop.empty_metrics).
    args = tiny_args(tmp_path, data_dir, 100_000, '--config.log_every_steps=10')
    procs = _two_processes(['-m', 'resnet_jax.main', *args], devices=1)
    try:
        wait_for_checkpoint(tmp_path, procs[0], timeout=240)
        procs[1].send_signal(signal.SIGTERM)
        results = _finish_all(procs, timeout=120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    stopped = []
    for code, out, err in results:
        assert code == 0, err[-3000:]
        line = [x for x in out.splitlines() if 'stopped by' in x][0]
        stopped.append(int(line.split(' at step ')[1].split(';')[0]))
        assert 'checkpoint saved' in line
    assert stopped[0] == stopped[1] and steps_in(tmp_path)[-1] == stopped[0]
    assert not (tmp_path / 'results.json').exists()


def _evaluate(workdir, processes):
    """Every protocol in one launch of ``evaluate``: its records, by protocol."""
    args = ['-m', 'resnet_jax', 'evaluate', f'--workdir={workdir}', '--batch_size=128']
    args += [f'--protocol={p}' for p in PROTOCOLS]
    if processes == 1:
        procs = [
            forked.Popen(
                [sys.executable, *args],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4'),
            )
        ]
    else:
        procs = _two_processes(args)
    results = _finish_all(procs)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    for _, out, _ in results[1:]:  # process 0 alone reports
        assert 'top-1 error' not in out and '"protocol"' not in out
    records = [json.loads(x) for x in results[0][1].splitlines() if x.startswith('{')]
    assert [r['protocol'] for r in records] == list(PROTOCOLS)
    assert {(r['processes'], r['devices']) for r in records} == {(processes, 4)}
    return {r['protocol']: r for r in records}


def test_two_processes_evaluate_every_protocol_as_one_process(uninterrupted):
    one, two = _evaluate(uninterrupted, 1), _evaluate(uninterrupted, 2)
    for protocol in PROTOCOLS:
        assert one[protocol]['num_images'] == two[protocol]['num_images'] == 360
        for key in ('top1_error', 'top5_error'):
            assert two[protocol][key] == pytest.approx(one[protocol][key], abs=1e-9), protocol
    # the centre crop: what the training loop measured on the same split
    final = json.loads((uninterrupted / 'results.json').read_text())
    assert one['center']['top1_error'] == pytest.approx(final['eval_top1_error'], abs=1e-9)


def test_processes_agree_on_view_shapes_they_do_not_share(monkeypatch):
    """Multi-scale views have per-image shapes: every process runs every shape any process
    has (padded rows where it has none), in one order, with each shape's largest count."""
    from jax.experimental import multihost_utils

    from resnet_jax.evaluation import protocols

    mine = {(224, 288, 3): 6, (224, 224, 3): 2}
    theirs = {(224, 224, 3): 4, (288, 224, 3): 2, (256, 320, 3): 2}

    def allgather(x):  # this process and one other
        x = np.asarray(x)
        if x.ndim == 0:
            return np.stack([x, np.int32(len(theirs))])
        other = np.zeros_like(x)
        for i, (shape, count) in enumerate(sorted(theirs.items())):
            other[i] = (*shape, count)
        return np.stack([x, other])

    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    monkeypatch.setattr(multihost_utils, 'process_allgather', allgather)
    assert protocols.agree_on_shapes(mine, multiple=4) == [
        ((224, 224, 3), 4),
        ((224, 288, 3), 8),
        ((256, 320, 3), 4),
        ((288, 224, 3), 4),
    ]
    calls = []

    def predict(views, rows):
        calls.append((views.shape, rows))
        return np.full((len(views), 2), 0.5)

    images = [np.zeros((1, 1, 3))]
    views_of = lambda image: [np.zeros((2, 224, 288, 3), np.float32)]
    scores = protocols.average_scores(
        predict, views_of, images, 2, lambda local: protocols.agree_on_shapes(local, 4)
    )
    assert [rows for _, rows in calls] == [4, 4, 4, 4]  # every agreed shape, in order
    assert calls[1][0] == (2, 224, 288, 3) and calls[0][0] == (0, 224, 224, 3)
    np.testing.assert_allclose(scores, 0.5)
