"""The benchmarks as a user runs them: `resnet-jax benchmark` and the PyTorch table.

The benchmark must also run where only JAX's stack is installed (the CUDA/TPU images users
benchmark on rarely carry TensorFlow), so it runs here with TensorFlow and tfds made
unimportable.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, load_config

from resnet_jax.data import dali

# Runs `resnet-jax benchmark ARGS` as if TensorFlow and tfds were not installed (a None
# entry in sys.modules: `import` fails, `importlib.util.find_spec` says absent).
_WITHOUT_TF = r"""
import sys
sys.modules.update(tensorflow=None, tensorflow_datasets=None)
from resnet_jax import cli
cli.main(['resnet-jax', 'benchmark', *sys.argv[1:]])
"""


def _run(code_or_module, *args, timeout=300):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
    cmd = (
        [sys.executable, '-c', code_or_module]
        if '\n' in code_or_module
        else [sys.executable, code_or_module]
    )
    return subprocess.run(
        [*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_benchmark_json_without_tensorflow(tmp_path):
    cache = tmp_path / 'cache'
    args = (
        '--model=cifar_resnet20',
        '--batch_size=8',
        '--steps=2',
        '--json',
        f'--compilation_cache_dir={cache}',
    )
    first = _run(_WITHOUT_TF, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    r = json.loads(first.stdout.strip().splitlines()[-1])
    for key in (
        'train_images_per_sec',
        'eval_images_per_sec',
        'compile_seconds',
        'peak_rss_mb',
        'train_flops_per_sec',
        'matmul_flops_per_sec',
    ):
        assert r[key] > 0, key
    assert r['peak_device_mb'] is None  # the CPU keeps no count; a GPU's is its peak
    assert (r['model'], r['batch_size'], r['image_size'], r['backend']) == (
        'cifar_resnet20',
        8,
        32,
        'cpu',
    )
    assert r['execution'] == 'cpu' and r['scanned_blocks'] == 6  # the CPU plan, by default
    assert r['process_options'] == []  # XLA's defaults for a net this shallow
    # 6 x forward MACs per image (41M MACs for ResNet-20 at 32x32), over the step time.
    assert r['train_flops_per_sec'] * r['train_step_seconds'] / 8 == pytest.approx(
        6 * 40.55e6, rel=0.02
    )
    assert any(cache.iterdir()), 'the compilation cache is empty'
    # The second launch loads the train step from the cache instead of compiling it.
    second = _run(_WITHOUT_TF, *args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (
        json.loads(second.stdout.strip().splitlines()[-1])['compile_seconds'] < r['compile_seconds']
    )


def test_benchmark_unknown_model_is_one_line_error():
    proc = _run(_WITHOUT_TF, '--model=resnet19')
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith('error:') and 'Traceback' not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.interop
def test_benchmark_vs_pytorch_table():
    pytest.importorskip('torch')
    proc = _run(
        str(REPO / 'experiments' / 'benchmark_vs_pytorch.py'),
        '--nets',
        'cifar_resnet8:4',
        '--steps',
        '1',
        '--rounds',
        '2',
        '--dtype',
        'bfloat16',
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert sum(line.startswith('|---') for line in lines) == 1  # one table
    for line, net in zip(lines[-1:], ('cifar_resnet8, 4',)):
        row = line.strip('|').split('|')
        assert row[0].strip() == net
        theirs, ours, ratio = (float(c) for c in row[1:4])
        # The table rounds images/s to 0.1 and the ratio to 0.01 (up to 0.005 off).
        assert (
            theirs > 0 and ours > 0 and ratio == pytest.approx(ours / theirs, rel=0.01, abs=0.006)
        )
    assert 'bfloat16' in proc.stdout


@pytest.mark.slow
def test_accelerator_benchmark_script_runs_in_its_cpu_mode(tmp_path):
    """experiments/accelerator_benchmark.sh, as run on a GPU host, at CPU size: the largest
    batch that fits, a relaunch on the cache, real JPEGs through the input pipeline beside
    synthetic data (accelerator_readiness.py), two depths ready to train, the plain model's
    first gradient, and the one-line table."""
    out = tmp_path / 'out'
    env = dict(os.environ, PYTHON=sys.executable, BATCHES='8 4')
    env.pop('JAX_COMPILATION_CACHE_DIR')  # (the script keeps its own)
    script = REPO / 'experiments' / 'accelerator_benchmark.sh'
    proc = subprocess.run(
        ['bash', str(script), '--toy', str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "knobs: BATCHES='8 4'" in proc.stdout
    table = proc.stdout.strip().splitlines()[-1]
    assert table.startswith('| resnet18 float32 batch 8 on cpu | synthetic ') and table.endswith(
        ' |'
    ), table
    assert 'peak device memory n/a (cpu)' in table and 'cifar_resnet8 plain model' in table
    last = lambda name: json.loads((out / name).read_text().strip().splitlines()[-1])  # noqa: E731
    first, again = last('synthetic.txt'), last('synthetic_relaunch.txt')
    assert first['batch_size'] == again['batch_size'] == 8 and first['peak_device_mb'] is None
    r = last('readiness.txt')
    real = r['real_jpeg']
    assert real['synthetic_images_per_sec'] > 0
    decoders = ('cpu', 'dali') if dali.installed() else ('cpu',)
    for decoder in decoders:
        assert real[decoder]['images_per_sec'] > 0
        assert real[decoder]['over_synthetic'] == pytest.approx(
            real[decoder]['images_per_sec'] / real['synthetic_images_per_sec']
        )
    assert ('dali decoding not installed' in table) == (decoders == ('cpu',))
    depth = r['depth']
    for name in ('cifar_resnet20', 'cifar_resnet8'):
        assert depth[name]['ready_seconds'] >= depth[name]['compile_seconds'] > 0
    plan = depth['cifar_resnet20']['execution']
    assert depth['cifar_resnet20']['scanned_blocks'] == (6 if plan == 'cpu' else 0)
    plain = last('plain_model.txt')['cifar_resnet8']
    assert plain['value_and_grad'] > 0 and plain['init'] > 0


@pytest.mark.slow  # (two compiles of the step, ~11 s)
def test_a_batch_the_device_cannot_hold_is_refused_by_the_benchmark(monkeypatch):
    """As the train loop refuses it: one line naming the largest batch the estimate allows."""
    from resnet_jax.config import ConfigError
    from resnet_jax.tools import benchmark
    from resnet_jax.training import memory

    monkeypatch.setattr(memory, 'available_bytes', lambda device: 16 << 20)
    config = load_config('default')
    # (the xla plan: the CPU plan's weight-gradient chunks compile 4x slower at this batch)
    config.model.name, config.model.bn_group_size, config.execution = 'cifar_resnet8', 4, 'xla'
    with pytest.raises(ConfigError, match=r'^batch_size=256 needs about .* at most about \d+'):
        benchmark.run(config, 256, 32, steps=1, warmup=0)
