"""A run that stops while running: a checkpoint that cannot be written, a divergence, a
stop signal (also while its input is stuck). Each ends in bounded time with one line
(exit 1; exit 0 for a stop signal that reaches a step's end), every earlier checkpoint
kept.
"""

import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import time

import forked
import pytest
from conftest import children
from launched import (
    command,
    finish,
    launch,
    one_error_line,
    results_without_time,
    run,
    snapshot,
    steps_in,
    unwritable,
    wait_for_step,
)
from photos import make_photo_folder

pytestmark = pytest.mark.slow


# --- checkpoints that cannot be written --------------------------------------------------------


def _logged_steps(out):
    return [int(m) for m in re.findall(r'^\[(\d+)\] train_loss', out, re.M)]


def _check_write_failure(workdir, proc, cause, started):
    code, out, err = finish(proc, timeout=120)
    assert time.time() - started < 120  # no hang
    assert code == 1, err[-3000:]
    line = one_error_line(err, out)
    match = re.match(
        rf'error: cannot write (checkpoint step (\d+) in {workdir}/checkpoints|'
        rf'{workdir}/.+?): ({cause}); the last complete checkpoint is step (\d+) '
        r'\(kept\)\. Free space or fix the folder, then relaunch the same command '
        r'to resume$',
        line,
    )
    assert match, line
    failed, last = int(match.group(2) or 0), int(match.group(4))
    assert steps_in(workdir)[-1] == last
    if failed:
        # stopped at once: never on to the next checkpoint step (every 5)
        assert max(_logged_steps(out), default=0) < failed + 5, out[-2000:]
    return last


def test_checkpoint_folder_made_unwritable_during_the_run_stops_it_at_once(data_dir, tmp_path):
    proc = launch(
        command(tmp_path, data_dir, '--config.num_train_steps=100000', '--config.log_every_steps=1')
    )
    started = time.time()
    wait_for_step(tmp_path, proc, 10)
    kept = {k: v for k, v in snapshot(tmp_path).items() if k.startswith('checkpoints/5/')}
    with unwritable(tmp_path / 'checkpoints'):
        last = _check_write_failure(
            tmp_path, proc, 'Operation not permitted|Permission denied', started
        )
    assert last >= 10
    assert {k: v for k, v in snapshot(tmp_path).items() if k.startswith('checkpoints/5/')} == kept


@contextlib.contextmanager
def small_disk(path, size='1200k'):
    """``path`` on a file system of ``size`` (a tmpfs: root); None where it cannot be."""
    if os.geteuid() != 0:
        yield False
        return
    subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)], check=True)
    try:
        yield True
    finally:
        subprocess.run(['umount', '-l', str(path)], check=True)


def test_full_disk_stops_the_run_at_once_keeping_the_earlier_checkpoints(data_dir, tmp_path):
    """A checkpoint that cannot be written (here a disk that fills up; as any other user,
    a file-size limit) stops the run with one line, no hang, the earlier steps kept."""
    workdir = tmp_path / 'run'
    workdir.mkdir()
    with small_disk(workdir) as mounted:
        proc = launch(
            command(
                workdir, data_dir, '--config.num_train_steps=100000', '--config.log_every_steps=1'
            )
        )
        cause = 'No space left on device'
        if not mounted:  # no tmpfs without root: files may not grow past the limit once set
            wait_for_step(workdir, proc, 5)
            resource.prlimit(forked.pid(proc), resource.RLIMIT_FSIZE, (1, 1))
            cause = 'File too large'
        started = time.time()
        last = _check_write_failure(workdir, proc, cause, started)
        assert last >= 5
        # the kept checkpoints restore (read with the loader, checksums verified)
        import resnet_jax

        assert (
            resnet_jax.load(
                workdir,
                config=None if (workdir / 'config.json').exists() else _tiny_config(data_dir),
            ).step
            == last
        )


def _tiny_config(data_dir):
    from resnet_jax.config import base_config

    config = base_config()
    config.model.name, config.batch_size, config.model.bn_group_size = 'cifar_resnet8', 16, 4
    return config


# --- after a divergence ----------------------------------------------------------------------


def test_diverged_run_names_its_checkpoints_and_resumes_from_an_earlier_one(data_dir, tmp_path):
    """Warm-up at 0.01 for 4 steps, then lr 1e8: step 6 is saved blown up (finite, huge)
    and step 7 is not finite. The stop message lists the checkpoints with their loss and
    parameter norm; --resume_step=4 with a sane rate resumes from step 4, keeping step 6
    aside; the same command again continues that run."""
    base = [
        '--config.checkpoint_every_steps=2',
        '--config.log_every_steps=1',
        '--config.lr_boundaries=(100,)',
        '--config.num_train_steps=12',
    ]
    code, out, err = run(
        command(
            tmp_path,
            data_dir,
            *base,
            '--config.warmup_steps=4',
            '--config.warmup_learning_rate=0.01',
            '--config.learning_rate=1e8',
        )
    )
    assert code == 1
    line = one_error_line(err, out)
    assert re.match(
        r'error: the training (loss|parameter norm) is (nan|inf|-inf) at step 7; '
        r'stopped without saving that state\. Checkpoints on disk: step 2 \(loss '
        r'[\d.]+, parameter norm 24\.\d+\), step 4 \(loss [\d.]+, parameter norm '
        r'24\.\d+\), step 6 \(loss [\d.e+]+, parameter norm [\d.]+e\+\d+\)\. Lower '
        r'the learning rate or add warm-up, and relaunch with --resume_step=STEP to '
        r'resume from an earlier one',
        line,
    ), line
    blown_up = snapshot(tmp_path / 'checkpoints' / '6')

    resume = command(tmp_path, data_dir, *base, '--resume_step=4')
    code, out, err = run(resume)
    assert code == 0, err[-3000:]
    assert 'resuming from step 4: the later checkpoints (6) are kept as' in out
    assert 'resumed from step 4' in out
    assert results_without_time(tmp_path)['train_loss'] < 10
    aside = list((tmp_path / 'checkpoints').glob('rolled-back-6-*'))
    assert len(aside) == 1 and snapshot(aside[0]) == blown_up
    code, out, err = run(resume[:-1] + ['--config.num_train_steps=14', '--resume_step=4'])
    assert code == 0, err[-3000:]  # the same flag again: the resumed run goes on
    assert 'resumed from step 12' in out and 'resuming from' not in out

    code, out, err = run(command(tmp_path, data_dir, *base, '--resume_step=3'))
    assert code == 2
    assert re.match(
        r'error: --resume_step=3: .* has no checkpoint of step 3; it has: step ',
        one_error_line(err, out),
    )


def test_sigterm_checkpoints_and_the_first_save_writes_config_json(data_dir, tmp_path):
    """A stop request still checkpoints and exits 0 with the new checkpointer (its first
    save writes config.json)."""
    proc = launch(command(tmp_path, data_dir, '--config.num_train_steps=100000'))
    wait_for_step(tmp_path, proc, 5)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc, timeout=120)
    assert code == 0, err[-3000:]
    stopped = int(re.search(r'stopped by SIGTERM at step (\d+)', out).group(1))
    assert steps_in(tmp_path)[-1] == stopped
    assert json.loads((tmp_path / 'config.json').read_text())['model']['name'] == 'cifar_resnet8'


def test_an_error_line_names_its_process_in_a_multi_process_run(monkeypatch, capsys):
    import jax

    from resnet_jax import cli_shared

    monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: True)
    monkeypatch.setattr(jax, 'process_index', lambda: 3)
    ended = []  # (it ends at once, not at JAX's shutdown barrier)
    monkeypatch.setattr(os, '_exit', ended.append)
    with pytest.raises(SystemExit):  # (after the stand-in os._exit returned)
        cli_shared.fail('workdir gs://b/run is not writable: 403 Forbidden')
    assert ended == [2]
    assert capsys.readouterr().err == (
        '[process 3] error: workdir gs://b/run is not writable: 403 Forbidden\n'
    )


def test_sigterm_while_the_input_is_stuck_ends_the_run_within_30_s(data_dir, tmp_path):
    """Input workers that never answer (stopped, as on a hung network disk): the loop waits
    for a batch, SIGTERM cannot reach a step's end, and a watchdog ends the run 5 s later
    with one line naming the wait and the last complete checkpoint, which stays intact."""
    photos = make_photo_folder(tmp_path / 'photos', layout='train/val')
    workdir = tmp_path / 'run'
    proc = launch(
        command(
            workdir,
            data_dir,
            f'--config.dataset.name=folder:{photos}',
            '--config.dataset.image_size=32',
            '--config.batch_size=8',
            '--config.num_train_steps=100000',
            '--config.eval_every_steps=100000',
            '--stop_grace_seconds=5',  # (25 by default)
        )
    )
    stopped = []
    try:
        wait_for_step(workdir, proc, 5)
        stopped = children(forked.pid(proc), b'spawn_main')  # grain's workers
        assert stopped, 'no input worker found'
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(5)  # the batches already built are used up
        saved = steps_in(workdir)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code, out, err = finish(proc, timeout=60)
        assert time.monotonic() - sent < 30
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert code == 1, err[-3000:]
    line = one_error_line(re.sub(r'preparing folder:.*\n', '', err), out)
    assert re.fullmatch(
        r'error: SIGTERM received, but the run did not end within 5 s \(waiting in the '
        r'input pipeline: .+\); ended\. The last complete checkpoint: step '
        rf'{saved[-1]} in {workdir}/checkpoints\.',
        line,
    ), line
    assert steps_in(workdir) == saved
