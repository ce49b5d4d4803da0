"""Preemption, kill -9, corrupt checkpoints, diverging losses, locks and multi-process runs.

Every test launches ``python -m resnet_jax.main`` as a user (or a scheduler) would, on a
tiny net, and bounds each process in time.
"""

import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from resnet_jax import faults
from conftest import REPO

pytestmark = pytest.mark.slow

TINY = ['--config.model.name=cifar_resnet8', '--config.batch_size=16',
        '--config.model.bn_group_size=4', '--config.eval_batch_size=360',
        '--compilation_cache_dir=']


def tiny_args(workdir, data_dir, steps=300, *extra):
    return [f'--workdir={workdir}', f'--config.dataset.data_dir={data_dir}', *TINY,
            f'--config.num_train_steps={steps}', f'--config.lr_boundaries=({steps // 2},)',
            '--config.log_every_steps=7', '--config.eval_every_steps=100',
            '--config.checkpoint_every_steps=20', *extra]


def launch(args, devices=1, **kwargs):
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    return subprocess.Popen([sys.executable, '-m', 'resnet_jax.main', *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def finish(proc, timeout=300):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f'process did not finish in {timeout} s: {err[-2000:]}')
    return proc.returncode, out, err


def steps_in(workdir):
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / 'checkpoints').glob('*')
                  if p.name.isdigit())


def wait_for_checkpoint(workdir, proc, timeout=180):
    deadline = time.time() + timeout
    while not steps_in(workdir):
        assert proc.poll() is None, finish(proc)[2][-2000:]
        assert time.time() < deadline, 'no checkpoint in time'
        time.sleep(0.05)


def results_without_time(workdir):
    results = json.loads((pathlib.Path(workdir) / 'results.json').read_text())
    results.pop('wall_seconds')
    return results


@pytest.fixture(scope='module')
def uninterrupted(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp('uninterrupted')
    code, out, err = finish(launch(tiny_args(workdir, data_dir)))
    assert code == 0, err[-2000:]
    return workdir


@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_exactly_the_uninterrupted_result(sig, uninterrupted, data_dir,
                                                               tmp_path):
    proc = launch(tiny_args(tmp_path, data_dir))
    wait_for_checkpoint(tmp_path, proc)
    time.sleep(random.Random(sig).uniform(0.0, 1.5))  # a random moment after it
    proc.send_signal(sig)
    code, out, err = finish(proc)
    if sig == signal.SIGTERM and code == 0 and 'stopped by' in out:
        stopped_at = int(out.split('stopped by SIGTERM at step ')[1].split(';')[0])
        assert steps_in(tmp_path)[-1] == stopped_at  # it checkpointed where it stopped
        assert 'checkpoint saved' in out
        assert not (tmp_path / 'results.json').exists()
    else:  # killed (or it had already finished)
        assert code in (-signal.SIGKILL, 0), err[-2000:]
    code, out, err = finish(launch(tiny_args(tmp_path, data_dir)))
    assert code == 0, err[-2000:]
    assert results_without_time(tmp_path) == results_without_time(uninterrupted)
    history = json.loads((tmp_path / 'history.json').read_text())
    assert history == json.loads((uninterrupted / 'history.json').read_text())


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(uninterrupted, data_dir,
                                                              tmp_path):
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
    assert f'checkpoint step {latest} is unreadable' in out
    assert f'resumed from step {previous}' in out
    assert list((workdir / 'checkpoints').glob(f'corrupt-{latest}-*'))  # kept, not deleted
    assert json.loads((workdir / 'results.json').read_text())['step'] == 80


def test_non_finite_loss_stops_naming_the_step_and_keeps_good_checkpoints(data_dir, tmp_path):
    args = tiny_args(tmp_path, data_dir, 200, '--config.learning_rate=1e30',
                     '--config.scale_lr_with_batch=False',
                     '--config.checkpoint_every_steps=1')
    code, out, err = finish(launch(args))
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith('error: the training ') and 'at step' in line
    bad_step = int(line.split('at step ')[1].split(';')[0])
    saved = steps_in(tmp_path)
    assert all(s < bad_step for s in saved)
    for step in saved[-1:]:
        state = ocp.StandardCheckpointer().restore(
            tmp_path / 'checkpoints' / str(step) / 'state')
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(state['params'])]
        assert all(np.isfinite(x).all() for x in leaves)


def test_second_run_on_a_workdir_in_use_is_refused(data_dir, tmp_path):
    with faults.WorkdirLock(tmp_path):
        code, out, err = finish(launch(tiny_args(tmp_path, data_dir, 5)))
    assert code == 2
    assert err.strip().splitlines() == [
        f'error: workdir {tmp_path} is in use by another run (pid {os.getpid()} on '
        f'{os.uname().nodename}); wait for it or use another --workdir']
    assert not (tmp_path / 'checkpoints').exists()


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_four_devices(data_dir, tmp_path):
    common = [f'--config.dataset.data_dir={data_dir}', *TINY, '--config.num_train_steps=6',
              '--config.lr_boundaries=(3,)', '--config.log_every_steps=1',
              '--config.eval_every_steps=3', '--config.checkpoint_every_steps=3']
    one = launch([f'--workdir={tmp_path / "one"}', *common], devices=4)
    port = _free_port()
    two = [launch([f'--workdir={tmp_path / "two"}', *common, f'--coordinator_address=127.0.0.1:'
                   f'{port}', '--num_processes=2', f'--process_id={i}',
                   '--heartbeat_timeout_seconds=20'], devices=2) for i in range(2)]
    try:
        for proc in [one, *two]:
            code, out, err = finish(proc, timeout=240)
            assert code == 0, err[-3000:]
    finally:
        for proc in two:
            if proc.poll() is None:
                proc.kill()
    a = json.loads((tmp_path / 'one' / 'history.json').read_text())['train']
    b = json.loads((tmp_path / 'two' / 'history.json').read_text())['train']
    assert [r['step'] for r in a] == [r['step'] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert y['train_loss'] == pytest.approx(x['train_loss'], rel=1e-4)
    assert steps_in(tmp_path / 'two') == [3, 6]


def test_a_dead_process_takes_the_other_down_with_a_message(data_dir, tmp_path):
    port = _free_port()
    args = tiny_args(tmp_path, data_dir, 100_000, f'--coordinator_address=127.0.0.1:{port}',
                     '--num_processes=2', '--heartbeat_timeout_seconds=5')
    procs = [launch(args + [f'--process_id={i}'], devices=2) for i in range(2)]
    try:
        wait_for_checkpoint(tmp_path, procs[0], timeout=240)
        procs[1].kill()
        start = time.time()
        code, out, err = finish(procs[0], timeout=90)
        assert time.time() - start < 60
        assert code != 0
        assert 'another task died' in err or 'unhealthy' in err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
