"""The ``resnet-jax`` command as a user meets it: every command with ``--help`` and one
spelling, and the installed wheel (configs inside) running from a folder outside the
checkout."""

import os
import pathlib
import re
import subprocess
import sys
import zipfile

import forked
import pytest
from conftest import REPO

from resnet_jax import cli


def resnet_jax(*args, cwd=REPO, env=None, timeout=300):
    return forked.run(
        [sys.executable, '-m', 'resnet_jax', *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_every_command_has_help_with_one_spelling():
    flags_of = {}
    for name in cli.COMMANDS:  # (each a launch of its own: a command defines its flags)
        proc = resnet_jax(name, '--help')
        assert proc.returncode == 0, proc.stderr[-2000:]
        stdout = proc.stdout
        assert stdout.startswith(f'usage: resnet-jax {name} ')
        flags_of[name] = re.findall(r'^  --([\w.<>=]+)$', stdout, re.M)
        assert flags_of[name], stdout
    every = {flag for flags in flags_of.values() for flag in flags}
    assert not [f for f in every if '-' in f]  # --batch_size, never --batch-size
    shared = {
        'workdir': {'train', 'evaluate', 'convert'},
        'config': {'train', 'evaluate', 'summary', 'benchmark'},
        'batch_size': {'evaluate', 'benchmark'},
        'image_size': {'summary', 'benchmark', 'prepare'},
        'model': {'convert', 'summary', 'benchmark'},
        'data_dir': {'evaluate', 'prepare'},
        'startup_timeout_seconds': {'train', 'evaluate'},
        'compilation_cache_dir': {'train', 'evaluate', 'benchmark'},
    }
    for flag, commands in shared.items():
        assert {c for c, flags in flags_of.items() if flag in flags} == commands, flag
    listing = resnet_jax('--help')
    assert listing.returncode == 0
    assert all(f'  {name} ' in listing.stdout for name in cli.COMMANDS)
    main = subprocess.run(
        [sys.executable, '-m', 'resnet_jax.main', '--help'],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert main.returncode == 0 and main.stdout.startswith('usage: resnet-jax train ')


def test_a_forked_launch_is_the_launch_a_new_interpreter_makes(tmp_path, data_dir):
    """tests/forked.py, which most launches in the suite go through: the same streams and
    exit code as ``python -m``, a SIGKILL read as -9, the pid the launched process's own."""
    if os.environ.get('RESNET_JAX_TESTS_FORK') == '0':
        pytest.skip('forks turned off (RESNET_JAX_TESTS_FORK=0)')
    bad = [sys.executable, '-m', 'resnet_jax.main', f'--workdir={tmp_path}', '--config.seed=x']
    new, fork = (
        run(bad, capture_output=True, text=True, timeout=120)
        for run in (subprocess.run, forked.run)
    )
    assert new.returncode == fork.returncode == 2 and fork.stdout == new.stdout == ''
    assert fork.stderr == new.stderr == "error: seed must be an integer; got 'x'\n"
    train = bad[:3] + [f'--workdir={tmp_path / "run"}', f'--config.dataset.data_dir={data_dir}']
    proc = forked.Popen(train, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert forked.pid(proc) != proc.pid  # (forked: its relay is the Popen's process)
    assert os.path.exists(f'/proc/{forked.pid(proc)}')
    proc.kill()  # (long before its 250 steps end)
    assert proc.wait(30) == -9 and not os.path.exists(f'/proc/{forked.pid(proc)}/cmdline')


@pytest.mark.parametrize(
    'args, message',
    [
        (
            ['fit'],
            "error: unknown command 'fit'; commands: train, evaluate, convert, summary, "
            'benchmark, prepare, plot',
        ),
        (['summary', '--model=resnet51'], "error: unknown model 'resnet51'"),
        (['summary', '--batch-size=3'], 'error: unknown flag --batch-size (see --help)'),
        (['summary', 'resnet50'], "error: unexpected argument 'resnet50' (flags are --name=value"),
        (['plot'], 'error: name the runs to plot: resnet-jax plot WORKDIR'),
        (['evaluate'], 'error: --workdir is required (see --help)'),
    ],
)
def test_bad_command_lines_are_one_line(args, message):
    proc = resnet_jax(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr[-2000:]


def test_the_dali_decoder_without_its_extra_is_one_line_and_writes_nothing(tmp_path):
    """(DALI hidden from the process as where it is not installed: a None in sys.modules.)"""
    hide = (
        "import sys; sys.modules['nvidia.dali'] = None; from resnet_jax import cli; "
        "cli.main(['resnet-jax', 'train', *sys.argv[1:]])"
    )
    proc = subprocess.run(
        [
            sys.executable,
            '-c',
            hide,
            f'--workdir={tmp_path / "run"}',
            '--config.dataset.name=folder:/data/photos',
            '--config.dataset.decoder=dali',
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == (
        "error: dataset.decoder='dali' needs NVIDIA DALI: pip install 'resnet_jax[gpu]' "
        "(or 'resnet_jax[dali]' beside a JAX of your own)"
    )
    assert list(tmp_path.iterdir()) == []


def _config_file(spec: str):
    """``--config=<spec>`` read as the CLI reads it: resolved, then loaded by config_flags."""
    from absl import flags
    from ml_collections import config_flags

    from resnet_jax import config as config_lib

    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', flag_values=flag_values)
    flag_values(['resnet-jax', '--config=' + config_lib.resolve_config_path(spec)])
    return flag_values.config


def test_a_shipped_config_is_named_by_its_file_name(tmp_path, monkeypatch):
    """``cifar10.py:resnet20`` and ``configs/cifar10.py:resnet20`` are the shipped config
    from any folder; a path of one's own is read as given."""
    from resnet_jax import config as config_lib

    monkeypatch.chdir(tmp_path)
    shipped = config_lib.shipped_configs_dir()
    for spec in ('cifar10.py:resnet20', 'configs/cifar10.py:resnet20'):
        path, _, arg = config_lib.resolve_config_path(spec).partition(':')
        assert pathlib.Path(path) == shipped / 'cifar10.py' and arg == 'resnet20'
        assert _config_file(spec).model.name == 'cifar_resnet20'
    (tmp_path / 'mine').mkdir()
    mine = tmp_path / 'mine' / 'cifar10.py'
    mine.write_text(
        'from resnet_jax.config import base_config\n\ndef get_config():\n'
        '    c = base_config()\n    c.batch_size = 64\n    return c\n'
    )
    assert config_lib.resolve_config_path(str(mine)) == str(mine)
    assert _config_file(str(mine)).batch_size == 64


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp('wheel')
    proc = subprocess.run(
        [
            sys.executable,
            '-m',
            'pip',
            'wheel',
            '--no-deps',
            '--no-build-isolation',
            '-q',
            '-w',
            str(out),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(out.glob('resnet_jax-*.whl'))


def test_the_wheel_carries_the_configs_and_the_command(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in ('default.py', 'cifar10.py', 'imagenet.py', 'finetune.py'):
        assert f'resnet_jax/configs/{config}' in names
    for module in (
        'cli.py',
        'models/resnet.py',
        'data/pipeline.py',
        'training/loop.py',
        'evaluation/protocols.py',
        'backends/plans.py',
        'tools/convert.py',
    ):
        assert f'resnet_jax/{module}' in names
    entry_points = next(n for n in names if n.endswith('entry_points.txt'))
    assert 'resnet-jax = resnet_jax.cli:run' in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_the_installed_wheel_trains_from_a_folder_outside_the_checkout(wheel, data_dir, tmp_path):
    """The wheel installed on its own (its dependencies are this environment's), run from
    an empty folder: the default job and a paper config named by its file name each reach
    their first checkpoint."""
    site = tmp_path / 'site'
    proc = subprocess.run(
        [
            sys.executable,
            '-m',
            'pip',
            'install',
            '-q',
            '--no-deps',
            '--target',
            str(site),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    env = dict(
        os.environ, PYTHONPATH=str(site), XLA_FLAGS='--xla_force_host_platform_device_count=1'
    )
    where = subprocess.run(
        [sys.executable, '-c', 'import resnet_jax; print(resnet_jax.__file__)'],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.stdout.strip() == str(site / 'resnet_jax' / '__init__.py'), where.stderr
    small = [
        '--config.num_train_steps=2',
        '--config.checkpoint_every_steps=1',
        '--config.batch_size=16',
        '--config.model.bn_group_size=4',
        '--config.model.name=cifar_resnet8',
        f'--config.dataset.data_dir={data_dir}',
    ]
    launches = {
        'default': ['-m', 'resnet_jax.main'],  # the quickstart's command
        'cifar10': [
            '-m',
            'resnet_jax',
            'train',
            '--config=cifar10.py:resnet20',
            '--config.dataset.name=digits',
        ],
    }
    for name, command in launches.items():
        workdir = elsewhere / name
        proc = subprocess.run(
            [sys.executable, *command, f'--workdir={workdir}', *small],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (workdir / 'checkpoints' / '1').is_dir()
        assert 'training cifar_resnet8 on digits for 2 steps' in proc.stdout
