"""The README's cheap commands, run as written: its model code, the experiment listing
and the bad-input messages it quotes."""

import re
import subprocess
import sys

import pytest
from conftest import REPO, run_main

README = (REPO / 'README.md').read_text()


def fenced(language: str) -> list[str]:
    return re.findall(rf'```{language}\n(.*?)```', README, flags=re.S)


def section(title: str) -> str:
    return README.split(f'\n## {title}\n', 1)[1].split('\n## ', 1)[0]


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter in ``cwd``; it must exit 0."""
    proc = subprocess.run(
        [sys.executable, '-c', code], cwd=cwd, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_the_models_code_runs_as_written():
    """The Models section's first two Python blocks: create, init, apply, features, counts,
    and opting in to the execution plan."""
    create, plan = fenced('python')[:2]
    code = (
        create
        + plan
        + (
            'x = jnp.ones((2, 64, 64, 3))\n'
            'v = model.init(jax.random.key(1), x, train=False)\n'
            'import numpy as np\n'
            'np.testing.assert_allclose(step(v, x), model.apply(v, x, train=False),\n'
            '                           rtol=1e-4, atol=1e-4)\n'
        )
    )
    proc = run_python(code, REPO)
    # print(logits.shape, features.shape, parameters, multiply-adds)
    assert proc.stdout.startswith('(2, 1000) (2, 2048) 25557032 '), proc.stdout


@pytest.mark.parametrize(
    'command',
    [
        'resnet-jax summary --model=resnet50',
        'python experiments/reproduce.py --list',
        'python experiments/reproduce.py table3 --dry-run',
        'python experiments/reproduce.py table3 --print-commands',
    ],
)
def test_listed_commands_run(command):
    assert command in README
    words = command.split()
    args = ['-m', 'resnet_jax', *words[1:]] if words[0] == 'resnet-jax' else words[1:]
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()


def bad_input_rows() -> list[tuple[str, str]]:
    rows = re.findall(
        r'^\| `(--config[^`]*)`([^|]*)\| `(error: [^`]*)` \|$',
        section('Multi-host runs, faults, bad input'),
        flags=re.M,
    )
    return [(args, where.strip(), message) for args, where, message in rows]


@pytest.mark.parametrize('args, where, message', bad_input_rows())
def test_bad_input_rows_print_what_the_readme_says(tmp_path, args, where, message):
    devices = int(re.search(r'on (\d+) devices', where).group(1)) if 'devices' in where else 1
    extra = []
    if 'BN per 32' in where:  # the README's row: batch 128 with BatchNorm per 32
        extra = ['--config.batch_size=128', '--config.model.bn_group_size=32']
    proc = run_main(f'--workdir={tmp_path / "work"}', args, *extra, devices=devices)
    assert proc.returncode == 2
    pattern = '.*'.join(re.escape(part) for part in message.split('...'))  # '...': elided
    assert re.fullmatch(pattern, proc.stderr.strip()), proc.stderr[-2000:]


@pytest.mark.slow  # a minute of ResNet-50 on the CPU: run once, on the main CI stack
def test_the_research_code_section_runs_as_written(tmp_path):
    """Every Python block of "In your research code", in turn, in one process (each builds
    on the one before), from a folder outside the checkout."""
    blocks = re.findall(r'```python\n(.*?)```', section('In your research code'), flags=re.S)
    assert len(blocks) == 6
    code = '\n'.join(blocks) + (
        "\nprint('maps', {k: v.shape for k, v in maps.items()})\n"
        "g = grey.init(jax.random.key(0), jnp.ones((1, 32, 32, 1)))['params']\n"
        "print('grey', g['conv1']['kernel'].shape, g['fc']['kernel'].dtype)\n"
        '\nimport numpy as np\n'
        'x = np.random.default_rng(0).normal(size=(1, 72, 96, 3)).astype(np.float32)\n'
        'np.testing.assert_allclose(served.call(variables, x), model.apply(variables, x),\n'
        '                           rtol=1e-4, atol=1e-4)\n'
        "print('features', {k: v.shape for k, v in features.items()})\n"
    )
    proc = run_python(code, tmp_path)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("{'conv2': Feature(channels=256, stride=4), ")
    assert lines[1] == (
        "{'conv3': Feature(channels=128, stride=8), 'conv5': Feature(channels=512, stride=8)}"
    ), lines[1]
    assert lines[2] == (
        'kept 265 variables; freshly initialised: params/fc/bias, params/fc/kernel'
    ), lines[2]
    assert "maps {'conv3': (2, 8, 8, 128), 'conv5': (2, 8, 8, 512)}" in lines
    assert 'grey (7, 7, 1, 64) bfloat16' in lines
    assert lines[-1] == (
        "features {'conv2': (2, 16, 16, 256), 'conv3': (2, 8, 8, 512), "
        "'conv4': (2, 4, 4, 1024), 'conv5': (2, 2, 2, 2048)}"
    )
    assert (tmp_path / 'r50.safetensors').stat().st_size > 90e6  # 23.5M float32 parameters
