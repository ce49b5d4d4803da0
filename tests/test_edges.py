"""Nothing lost at the edges, refused before anything is written: what a tired user types
(config values and files, another run's identity, another model's config, an unprepared
dataset, a multi-process start-up without its peers), and the checkpoints a file system
damages, met where a user meets them (the launcher and ``evaluate``).

Every refusal is one line and exit code 2: the workdir's files (checkpoints,
``config.json``) are byte-identical before and after. Every fallback (a corrupt checkpoint)
resumes from the step before and ends with the uninterrupted run's results, bit for bit.
"""

import hashlib
import json
import re
import shutil
import socket
import sys
import time

import pytest
from conftest import REPO
from launched import (
    command,
    one_error_line,
    results_without_time,
    run,
    snapshot,
    steps_in,
    unwritable,
)

pytestmark = pytest.mark.slow


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
        (  # DALI decodes encoded images (and names its extra where it is missing)
            ['--config.dataset.decoder=dali'],
            "dataset.decoder='dali' decodes encoded images; digits is held in memory",
        ),
        (['--config.bogus=1'], "unknown config field 'bogus'"),
        (['--resume_step=-3'], r'--resume_step must be a checkpoint step \(>= 0\); got -3'),
        (['--stop_grace_seconds=-1'], r'--stop_grace_seconds must be >= 0 \(0: never\); got -1'),
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
