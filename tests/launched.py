"""The launcher as a user meets it, for the edge tests: a tiny run's command line, its
process, its workdir's files and its one error line."""

import contextlib
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import forked
import pytest
from conftest import REPO

TINY = [
    '--config.model.name=cifar_resnet8',
    '--config.batch_size=16',
    '--config.model.bn_group_size=4',
    '--config.eval_batch_size=360',
    '--config.num_train_steps=30',
    '--config.lr_boundaries=(20,)',
    '--config.log_every_steps=5',
    '--config.eval_every_steps=10',
    '--config.checkpoint_every_steps=5',
    '--config.keep_checkpoints=10',
]


def command(workdir, data_dir, *extra, module='resnet_jax.main'):
    given = {arg.split('=')[0] for arg in extra}  # (a tuple field given twice is refused)
    return [
        sys.executable,
        '-m',
        module,
        f'--workdir={workdir}',
        f'--config.dataset.data_dir={data_dir}',
        *(arg for arg in TINY if arg.split('=')[0] not in given),
        *extra,
    ]


def launch(args, **kwargs):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
    return forked.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def finish(proc, timeout=240):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f'the process did not end within {timeout} s: {err[-2000:]}')
    return proc.returncode, out, err


def run(args, timeout=240, **kwargs):
    return finish(launch(args, **kwargs), timeout)


def snapshot(workdir) -> dict[str, str]:
    """Every file under ``workdir`` (its checkpoints, config.json, ...) and its SHA-256."""
    root = pathlib.Path(workdir)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob('*'))
        if p.is_file()
    }


def steps_in(workdir):
    return sorted(
        int(p.name) for p in (pathlib.Path(workdir) / 'checkpoints').iterdir() if p.name.isdigit()
    )


def results_without_time(workdir):
    results = json.loads((pathlib.Path(workdir) / 'results.json').read_text())
    results.pop('wall_seconds')
    return results


def one_error_line(err, out=''):
    """The single line on stderr (and no traceback anywhere)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.match(r'(\[process \d+\] )?error: ', lines[0]), err[-3000:]
    assert 'Traceback' not in out + err
    return lines[0]


@contextlib.contextmanager
def unwritable(path):
    """``path`` (a directory) refuses new files, for root too: the immutable attribute
    (root, as on the project's machines and CI), else the permission bits."""
    path = pathlib.Path(path)
    if os.geteuid() == 0:
        subprocess.run(['chattr', '+i', str(path)], check=True)
        try:
            yield
        finally:
            subprocess.run(['chattr', '-i', str(path)], check=True)
    else:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(mode)


def wait_for_step(workdir, proc, step, timeout=120):
    deadline = time.time() + timeout
    while not (workdir / 'checkpoints' / str(step)).is_dir():
        assert proc.poll() is None, finish(proc)[2][-3000:]
        assert time.time() < deadline, 'no checkpoint in time'
        time.sleep(0.02)
