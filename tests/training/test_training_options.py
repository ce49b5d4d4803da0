"""Training options beyond the paper's recipe: exact gradient accumulation, the weights'
moving average (EMA), LARS and the large-batch recipes, the progress line."""

import importlib.util
import json
import math
import re
import shutil
import sys

import forked
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, load_config, run_main

from resnet_jax import models, parallel
from resnet_jax.config import ConfigError, base_config, model_from_config
from resnet_jax.data import pipeline
from resnet_jax.training import optim, progress, runs, steps


def results(workdir):
    return json.loads((workdir / 'results.json').read_text())


# --- gradient accumulation -------------------------------------------------------------------


def test_micro_batches_are_whole_groups_and_keep_each_devices_examples():
    batch = {'x': jnp.arange(64)}
    # 4 devices of 16 examples, groups of 4: micro-batch i takes the i-th quarter of each
    # device's share, so no example changes device.
    parts = steps.split_micro_batches(batch, 4, num_shards=4, group_size=4)['x']
    assert parts.shape == (4, 16)
    np.testing.assert_array_equal(
        parts[1], [4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39, 52, 53, 54, 55]
    )
    # Groups of 8 do not fit in a quarter of a device's share: blocks of two devices.
    parts = steps.split_micro_batches(batch, 4, num_shards=4, group_size=8)['x']
    np.testing.assert_array_equal(
        parts[1], [8, 9, 10, 11, 12, 13, 14, 15, 40, 41, 42, 43, 44, 45, 46, 47]
    )
    # Groups of 16: consecutive slices.
    parts = steps.split_micro_batches(batch, 4, num_shards=4, group_size=16)['x']
    np.testing.assert_array_equal(parts[1], np.arange(16, 32))
    for group, parts in (
        (4, steps.split_micro_batches(batch, 2, 4, 4)['x']),
        (16, steps.split_micro_batches(batch, 2, 4, 16)['x']),
    ):
        for part in np.asarray(parts):  # every group of the micro-batch is a global group
            for g in part.reshape(-1, group):
                assert g[0] % group == 0 and (np.diff(g) == 1).all()
    with pytest.raises(ValueError, match='whole BatchNorm groups of 32'):
        steps.split_micro_batches(batch, 4, group_size=32)


def test_each_micro_batch_is_split_over_the_mesh():
    mesh = parallel.create_mesh(jax.devices()[:4])
    split = lambda b: steps.split_micro_batches(
        b,
        4,
        num_shards=4,
        group_size=16,
        sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'data')),
    )
    parts = jax.jit(split)(parallel.shard_batch(mesh, {'x': np.arange(64, dtype=np.float32)}))
    assert {len(s.data) for s in parts['x'].addressable_shards} == {4}  # (4, 16) / 4 devices
    np.testing.assert_array_equal(parts['x'][2], np.arange(32, 48))


@pytest.mark.slow
def test_accumulated_step_equals_the_full_batch_step(data_dir):
    """The paper's CIFAR batch of 128 with BatchNorm per 32 images: as one batch on four
    devices (one group each, like the paper's GPUs) and as four micro-batches of 32 in
    sequence on one device. Same parameters, statistics, momentum and metrics within 1e-5
    relative.

    Both sum four partial gradients of 32 images; the full batch summed on one device
    rounds differently (its float32 sums over 128 images differ from the four-device sums
    by up to 2e-3 relative in gradients that nearly cancel, e.g. BN biases), which is the
    rounding of the data-parallel step itself (test_train's four-vs-one-device test)."""
    config = load_config('default')
    config.dataset.data_dir = data_dir
    config.model.name, config.model.bn_group_size = 'cifar_resnet8', 32  # 8 layers: enough
    batch = pipeline.Pipeline(config.dataset, seed=0).train_batch(0, 128)
    model = model_from_config(config, 10)
    lr_fn = optim.create_learning_rate_fn(config)
    tx = optim.create_optimizer(config, lr_fn)
    out = {}
    for accum, devices in ((1, jax.devices()[:4]), (4, jax.devices()[:1])):
        config.grad_accum_steps = accum
        mesh = parallel.create_mesh(devices)
        state = steps.init_train_state(model, tx, jax.random.key(0), (32, 32, 3), mesh)
        train, _, layout = steps.compile_steps(model, tx, lr_fn, config, mesh)  # the loop's
        state, metrics = train(layout.from_model(state), parallel.shard_batch(mesh, batch))
        out[accum] = jax.tree_util.tree_map(np.asarray, (layout.to_model(state), metrics.compute()))
    (full, full_metrics), (accumulated, accumulated_metrics) = out[1], out[4]
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    momentum = lambda s: s.opt_state[1][0].trace
    assert float(np.abs(momentum(full)['fc']['kernel']).max()) > 1e-3  # a real step
    for part in (lambda s: s.params, lambda s: s.batch_stats, momentum):
        jax.tree_util.tree_map(close, part(accumulated), part(full))
    for key in ('loss', 'top1_error', 'top5_error', 'param_norm'):
        np.testing.assert_allclose(accumulated_metrics[key], full_metrics[key], rtol=1e-6)


@pytest.mark.slow
def test_accumulation_through_the_launcher_ends_with_the_same_results(
    data_dir, tmp_path, every_core
):
    """The default config on the digits at batch 64 with BatchNorm per 32: on two devices
    (one group each, as the paper's CIFAR runs on 2 GPUs) and as two micro-batches on one.

    Two steps: further on, this early phase of training amplifies any rounding difference
    (the full batch on one device and on two, both exact, differ by 1e-2 in the loss of
    step 4), so longer runs would compare float32 rounding, not accumulation. Also checks
    the console's progress line.

    On every core (``every_core``): the one-device run's convolutions sum in another order on
    one thread, and after two steps the net's predictions are near ties. On 2 cores its
    eval loss is 1.2e-5 from the two-device run's; pinned to one core 1.03e-4, with one of
    the 360 test predictions flipped (the two-device run gives the same values either way)."""
    common = [
        f'--config.dataset.data_dir={data_dir}',
        '--config.batch_size=64',
        '--config.num_train_steps=2',
        '--config.log_every_steps=1',
        '--config.eval_every_steps=2',
        '--config.checkpoint_every_steps=2',
        '--config.eval_batch_size=360',
    ]
    runs = {}
    for accum, devices in ((1, 2), (2, 1)):
        workdir = tmp_path / f'accum{accum}'
        proc = run_main(
            f'--workdir={workdir}', *common, f'--config.grad_accum_steps={accum}', devices=devices
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[accum] = results(workdir)
        line = re.search(
            r'^\[2/2\] 100.0% \| ([\d,]+) img/s \(([\d,]+)/device\) \| '
            r'elapsed \S+ \| ETA 0s \| loss ([\d.]+)$',
            proc.stdout,
            re.M,
        )
        assert line, proc.stdout[-2000:]
        per_device = float(line.group(1).replace(',', '')) / devices
        assert float(line.group(2).replace(',', '')) == pytest.approx(per_device, abs=1)
        assert float(line.group(3)) == pytest.approx(runs[accum]['train_loss'], abs=1e-4)
    for key in (
        'train_loss',
        'train_top1_error',
        'eval_loss',
        'eval_top1_error',
        'eval_top5_error',
    ):
        assert runs[2][key] == pytest.approx(runs[1][key], abs=1e-4), key
    assert runs[1]['train_loss'] != pytest.approx(2.303, abs=0.01)  # not an untrained net


# --- EMA of the weights ----------------------------------------------------------------------


def test_ema_moves_towards_the_new_weights_at_each_step():
    model = models.create_model('cifar_resnet8', width=2, bn_group_size=4)
    tx = optim.create_optimizer(base_config(), optax.constant_schedule(0.1))
    state = steps.create_train_state(model, tx, jax.random.key(0), (16, 16, 3), ema=True)
    assert isinstance(state, steps.EmaTrainState)
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.ema['params'], state.params)
    rng = np.random.default_rng(0)
    batch = {
        'image': rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
        'label': rng.integers(0, 10, 8).astype(np.int32),
    }
    step = jax.jit(
        lambda s, b: steps.train_step(
            model, tx, optax.constant_schedule(0.1), 0.0, s, b, ema_decay=0.9
        )
    )
    new, _ = step(state, batch)
    for name in ('params', 'batch_stats'):
        expected = jax.tree_util.tree_map(
            lambda old, now: 0.9 * old + 0.1 * now, getattr(state, name), getattr(new, name)
        )
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new.ema[name], expected
        )
    assert not np.allclose(new.ema['params']['fc']['kernel'], new.params['fc']['kernel'])
    weights = steps.with_ema_weights(new)
    assert weights.params is new.ema['params']
    assert jax.tree_util.tree_structure(weights) == jax.tree_util.tree_structure(new)


def test_ema_weights_of_a_run_without_them_are_refused(tmp_path):
    shutil.copytree(
        REPO / 'tests' / 'fixtures' / 'legacy_checkpoint' / 'checkpoints', tmp_path / 'checkpoints'
    )
    with pytest.raises(ConfigError, match='has no EMA of the weights'):
        runs.load_variables(tmp_path, weights='ema')
    assert set(runs.load_variables(tmp_path)[0]) == {'params', 'batch_stats'}
    proc = forked.run(
        [
            sys.executable,
            '-m',
            'resnet_jax',
            'evaluate',
            f'--workdir={tmp_path}',
            '--config=configs/default.py',
            '--weights=ema',
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path} has no EMA of the weights (its run had ema_decay=0); use weights='raw'"
    ]


# --- LARS ------------------------------------------------------------------------------------


def test_lars_trust_ratio_leaves_batchnorm_parameters_and_biases_alone():
    config = base_config()
    config.optimizer, config.weight_decay = 'lars', 1e-2
    lr, eta = 0.5, config.lars_trust_coefficient
    model = models.create_model('cifar_resnet8', width=2)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
    grads = jax.tree_util.tree_map(
        lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params
    )
    for schedule in ('step', 'plateau'):  # also chained with reduce-on-plateau
        config.schedule = schedule
        tx = optim.create_optimizer(config, optax.constant_schedule(lr))
        updates, _ = tx.update(grads, tx.init(params), params, value=jnp.asarray(0.5))
        for (path, p), g, u in zip(
            *(
                jax.tree_util.tree_flatten_with_path(params)[0],
                jax.tree_util.tree_leaves(grads),
                jax.tree_util.tree_leaves(updates),
            )
        ):
            if path[-1].key == 'kernel':  # trust ratio and weight decay
                d = g + config.weight_decay * p
                expected = -lr * eta * jnp.linalg.norm(p) / jnp.linalg.norm(d) * d
            else:  # BN scale and bias, fc bias: a plain step
                expected = -lr * g
            np.testing.assert_allclose(
                u, expected, rtol=1e-5, atol=1e-9, err_msg=jax.tree_util.keystr(path)
            )
    assert (
        sum(path[-1].key != 'kernel' for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])
        > 10
    )  # BN params were checked


# --- schedules and the large-batch recipes ---------------------------------------------------


def test_goyal_8k_recipe_warms_up_from_0_1_to_3_2_and_divides_at_30_60_80_epochs():
    config = load_config('imagenet', 'resnet50_goyal8k')
    assert config.batch_size == 8192 and config.model.bn_group_size == 32
    assert config.model.zero_init_residual and not config.model.stride_in_1x1
    epoch = 1_281_167 / 8192  # 156.4 iterations
    lr = optim.create_learning_rate_fn(config)
    warmup = config.warmup_steps
    assert warmup == math.ceil(5 * 1_281_167 / 8192)
    assert float(lr(0)) == pytest.approx(0.1, rel=1e-5)
    assert float(lr(warmup // 2)) == pytest.approx(0.1 + 3.1 * (warmup // 2) / warmup, rel=1e-5)
    for e, expected in ((5.01, 3.2), (29.9, 3.2), (30.1, 0.32), (60.1, 0.032), (80.1, 0.0032)):
        assert float(lr(int(e * epoch))) == pytest.approx(expected, rel=1e-5), e
    assert config.num_train_steps * 8192 / 1_281_167 == pytest.approx(90, abs=0.01)
    assert config.optimizer == 'sgd' and config.weight_decay_on == 'kernels'


def test_lars_32k_recipe_warms_up_then_decays_polynomially_to_zero():
    config = load_config('imagenet', 'resnet50_lars32k')
    assert config.optimizer == 'lars' and config.batch_size == 32768
    assert config.lars_trust_coefficient == 1e-3 and config.schedule == 'poly'
    lr = optim.create_learning_rate_fn(config)
    warmup, total = config.warmup_steps, config.num_train_steps
    assert total * 32768 / 1_281_167 == pytest.approx(90, abs=0.05)
    assert float(lr(0)) == 0 and float(lr(warmup)) == pytest.approx(34.0, rel=1e-6)
    middle = warmup + (total - warmup) // 2
    assert float(lr(middle)) == pytest.approx(
        34.0 * (1 - (middle - warmup) / (total - warmup)) ** 2, rel=1e-5
    )
    assert float(lr(total)) == 0


def test_unknown_schedule_and_warmup_are_config_errors():
    config = base_config()
    config.warmup_steps, config.warmup_type = 10, 'bogus'
    with pytest.raises(ConfigError, match="unknown warmup_type 'bogus'"):
        optim.create_learning_rate_fn(config)
    config.schedule = 'bogus'
    with pytest.raises(ConfigError, match="unknown schedule 'bogus'; allowed: step, plateau"):
        optim.create_learning_rate_fn(config)


def test_reproduce_lists_the_large_batch_recipes_with_their_targets(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location(
        'reproduce', REPO / 'experiments' / 'reproduce.py'
    )
    reproduce = importlib.util.module_from_spec(spec)
    sys.modules['reproduce'] = reproduce
    spec.loader.exec_module(reproduce)
    assert reproduce.main(['--list']) == 0
    listed = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith('large_batch')
    ]
    assert len(listed) == 1 and 'Goyal et al. 2017' in listed[0] and '23.74%' in listed[0]
    assert 'LARS' in listed[0] and '24.6%' in listed[0]
    assert reproduce.main(['large_batch', '--dry-run', f'--root={tmp_path}']) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0::2] == [
        'resnet50_goyal8k: Goyal et al. 2017, Table 1 (batch 8k; 23.60 at 256): top-1 23.74% '
        '(center)',
        'resnet50_lars32k: You et al. 2018, 75.4% top-1 accuracy at batch 32k, 90 epochs: '
        'top-1 24.6% (center)',
    ]
    assert out[1].strip() == (
        f'python -m resnet_jax.main --config=configs/imagenet.py:resnet50_goyal8k '
        f'--workdir={tmp_path}/large_batch/resnet50_goyal8k && python -m resnet_jax evaluate '
        f'--workdir={tmp_path}/large_batch/resnet50_goyal8k --protocol=center'
    )
    assert reproduce.main(['large_batch', '--print-commands']) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        'python -m resnet_jax.main --config=configs/imagenet.py:resnet50_lars32k '
        '--workdir=workdirs/reproduce/large_batch/resnet50_lars32k && python -m '
        'resnet_jax evaluate --workdir=workdirs/reproduce/large_batch/resnet50_lars32k '
        '--protocol=center'
    )


# --- the progress line -----------------------------------------------------------------------


def test_durations_read_like_a_clock():
    assert [progress.format_duration(s) for s in (0, 42.4, 723, 6120, 3 * 86400 + 7200)] == [
        '0s',
        '42s',
        '12m03s',
        '1h42m',
        '3d02h',
    ]


def test_progress_line_speed_eta_and_tensorboard_scalars():
    now = [1000.0]
    lines, written = [], []
    report = progress.Progress(
        64_000,
        128,
        4,
        start_time=990.0,
        write_scalars=lambda step, s: written.append((step, s)),
        print_fn=lines.append,
        clock=lambda: now[0],
    )
    report.start(1)  # after the first (compiling) step
    now[0] += 10
    assert not report.due()
    now[0] += 20
    assert report.due()
    line = report.report(1001, loss=0.41321)  # 1,000 steps in 30 s
    assert (
        line
        == lines[-1]
        == (
            '[1,001/64,000] 1.6% | 4,267 img/s (1,067/device) | '
            'elapsed 40s | ETA 31m30s | loss 0.4132'
        )
    )
    step, scalars = written[-1]
    assert step == 1001 and set(scalars) == set(progress.SCALARS)
    assert scalars['images_per_sec'] == pytest.approx(128 * 1000 / 30)
    assert scalars['eta_seconds'] == pytest.approx(62_999 * 30 / 1000)
    assert not report.due()
    now[0] += 60  # slower now: 500 steps in 60 s; the ETA uses the mean speed so far
    report.report(1501)
    assert written[-1][1]['images_per_sec'] == pytest.approx(128 * 500 / 60)
    assert written[-1][1]['eta_seconds'] == pytest.approx(62_499 * 90 / 1500)
    assert lines[-1].endswith('ETA 1h02m')  # no loss given: none shown


def test_progress_before_any_speed_is_known():
    report = progress.Progress(10, 16, 1, 0.0, lambda *a: None, None, clock=lambda: 5.0)
    assert report.report(1) == '[1/10] 10.0% | elapsed 5s | ETA ?'


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'args, message',
    [
        (
            ['--config.grad_accum_steps=3'],
            'grad_accum_steps=3 does not split batch_size=128 into equal micro-batches',
        ),
        (
            ['--config.grad_accum_steps=8'],
            r'micro-batches of 16 \(batch_size=128 / '
            r'grad_accum_steps=8\) are not a multiple of model.bn_group_size=32',
        ),
        (
            [
                '--config.batch_size=24',
                '--config.grad_accum_steps=4',
                '--config.model.bn_group_size=2',
            ],
            r'micro-batches of 6 \(batch_size=24 / grad_accum_steps=4\) do not divide across 4',
        ),
        (
            ['--config.grad_accum_steps=2', '--config.model.bn_group_size=0'],
            'grad_accum_steps=2 needs model.bn_group_size > 0',
        ),
        (['--config.grad_accum_steps=0'], 'grad_accum_steps must be positive; got 0'),
        (['--config.ema_decay=1.0'], r'ema_decay must be in \[0, 1\); got 1.0'),
        (['--config.ema_decay=-0.5'], r'ema_decay must be in \[0, 1\); got -0.5'),
        (['--config.optimizer=adam'], "unknown optimizer 'adam'; allowed: sgd, lars"),
        (
            ['--config.optimizer=lars', '--config.lars_trust_coefficient=0'],
            'lars_trust_coefficient must be positive; got 0',
        ),
    ],
)
def test_bad_options_get_one_line_and_exit_code_2(tmp_path, args, message):
    workdir = tmp_path / 'work'
    proc = run_main(f'--workdir={workdir}', *args, devices=4)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-2000:]
    assert re.search(message, lines[0]), lines[0]
    assert not workdir.exists()
