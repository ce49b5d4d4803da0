"""The training system: schedules, optimiser, sharded steps, checkpoints, the launcher."""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, load_config, run_main

from resnet_jax import models, parallel
from resnet_jax.backends import plans
from resnet_jax.config import ConfigError, base_config, model_from_config
from resnet_jax.data import pipeline as input_pipeline
from resnet_jax.training import checkpoints as checkpointing
from resnet_jax.training import loop as train
from resnet_jax.training import optim, runs, steps


def tiny_config(data_dir, **overrides):
    config = load_config('default')
    config.model.name = 'cifar_resnet8'
    config.dataset.data_dir = data_dir
    config.batch_size = 16
    config.eval_batch_size = 200
    config.model.bn_group_size = 4
    config.num_train_steps = 6
    config.lr_boundaries = (4,)
    config.log_every_steps = 2
    config.eval_every_steps = 3
    config.checkpoint_every_steps = 3
    for key, value in overrides.items():
        config[key] = value
    return config


# --- schedules -------------------------------------------------------------------------------


def test_cifar_schedule_gives_paper_lr_at_boundaries():
    lr = optim.create_learning_rate_fn(load_config('cifar10', 'resnet20'))
    for step, expected in [
        (0, 0.1),
        (31_999, 0.1),
        (32_000, 0.01),
        (47_999, 0.01),
        (48_000, 0.001),
        (63_999, 0.001),
    ]:
        assert float(lr(step)) == pytest.approx(expected, rel=1e-6), step


def test_resnet110_warms_up_at_0_01_for_400_iterations():
    config = load_config('cifar10', 'resnet110')
    lr = optim.create_learning_rate_fn(config)
    for step, expected in [
        (0, 0.01),
        (399, 0.01),
        (400, 0.1),
        (31_999, 0.1),
        (32_000, 0.01),
        (48_000, 0.001),
    ]:
        assert float(lr(step)) == pytest.approx(expected, rel=1e-6), step
    assert load_config('cifar10', 'resnet56').warmup_steps == 0
    assert load_config('cifar10', 'resnet1202').warmup_steps == 400


def test_imagenet_step_alternative_divides_at_epochs_30_and_60():
    config = load_config('imagenet', 'resnet50')
    assert config.schedule == 'plateau' and config.num_train_steps == 600_000
    config.schedule = 'step'
    lr = optim.create_learning_rate_fn(config)
    epoch = 5005
    assert float(lr(30 * epoch - 1)) == pytest.approx(0.1)
    assert float(lr(30 * epoch)) == pytest.approx(0.01)
    assert float(lr(60 * epoch)) == pytest.approx(0.001)


def test_learning_rate_scales_with_batch():
    config = load_config('cifar10', 'resnet20')
    config.batch_size = 64
    assert float(optim.create_learning_rate_fn(config)(0)) == pytest.approx(0.05)
    config.scale_lr_with_batch = False
    assert float(optim.create_learning_rate_fn(config)(0)) == pytest.approx(0.1)


def test_plateau_schedule_divides_lr_after_patience_evaluations():
    config = base_config()
    config.schedule, config.eval_every_steps, config.plateau_patience = 'plateau', 2, 2
    tx = optim.create_optimizer(config, optim.create_learning_rate_fn(config))
    params = {'w': jnp.ones(3)}
    state = tx.init(params)
    scales = []
    for value in [0.5, 0.5, 0.4, 0.4] + [0.4] * 8:  # improves once, then stalls
        _, state = tx.update({'w': jnp.ones(3)}, state, params, value=jnp.asarray(value))
        scales.append(float(optim.plateau_scale(state)))
    # Windows of 2 updates: improve, improve, then 2 stalled windows -> lr / 10, 2 more -> / 10.
    assert scales == pytest.approx([1.0] * 7 + [0.1] * 4 + [0.01], rel=1e-6)


def test_weight_decay_applies_to_kernels_only_by_default():
    config = base_config()
    config.weight_decay, config.momentum = 0.5, 0.0
    tx = optim.create_optimizer(config, optax.constant_schedule(1.0))
    params = {'conv': {'kernel': jnp.ones(2)}, 'bn': {'scale': jnp.ones(2), 'bias': jnp.ones(2)}}
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates['conv']['kernel'], -0.5)
    np.testing.assert_allclose(updates['bn']['scale'], 0.0)
    config.weight_decay_on = 'all'
    tx = optim.create_optimizer(config, optax.constant_schedule(1.0))
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates['bn']['scale'], -0.5)


# --- the sharded step ------------------------------------------------------------------------


@pytest.mark.parametrize('bn_group_size', [4, 0])
def test_step_on_four_devices_equals_step_on_one(data_dir, bn_group_size):
    assert jax.device_count() == 4
    config = tiny_config(data_dir)
    config.model.bn_group_size = bn_group_size
    batch = input_pipeline.Pipeline(config.dataset, seed=0).train_batch(0, 16)
    model = model_from_config(config, 10)
    lr_fn = optim.create_learning_rate_fn(config)
    tx = optim.create_optimizer(config, lr_fn)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.create_mesh(devices)
        state = steps.init_train_state(model, tx, jax.random.key(0), (32, 32, 3), mesh)
        step, _, layout = steps.compile_steps(model, tx, lr_fn, config, mesh)  # the loop's
        state = layout.from_model(state)
        for _ in range(2):
            state, metrics = step(state, parallel.shard_batch(mesh, batch))
        state = layout.to_model(state)
        assert len(state.params['fc']['kernel'].sharding.device_set) == len(devices)
        results.append((state, metrics.compute()))
    (one, m1), (four, m4) = results
    chex_close = functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=2e-5)
    jax.tree_util.tree_map(chex_close, one.params, four.params)
    jax.tree_util.tree_map(chex_close, one.batch_stats, four.batch_stats)
    chex_close(m1['loss'], m4['loss'])


def test_checkpoints_of_the_earlier_layout_restore(tmp_path):
    """tests/fixtures/legacy_checkpoint was written by resnet_jax at commit 14da4f7 (the
    model's own tree) after one train step of a width-2 cifar_resnet20: today's code
    restores it into its state and computes the logits recorded then, with either plan."""
    import shutil

    from etils import epath

    legacy = REPO / 'tests' / 'fixtures' / 'legacy_checkpoint'
    shutil.copytree(legacy / 'checkpoints', tmp_path / 'checkpoints')
    config = base_config()
    config.batch_size, config.model.bn_group_size = 8, 4
    model = models.create_model('cifar_resnet20', width=2, bn_group_size=4)
    tx = optim.create_optimizer(config, optim.create_learning_rate_fn(config))
    mesh = parallel.create_mesh(jax.devices()[:1])
    template = steps.init_train_state(model, tx, jax.random.key(1), (16, 16, 3), mesh)
    ckpt = checkpointing.Checkpointer(epath.Path(tmp_path / 'checkpoints'), config)
    restored = ckpt.restore_latest(template, jax.device_put(steps.TrainMetrics.empty()))
    ckpt.close()
    assert restored is not None
    state = restored[0]
    assert int(state.step) == 1
    expected = np.load(legacy / 'expected.npz')
    for plan in (plans.XLA, plans.get_plan('cpu')):
        logits = plan.apply_to(model).apply(
            {'params': state.params, 'batch_stats': state.batch_stats}, expected['x']
        )
        np.testing.assert_allclose(logits, expected['logits'], rtol=1e-5, atol=1e-6)
    # The standalone loader reads the same variables.
    variables, step = runs.load_variables(tmp_path)
    assert step == 1 and set(variables['params']) == set(restored[0].params)


def test_config_json_of_an_earlier_version_loads():
    from resnet_jax.config import from_dict

    saved = base_config().to_dict()
    saved['model'].update(scan_blocks=None, canonical_grads=True, dot_1x1=None)
    saved['cpu_train_step_fusion'] = False
    config = from_dict(json.loads(json.dumps(saved)))
    assert 'scan_blocks' not in config.model and 'cpu_train_step_fusion' not in config
    assert model_from_config(config, 10).num_classes == 10


def test_batch_that_does_not_divide_across_devices_is_a_config_error(data_dir):
    config = tiny_config(data_dir, batch_size=10)
    config.model.bn_group_size = 0
    with pytest.raises(ConfigError, match='does not divide across 4 devices'):
        train.validate_config(config, 4)


def test_eval_covers_the_whole_split_with_a_masked_tail(data_dir):
    pipeline = input_pipeline.Pipeline(tiny_config(data_dir).dataset, seed=0)
    batches = list(pipeline.eval_batches(128))
    assert len(batches) == 3 and sum(int(b['mask'].sum()) for b in batches) == 360
    assert batches[-1]['mask'][: 360 - 256].all() and not batches[-1]['mask'][360 - 256 :].any()


# --- train_and_evaluate: checkpoints and resume ----------------------------------------------


def test_stopped_run_resumes_from_its_checkpoint(data_dir, tmp_path, capsys):
    # ResNet-20: three blocks per stage, so on CPU the plan's steps hold the state in
    # their own layout (backends.plans.StateLayout), converted by the checkpointer.
    config = tiny_config(data_dir)
    config.model.name = 'cifar_resnet20'
    full = train.train_and_evaluate(config, str(tmp_path / 'full'))
    assert full['step'] == 6
    for key in ('step', 'train_loss', 'eval_top1_error', 'eval_top5_error', 'wall_seconds'):
        assert key in json.loads((tmp_path / 'full' / 'results.json').read_text())
    assert (tmp_path / 'full' / 'curves.png').stat().st_size > 0
    # TensorBoard reads the run's scalars from its event file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / 'full')).Reload()
    assert {'train_loss', 'eval_top1_error', 'images_per_sec'} <= set(events.Tags()['scalars'])
    last = events.Scalars('eval_top1_error')[-1]
    assert last.step == 6 and last.value == pytest.approx(full['eval_top1_error'], abs=1e-6)
    assert [e.step for e in events.Scalars('train_loss')] == list(
        range(config.log_every_steps, 7, config.log_every_steps)
    )

    config.num_train_steps = 3  # "stopped" after the first checkpoint
    train.train_and_evaluate(config, str(tmp_path / 'resumed'))
    config.num_train_steps = 6
    capsys.readouterr()
    resumed = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
    assert 'resumed from step 3' in capsys.readouterr().out
    # one event file per launch (the two launches may start within a second)
    assert len(list((tmp_path / 'resumed').glob('events.out.tfevents.*'))) == 2
    events = EventAccumulator(str(tmp_path / 'resumed')).Reload()
    assert sorted(e.step for e in events.Scalars('train_loss')) == [2, 3, 4, 6]
    for key in ('train_loss', 'eval_loss', 'eval_top1_error', 'eval_top5_error'):
        assert resumed[key] == pytest.approx(full[key], rel=1e-5), key
    history = json.loads((tmp_path / 'resumed' / 'history.json').read_text())
    # The first run logged its end (step 3); the history continues from the checkpoint.
    assert [r['step'] for r in history['train']] == [2, 3, 4, 6]
    assert [r['step'] for r in history['eval']] == [3, 6]
    # Checkpoints hold the model's own tree (block by block), whatever the state's layout.
    saved, _ = runs.load_variables(str(tmp_path / 'resumed'))
    model = model_from_config(config, 10)
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert jax.tree_util.tree_structure(saved) == jax.tree_util.tree_structure(expected)


def test_checkpoint_of_another_model_is_refused(data_dir, tmp_path):
    config = tiny_config(data_dir, num_train_steps=3)
    train.train_and_evaluate(config, str(tmp_path))
    config.model.name = 'cifar_plain8'
    with pytest.raises(
        ConfigError,
        match=r"model.name 'cifar_resnet8' \(this config: "
        r"'cifar_plain8'\)",
    ):
        train.train_and_evaluate(config, str(tmp_path))


# --- the launcher ----------------------------------------------------------------------------


@pytest.mark.slow
def test_command_line_override_reaches_the_model(data_dir, tmp_path):
    proc = run_main(
        f'--workdir={tmp_path}',
        '--config.model.name=cifar_resnet8',
        '--config.model.shortcut=C',
        '--config.num_train_steps=1',
        '--config.batch_size=16',
        f'--config.dataset.data_dir={data_dir}',
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = ocp.StandardCheckpointer().restore(tmp_path / 'checkpoints' / '1' / 'state')
    assert 'proj_conv' in state['params']['conv2_1']['shortcut']  # option C: every block


@pytest.mark.slow
def test_relative_workdir_as_in_the_quickstart(data_dir, tmp_path):
    """The README's first command uses the default, relative, workdir. With the digits
    prepared, the run does not import TensorFlow (~10 s of start-up): they are read from
    ArrayRecord and the event records are written without TensorFlow's file API."""
    proc = run_main(
        '--workdir=workdirs/run',
        '--config.model.name=cifar_resnet8',
        '--config.num_train_steps=2',
        '--config.batch_size=16',
        '--config.checkpoint_every_steps=1',
        f'--config.dataset.data_dir={data_dir}',
        cwd=tmp_path,
        python_flags=('-X', 'importtime'),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = re.findall(r'^import time:.*\| +([\w.]+)$', proc.stderr, re.M)
    assert 'resnet_jax.training.loop' in imported and 'tensorboard.summary' in imported
    assert not [m for m in imported if m.split('.')[0] in ('tensorflow', 'keras')]
    assert list((tmp_path / 'workdirs' / 'run').glob('events.out.tfevents.*'))
    assert (tmp_path / 'workdirs' / 'run' / 'checkpoints' / '2').is_dir()
    again = run_main(
        '--workdir=workdirs/run',
        '--config.model.name=cifar_resnet8',
        '--config.num_train_steps=2',
        '--config.batch_size=16',
        f'--config.dataset.data_dir={data_dir}',
        cwd=tmp_path,
    )
    assert again.returncode == 0 and 'resumed from step 2' in again.stdout


@pytest.mark.parametrize(
    'args, message',
    [
        (['--config.bogus=1'], "unknown config field 'bogus'"),
        (['--config=configs/nope.py'], 'cannot load config file'),
        (['--config.model.name=resnet51'], "unknown model 'resnet51'"),
        (['--config=configs/cifar10.py:resnet21'], '6n\\+2'),
        (
            ['--config.batch_size=10', '--config.model.bn_group_size=0'],
            'does not divide across 4 devices',
        ),
        (['--config.learning_rate=0'], 'learning_rate must be positive'),
        (['--config.batch_size=0'], 'batch_size must be positive'),
        (['--config.dataset.name=no_such_dataset'], "unknown dataset 'no_such_dataset'"),
        (
            ['--config.dataset.data_dir=/nonexistent/tfds'],
            'data_dir /nonexistent/tfds does not exist',
        ),
        (
            ['--config.dataset.name=imagenet2012', '--config.dataset.data_dir={tmp}'],
            'imagenet2012 is not prepared in .*; put ILSVRC2012_img_train.tar',
        ),
    ],
)
def test_bad_input_gets_one_line_and_exit_code_2(tmp_path, args, message):
    """Each gets one line and exit code 2, and the workdir is left as it was."""
    workdir = tmp_path / 'work'
    workdir.mkdir()
    (workdir / 'results.json').write_text('{"keep": 1}')
    proc = run_main(f'--workdir={workdir}', *[a.format(tmp=tmp_path) for a in args], devices=4)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-2000:]
    import re

    assert re.search(message, lines[0])
    assert 'Traceback' not in proc.stderr + proc.stdout
    assert [p.name for p in workdir.iterdir()] == ['results.json']
    assert (workdir / 'results.json').read_text() == '{"keep": 1}'


def test_unwritable_workdir_is_refused(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('keep')
    proc = run_main(f'--workdir={blocker}/work')
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f'error: workdir {blocker}/work cannot be created: {blocker} is not a directory'
    ]
    assert blocker.read_text() == 'keep'


@pytest.mark.parametrize(
    'workdir, message',
    [
        ('/proc/resnet_jax_run', 'cannot be created: No such file or directory'),  # virtual fs
        ('/sys/kernel/resnet_jax_run', 'cannot be created: Operation not permitted'),
        ('/sys/kernel', 'is not writable: Permission denied'),  # exists, read-only (even for root)
    ],
)
def test_workdir_that_cannot_be_created_or_written_is_refused(data_dir, workdir, message):
    proc = run_main(f'--workdir={workdir}', f'--config.dataset.data_dir={data_dir}')
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [f'error: workdir {workdir} {message}'], proc.stderr[-2000:]
    assert 'Traceback' not in proc.stdout


@pytest.mark.slow
def test_default_run_reaches_below_3_percent_and_resumes(data_dir, tmp_path):
    proc = run_main(
        f'--workdir={tmp_path}', f'--config.dataset.data_dir={data_dir}', optimized=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['step'] == 250
    assert results['eval_top1_error'] < 0.03
    for expected in (
        'checkpoints',
        'curves.png',
        'resnet-jax evaluate --workdir=',
        '--config=cifar10.py:resnet20',
        '--config=imagenet.py:resnet50',
    ):
        assert expected in proc.stdout
    # the progress line, with images/s and an ETA
    assert re.search(
        r'^\[[\d,]+/250\] [\d.]+% \| [\d,]+ img/s .*\| ETA \w+ \| loss [\d.]+$', proc.stdout, re.M
    ), proc.stdout[-2000:]
    again = run_main(f'--workdir={tmp_path}', f'--config.dataset.data_dir={data_dir}')
    assert again.returncode == 0 and 'resumed from step 250' in again.stdout
    # (The README's evaluation command on a run's workdir, every protocol, in one process
    # and in two: test_faults.test_two_processes_evaluate_every_protocol_as_one_process.)
