"""Nothing lost at the edges: what a tired user types, what a file system does, and what a
diverged run leaves, met where a user meets them (the launcher and ``evaluate``).

Every refusal is one line and exit code 2, before anything is written: the workdir's
files (checkpoints, ``config.json``) are byte-identical before and after. Every failure
while running (a checkpoint that cannot be written, a divergence) is one line and exit
code 1, in bounded time, with every earlier checkpoint kept. Every fallback (a corrupt
checkpoint) resumes from the step before and ends with the uninterrupted run's results,
bit for bit.
"""

import contextlib
import hashlib
import json
import os
import pathlib
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

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
    return subprocess.Popen(
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


@pytest.fixture(scope='module')
def finished(data_dir, tmp_path_factory):
    """An uninterrupted run of 30 steps, checkpointed every 5."""
    workdir = tmp_path_factory.mktemp('finished')
    code, out, err = run(command(workdir, data_dir))
    assert code == 0, err[-3000:]
    assert steps_in(workdir) == [5, 10, 15, 20, 25, 30]
    return workdir


@pytest.fixture
def copy_of(finished, tmp_path):
    def copy(results=True):
        workdir = tmp_path / 'run'
        shutil.copytree(finished, workdir)
        if not results:
            (workdir / 'results.json').unlink()
        return workdir

    return copy


# --- config values and config files ----------------------------------------------------------


@pytest.mark.parametrize(
    'args, message',
    [
        (['--config.checkpoint_every_steps=0'], 'checkpoint_every_steps must be positive; got 0'),
        (['--config.eval_every_steps=0'], 'eval_every_steps must be positive; got 0'),
        (['--config.log_every_steps=0'], 'log_every_steps must be positive; got 0'),
        (['--config.keep_checkpoints=0'], 'keep_checkpoints must be positive; got 0'),
        (['--config.keep_checkpoints=-1'], 'keep_checkpoints must be positive; got -1'),
        (
            ['--config.lr_boundaries=abc'],
            r'lr_boundaries must be a tuple of iterations, e.g. '
            r"--config.lr_boundaries='\(32000,48000\)'; got \(.*'abc',?\)",
        ),
        (['--config.lr_boundaries=(20,10)'], r'lr_boundaries must be in increasing order'),
        (  # config_flags would append each to the tuple
            ['--config.lr_boundaries=20', '--config.lr_boundaries=abc'],
            r'--config.lr_boundaries is given \d times; give the whole tuple once',
        ),
        (['--config.learning_rate=nan'], 'learning_rate must be a finite number; got nan'),
        (['--config.learning_rate=inf'], 'learning_rate must be a finite number; got inf'),
        (['--config.batch_size=abc'], "batch_size must be an integer; got 'abc'"),
        (['--config.batch_size=2.5'], "batch_size must be an integer; got '2.5'"),
        (['--config.dataset.augment=maybe'], "dataset.augment must be True or False; got 'maybe'"),
        (['--config.momentum=1.5'], r'momentum must be in \[0, 1\); got 1.5'),
        (['--config.seed=-1'], r'seed must be in \[0, 2147483647\]; got -1'),
        (
            ['--config.dataset.crop=random'],
            "unknown dataset.crop 'random'; allowed: scale, inception",
        ),
        (['--config.model.shortcut=D'], "unknown model.shortcut 'D'; allowed: A, B, C"),
        (['--config.bogus=1'], "unknown config field 'bogus'"),
        (['--resume_step=-3'], r'--resume_step must be a checkpoint step \(>= 0\); got -3'),
        (['--workdirr=x'], 'unknown flag --workdirr'),
    ],
)
def test_bad_value_is_one_line_and_changes_nothing(args, message, copy_of, data_dir):
    workdir = copy_of()
    before = snapshot(workdir)
    code, out, err = run(command(workdir, data_dir, *args))
    assert code == 2, err[-3000:]
    assert re.search(message, one_error_line(err, out)), err
    assert out == ''  # no header, no log line before the error
    assert snapshot(workdir) == before


def test_a_batch_larger_than_the_data_is_refused_before_anything_is_written(data_dir, tmp_path):
    code, out, err = run(command(tmp_path / 'run', data_dir, '--config.batch_size=100000'))
    assert code == 2, err[-3000:]
    assert one_error_line(err, out) == (
        'error: batch_size=100000 is larger than the training split of digits (1437 examples)'
    )
    assert list(tmp_path.iterdir()) == []


CONFIG_FILES = {
    'syntax.py': (
        'def get_config(:\n    pass\n',
        r'cannot load config file .*syntax\.py: SyntaxError: invalid syntax',
    ),
    'raises.py': (
        'def get_config():\n    raise RuntimeError("no such recipe")\n',
        r'cannot load config file .*raises\.py: RuntimeError: no such recipe',
    ),
    'none.py': (
        'def get_config():\n    return None\n',
        r'config file .*none\.py: get_config\(\) returned None; it must return an '
        r'ml_collections\.ConfigDict',
    ),
    'dict.py': (
        'def get_config():\n    return {"batch_size": 16}\n',
        r'get_config\(\) returned a dict',
    ),
    'noget.py': ('config = 1\n', r'noget\.py: it has no get_config\(\)'),
    'typo.py': (
        'from resnet_jax.config import base_config\n\ndef get_config():\n'
        '    c = base_config()\n    c.batchsize = 64\n    return c\n',
        "unknown config field 'batchsize'",
    ),
    'missing.py': (None, r'cannot load config file .*missing\.py: it does not exist'),
}


@pytest.mark.parametrize('name', sorted(CONFIG_FILES))
def test_config_file_that_does_not_load_is_one_line(name, copy_of, data_dir, tmp_path):
    text, message = CONFIG_FILES[name]
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    workdir = copy_of()
    before = snapshot(workdir)
    code, out, err = run(
        [sys.executable, '-m', 'resnet_jax.main', f'--workdir={workdir}', f'--config={path}']
    )
    assert code == 2, err[-3000:]
    assert re.search(message, one_error_line(err, out)), err
    assert snapshot(workdir) == before


def test_checkpoints_that_are_a_file_are_refused(data_dir, tmp_path):
    (tmp_path / 'checkpoints').write_text('keep')
    code, out, err = run(command(tmp_path, data_dir))
    assert code == 2
    assert one_error_line(err, out) == (
        f'error: {tmp_path}/checkpoints is not a directory (the run keeps its checkpoints '
        'there); move it or use another --workdir'
    )
    assert snapshot(tmp_path) == {'checkpoints': hashlib.sha256(b'keep').hexdigest()}


def test_unwritable_checkpoint_folder_is_refused_at_start(copy_of, data_dir):
    workdir = copy_of(results=False)
    before = snapshot(workdir)
    with unwritable(workdir / 'checkpoints'):
        code, out, err = run(command(workdir, data_dir), timeout=120)
    assert code == 2
    assert re.match(
        rf'error: checkpoint folder {workdir}/checkpoints is not writable: ',
        one_error_line(err, out),
    )
    assert snapshot(workdir) == before


# --- a run's identity ------------------------------------------------------------------------


@pytest.mark.parametrize(
    'args, fields',
    [
        (['--config.model.shortcut=C'], "model.shortcut 'A' (this config: 'C')"),
        (['--config.optimizer=lars'], "optimizer 'sgd' (this config: 'lars')"),
        (['--config.batch_size=32'], 'batch_size 16 (this config: 32)'),
        (
            ['--config.seed=1', '--config.dataset.augment=False'],
            'dataset.augment True (this config: False), seed 0 (this config: 1)',
        ),
        (['--config.ema_decay=0.9'], 'ema_decay 0.0 (this config: 0.9)'),
        (['--config.grad_accum_steps=2'], 'grad_accum_steps 1 (this config: 2)'),
        (
            ['--config.model.name=cifar_plain8'],
            "model.name 'cifar_resnet8' (this config: 'cifar_plain8')",
        ),
    ],
)
def test_resume_with_another_identity_is_refused_naming_the_fields(args, fields, copy_of, data_dir):
    """A checkpoint of another config is never taken for a corrupt one: refused, nothing
    set aside, and the original config resumes as before."""
    workdir = copy_of(results=False)
    before = snapshot(workdir)
    code, out, err = run(command(workdir, data_dir, '--config.num_train_steps=40', *args))
    assert code == 2, err[-3000:]
    assert one_error_line(err, out) == (
        f'error: the checkpoints in {workdir}/checkpoints (step 30) were written with '
        f'{fields}; resume with the same values, use another --workdir for a new run, or '
        f'start one from these weights with --config.init_from={workdir}'
    )
    assert out == ''  # refused before the run's header
    assert snapshot(workdir) == before
    if args == ['--config.model.shortcut=C']:  # the original config resumes its run
        code, out, err = run(command(workdir, data_dir))
        assert code == 0 and 'resumed from step 30' in out, err[-3000:]
        assert not list((workdir / 'checkpoints').glob('corrupt-*'))


def test_changed_hyperparameters_resume(copy_of, data_dir):
    """The learning rate, the schedule's length and the intervals are not the run's
    identity: a run continues with new ones (the recovery of a divergence needs it)."""
    workdir = copy_of(results=False)
    code, out, err = run(
        command(
            workdir,
            data_dir,
            '--config.learning_rate=0.05',
            '--config.num_train_steps=35',
            '--config.log_every_steps=7',
        )
    )
    assert code == 0, err[-3000:]
    assert 'resumed from step 30' in out and steps_in(workdir)[-1] == 35


# --- integrity -------------------------------------------------------------------------------


def damage(path, count=64):
    """Flips ``count`` bytes in the middle of ``path``: the same size, other contents."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(len(data), middle + count)):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_same_size_damage_falls_back_to_the_previous_checkpoint_bit_for_bit(
    copy_of, finished, data_dir
):
    """Bit rot in the latest checkpoint's arrays (no file shorter, none missing) is found by
    its checksums, or first by tensorstore where the damaged bytes fall in a part it checks
    itself (the files' layout varies from save to save): the run resumes from the step
    before and ends as the uninterrupted run."""
    workdir = copy_of(results=False)
    largest = max(
        (workdir / 'checkpoints' / '30' / 'state').rglob('d/*'), key=lambda p: p.stat().st_size
    )  # array data, not their metadata
    damage(largest)
    code, out, err = run(command(workdir, data_dir))
    assert code == 0, err[-3000:]
    assert re.search(
        r'^warning: checkpoint step 30 is corrupt \((the contents of .* differ from the '
        r'sha256 checksum recorded with it|.*reading array.*)\); it is kept as corrupt-30-\*',
        out,
        re.M,
    ), out
    assert 'resumed from step 25' in out
    assert len(list((workdir / 'checkpoints').glob('corrupt-30-*'))) == 1  # kept
    assert results_without_time(workdir) == results_without_time(finished)
    assert json.loads((workdir / 'history.json').read_text()) == json.loads(
        (finished / 'history.json').read_text()
    )


def test_evaluate_passes_over_a_corrupt_checkpoint_and_reads_only_the_weights(copy_of):
    workdir = copy_of()
    for path in (workdir / 'checkpoints' / '30' / 'state').rglob('d/*'):
        damage(path, count=8)
    before = {k: v for k, v in snapshot(workdir).items() if 'eval_' not in k}
    args = [sys.executable, '-m', 'resnet_jax', 'evaluate', f'--workdir={workdir}']
    code, out, err = run(args)
    assert code == 0, err[-3000:]
    assert re.search(
        rf'^warning: checkpoint step 30 in {workdir}/checkpoints is corrupt '
        r'\(.*\); using the previous one$',
        out,
        re.M,
    ), out
    assert 'Traceback' not in err and 'Event loop' not in err
    fallback = json.loads(out.strip().splitlines()[-1])
    code, out, err = run(args + ['--step=25'])
    assert code == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])['top1_error'] == fallback['top1_error']
    assert fallback['step'] == 25
    code, out, err = run(args + ['--step=30'])  # asked for by number: an error
    assert code == 2 and re.match(
        r'error: checkpoint step 30 in .* is corrupt', one_error_line(err, out)
    )
    after = {k: v for k, v in snapshot(workdir).items() if 'eval_' not in k}
    assert after == before  # nothing moved aside by evaluation


def test_load_of_a_missing_step_names_the_steps(finished):
    import resnet_jax
    from resnet_jax.config import ConfigError

    with pytest.raises(
        ConfigError,
        match=r'has no checkpoint of step 7; it has steps 5, 10, '
        r'15, 20, 25, 30',
    ):
        resnet_jax.load(finished, step=7)


# --- checkpoints that cannot be written --------------------------------------------------------


def _wait_for_step(workdir, proc, step, timeout=120):
    deadline = time.time() + timeout
    while not (workdir / 'checkpoints' / str(step)).is_dir():
        assert proc.poll() is None, finish(proc)[2][-3000:]
        assert time.time() < deadline, 'no checkpoint in time'
        time.sleep(0.02)


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
    _wait_for_step(tmp_path, proc, 10)
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
        if mounted:
            proc = launch(
                command(
                    workdir,
                    data_dir,
                    '--config.num_train_steps=100000',
                    '--config.log_every_steps=1',
                )
            )
            cause = 'No space left on device'
        else:  # no tmpfs without root: files may not grow past the limit once it is set
            proc = launch(
                command(
                    workdir,
                    data_dir,
                    '--config.num_train_steps=100000',
                    '--config.log_every_steps=1',
                )
            )
            _wait_for_step(workdir, proc, 5)
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1, 1))
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


# --- evaluate ---------------------------------------------------------------------------------


def test_evaluate_refuses_another_models_config_before_reading(copy_of):
    workdir = copy_of()
    before = snapshot(workdir)
    code, out, err = run(
        [
            sys.executable,
            '-m',
            'resnet_jax',
            'evaluate',
            f'--workdir={workdir}',
            '--config=configs/cifar10.py:resnet56',
        ],
        timeout=120,
    )
    assert code == 2
    assert one_error_line(err, out) == (
        f'error: checkpoint step 30 in {workdir}/checkpoints holds another model: model.name '
        "'cifar_resnet8' (this config: 'cifar_resnet56'); evaluate it with its own config "
        '(leave out --config) or pass the config it was trained with'
    )
    assert snapshot(workdir) == before


def test_evaluate_refuses_an_unprepared_download_at_once(copy_of, tmp_path):
    """CIFAR-10 not prepared in --data_dir (and no network): refused in seconds, not after
    minutes of download attempts."""
    workdir = copy_of()
    empty = tmp_path / 'tfds'
    empty.mkdir()
    config = tmp_path / 'c10.py'
    config.write_text(
        'import importlib.util, sys\n'
        f'spec = importlib.util.spec_from_file_location("c", "{REPO}/configs/'
        'cifar10.py")\nm = importlib.util.module_from_spec(spec)\n'
        'spec.loader.exec_module(m)\n\ndef get_config():\n'
        '    c = m.get_config("resnet8")\n    c.model.bn_group_size = 4\n'
        '    c.batch_size = 16\n    return c\n'
    )
    started = time.time()
    code, out, err = run(
        [
            sys.executable,
            '-m',
            'resnet_jax',
            'evaluate',
            f'--workdir={workdir}',
            f'--config={config}',
            f'--data_dir={empty}',
        ],
        timeout=120,
    )
    assert code == 2 and time.time() - started < 60
    assert one_error_line(err, out) == (
        f'error: cifar10 is not prepared in {empty} (evaluation does not download it): train '
        f'on it once, or run: tfds build cifar10 --data_dir={empty} '
        '--file_format=array_record'
    )
    assert list(empty.iterdir()) == []


def test_evaluate_refuses_an_unwritable_workdir_before_evaluating(copy_of):
    workdir = copy_of()
    before = snapshot(workdir)
    with unwritable(workdir):
        code, out, err = run(
            [
                sys.executable,
                '-m',
                'resnet_jax',
                'evaluate',
                f'--workdir={workdir}',
                '--protocol=multiscale',
            ],
            timeout=120,
        )
    assert code == 2
    assert re.match(rf'error: workdir {workdir} is not writable: ', one_error_line(err, out))
    assert 'top-1 error' not in out
    assert snapshot(workdir) == before


# --- multi-process start-up -------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_num_processes_without_a_coordinator_is_refused(data_dir, tmp_path):
    code, out, err = run(
        command(tmp_path / 'run', data_dir, '--num_processes=2', '--process_id=0'), timeout=60
    )
    assert code == 2
    assert one_error_line(err, out) == (
        'error: cannot join the multi-process run: --num_processes=2 needs '
        '--coordinator_address (host:port of process 0) outside SLURM, Open MPI or a TPU pod'
    )
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('process_id', [0, 1])
def test_startup_wait_honours_its_timeout_and_names_the_coordinator(process_id, data_dir, tmp_path):
    """Process 1 with no process 0 listening, or process 0 whose partner never comes: each
    stops after --startup_timeout_seconds with one line (JAX's own wait is 5 minutes, then a
    C++ abort)."""
    address = f'127.0.0.1:{_free_port()}'
    started = time.time()
    code, out, err = run(
        command(
            tmp_path / 'run',
            data_dir,
            f'--coordinator_address={address}',
            '--num_processes=2',
            f'--process_id={process_id}',
            '--startup_timeout_seconds=4',
        ),
        timeout=90,
    )
    assert code == 2 and time.time() - started < 60, err[-3000:]
    line = one_error_line(err, out)
    if process_id:
        assert line == (
            f'[process 1] error: cannot join the multi-process run: no answer within 4 s from '
            f'{address} (process 0): is it running and reachable? '
            '(--startup_timeout_seconds)'
        )
    else:
        assert line == (
            f'[process 0] error: cannot join the multi-process run: the other 1 process(es) did '
            f'not join {address} within 4 s (--startup_timeout_seconds)'
        )
    assert not (tmp_path / 'run').exists()


def test_sigterm_checkpoints_and_the_first_save_writes_config_json(data_dir, tmp_path):
    """A stop request still checkpoints and exits 0 with the new checkpointer (its first
    save writes config.json)."""
    proc = launch(command(tmp_path, data_dir, '--config.num_train_steps=100000'))
    _wait_for_step(tmp_path, proc, 5)
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
    with pytest.raises(SystemExit) as stopped:
        cli_shared.fail('workdir gs://b/run is not writable: 403 Forbidden')
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (
        '[process 3] error: workdir gs://b/run is not writable: 403 Forbidden\n'
    )
