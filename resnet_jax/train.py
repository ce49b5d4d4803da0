"""The train loop: pure step functions, jit-compiled over a device mesh.

Phases of ``train_and_evaluate``: config check -> mesh -> data -> model and optimiser ->
checkpoint restore -> loop (train, log, evaluate, checkpoint) -> results.

Data parallelism: one ``jax.jit`` step over a 1-D ``Mesh`` of every device of every host.
The state is replicated (``NamedSharding(mesh, P())``), the batch is split along its first
axis (``P('data')``), and XLA inserts the gradient all-reduce. BatchNorm statistics are
computed per ``bn_group_size`` examples of the *global* batch (see ``layers.BatchNorm``),
so a step computes the same function on 1 device or 1,000; the running statistics are
replicated, i.e. already identical ("averaged") on every device when evaluating or saving.
"""


import functools
import json
import os
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers, metrics, periodic_actions
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax import (augment, checkpointing, faults, input_pipeline, models, optim,
                        parallel, plot)
from resnet_jax.config import ConfigError


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    plateau_metric: jax.Array  # the last eval top-1 error, fed to reduce-on-plateau


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output('loss')
    top1_error: metrics.Average.from_output('top1_error')
    top5_error: metrics.Average.from_output('top5_error')
    learning_rate: metrics.LastValue.from_output('learning_rate')
    param_norm: metrics.LastValue.from_output('param_norm')  # also guards against overflow


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    loss: metrics.Average.from_output('loss')
    top1_error: metrics.Average.from_output('top1_error')
    top5_error: metrics.Average.from_output('top5_error')


class ConsoleWriter(metric_writers.LoggingWriter):
    """Prints scalars, one line per step (the rest goes to absl logging as in clu)."""

    def write_scalars(self, step, scalars):
        print(f'[{step}] ' + ', '.join(f'{k}={float(v):.6g}' for k, v in scalars.items()),
              flush=True)


def create_writer(workdir: epath.Path) -> metric_writers.MetricWriter:
    """TensorBoard event files and the console on process 0; nothing elsewhere."""
    if jax.process_index() != 0:
        return metric_writers.MultiWriter([])
    return metric_writers.AsyncMultiWriter([ConsoleWriter(),
                                            metric_writers.SummaryWriter(str(workdir))])


# --- model and state --------------------------------------------------------------------------

def create_model(config: ml_collections.ConfigDict, num_classes: int) -> models.ResNet:
    """The model of ``config.model`` with ``num_classes`` outputs."""
    overrides = {k: v for k, v in config.model.items() if k != 'name' and v is not None}
    return models.create_model(config.model.name, num_classes=num_classes, **overrides)


def create_train_state(model: models.ResNet, tx: optax.GradientTransformation,
                       rng: jax.Array, image_shape: tuple[int, ...]) -> TrainState:
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables['batch_stats'], opt_state=tx.init(params),
                      plateau_metric=jnp.ones((), jnp.float32))


def init_train_state(model: models.ResNet, tx: optax.GradientTransformation, rng: jax.Array,
                     image_shape: tuple[int, ...], mesh: Mesh) -> TrainState:
    """``create_train_state``, replicated over ``mesh`` (all processes compute the same).

    The state is built op by op, not as one jitted program: XLA:CPU takes minutes to
    compile the unrolled init of a very deep net (over 3 for ResNet-1202), op by op it
    takes seconds, and the values are the same.
    """
    state = create_train_state(model, tx, rng, image_shape)
    return jax.tree_util.tree_map(lambda x: parallel.replicate(mesh, np.asarray(x)), state)


# --- steps -----------------------------------------------------------------------------------

def classification_metrics(logits: jax.Array, labels: jax.Array,
                           label_smoothing: float = 0.0) -> dict[str, jax.Array]:
    """Per-example loss and top-1 / top-5 errors."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets)
    _, top = jax.lax.top_k(logits, min(5, logits.shape[-1]))
    hit = top == labels[:, None]
    return {'loss': loss, 'top1_error': 1.0 - hit[:, 0].astype(jnp.float32),
            'top5_error': 1.0 - hit.any(-1).astype(jnp.float32)}


def train_step(model: models.ResNet, tx: optax.GradientTransformationExtraArgs,
               learning_rate_fn: optax.Schedule, label_smoothing: float, state: TrainState,
               batch: dict[str, jax.Array]) -> tuple[TrainState, TrainMetrics]:
    """One SGD step on a global batch."""

    def loss_fn(params):
        logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                      batch['image'], train=True, mutable=['batch_stats'])
        per_example = classification_metrics(logits, batch['label'], label_smoothing)
        return per_example['loss'].mean(), (per_example, updates['batch_stats'])

    grads, (per_example, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                   value=state.plateau_metric)
    params = optax.apply_updates(state.params, updates)
    lr = learning_rate_fn(state.step) * optim.plateau_scale(state.opt_state)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, TrainMetrics.single_from_model_output(
        learning_rate=lr, param_norm=optim.global_norm(params), **per_example)


def eval_step(model: models.ResNet, state: TrainState,
              batch: dict[str, jax.Array]) -> EvalMetrics:
    """Metrics of one (possibly padded) eval batch; ``batch['mask']`` marks real examples."""
    logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                         batch['image'], train=False)
    per_example = classification_metrics(logits, batch['label'])
    return EvalMetrics.single_from_model_output(mask=batch['mask'], **per_example)


# --- compiled steps -------------------------------------------------------------------------

def train_step_compiler_options(config: ml_collections.ConfigDict,
                                model: models.ResNet) -> dict | None:
    """XLA options for the train step, chosen by backend and model.

    On XLA:CPU the elementwise-fusion pass duplicates an unrolled net's un-materialised
    residual stream (each block's BN + addition + ReLU) into the backward pass's
    consumers, so the gradient of an unrolled residual net costs O(depth^2) (per layer,
    ResNet-110's step was 3x ResNet-20's; plain nets stayed linear). The default CPU
    model scans its blocks (``ResNet.scan_blocks``), which fusion cannot cross; for an
    unrolled model on CPU the train step is compiled without that pass instead.
    ``config.cpu_train_step_fusion=True`` keeps XLA's default. Other backends: untouched.
    """
    if (jax.default_backend() == 'cpu' and not model.uses_scan()
            and not config.get('cpu_train_step_fusion', False)):
        return {'xla_disable_hlo_passes': 'fusion'}
    return None


def compile_steps(model, tx, learning_rate_fn, config, mesh: Mesh):
    """The jitted train and eval steps, with the state replicated and the batch split."""
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    train = jax.jit(functools.partial(train_step, model, tx, learning_rate_fn,
                                      config.label_smoothing),
                    in_shardings=(replicated, split), out_shardings=(replicated, replicated),
                    donate_argnums=0,
                    compiler_options=train_step_compiler_options(config, model))
    evaluate = jax.jit(functools.partial(eval_step, model),
                       in_shardings=(replicated, split), out_shardings=replicated)
    return train, evaluate


def evaluate(eval_fn, mesh: Mesh, state: TrainState, pipeline: input_pipeline.Pipeline,
             batch_size: int) -> dict[str, float]:
    """Metrics over the complete split (the padded tail is masked, never dropped)."""
    total = None
    for batch in pipeline.eval_batches(batch_size, jax.process_index(), jax.process_count()):
        m = eval_fn(state, parallel.shard_batch(mesh, batch))
        total = m if total is None else total.merge(m)
    return parallel.host_values(total)


# --- the loop --------------------------------------------------------------------------------

def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ConfigError on a config that cannot run, before anything is built."""
    input_pipeline.check_dataset(config.dataset.name, config.dataset.data_dir)
    try:
        create_model(config, num_classes=10)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for field in ('batch_size', 'eval_batch_size'):
        value = config[field]
        if value <= 0:
            raise ConfigError(f'{field} must be positive; got {value}')
        if value % num_devices or value % jax.process_count():
            raise ConfigError(f'{field}={value} does not divide across {num_devices} devices '
                              f'({jax.process_count()} processes); use a multiple of '
                              f'{num_devices}')
    group = config.model.bn_group_size
    if group and config.batch_size % min(group, config.batch_size):
        raise ConfigError(f'batch_size={config.batch_size} is not a multiple of '
                          f'model.bn_group_size={group}')
    if config.learning_rate <= 0:
        raise ConfigError(f'learning_rate must be positive; got {config.learning_rate}')
    if config.num_train_steps <= 0:
        raise ConfigError(f'num_train_steps must be positive; got {config.num_train_steps}')
    optim.create_learning_rate_fn(config)
    if config.init_from and not os.path.isdir(os.path.join(config.init_from, 'checkpoints')):
        raise ConfigError(f'init_from {config.init_from} holds no checkpoints (a training '
                          'workdir or the output of python -m resnet_jax.convert)')
    if config.dataset.preprocessing not in augment.PREPROCESSING:
        raise ConfigError(f'unknown dataset.preprocessing {config.dataset.preprocessing!r}; '
                          f'allowed: {", ".join(augment.PREPROCESSING)}')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices=None) -> dict[str, float]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and returns
    the final metrics, also written to ``workdir/results.json``.

    Stopped by SIGTERM/SIGINT, it checkpoints and returns ``{'stopped_by': <signal>,
    'step': N}`` without writing results. A non-finite loss raises
    ``faults.NonFiniteLossError``; a config or workdir that cannot run, ``ConfigError``.
    """
    start_time = time.time()
    mesh = parallel.create_mesh(devices)
    validate_config(config, mesh.size)
    faults.check_workdir(workdir)
    workdir = epath.Path(os.path.abspath(workdir))  # orbax needs absolute paths
    checkpointing.check_identity(workdir / 'checkpoints', config)
    with faults.WorkdirLock(workdir), faults.StopRequest() as stop:
        ckpt = checkpointing.Checkpointer(workdir / 'checkpoints', config)
        try:
            return _train(config, workdir, mesh, ckpt, stop, start_time)
        finally:
            ckpt.close()


def _train(config, workdir: epath.Path, mesh: Mesh, ckpt: checkpointing.Checkpointer,
           stop: faults.StopRequest, start_time: float) -> dict[str, float]:
    lead = jax.process_index() == 0
    if lead:
        (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))

    # Data.
    pipeline = input_pipeline.Pipeline(config.dataset, config.seed)

    # Model, optimiser, state.
    model = create_model(config, pipeline.num_classes)
    learning_rate_fn = optim.create_learning_rate_fn(config)
    tx = optim.create_optimizer(config, learning_rate_fn)
    replicated = NamedSharding(mesh, P())
    state = init_train_state(model, tx, jax.random.key(config.seed), pipeline.image_shape(),
                             mesh)
    empty_metrics = jax.device_put(TrainMetrics.empty(), replicated)

    # Checkpoints: the latest readable one, with the metrics of its unfinished log window.
    train_metrics, history = empty_metrics, {'train': [], 'eval': []}
    restored = ckpt.restore_latest(state, empty_metrics)
    if restored is not None:
        state, train_metrics, history = restored
        if lead:
            print(f'resumed from step {int(state.step)}', flush=True)
    elif config.init_from:
        pretrained, from_step = checkpointing.load_variables(config.init_from)
        variables, fresh = checkpointing.merge_pretrained(
            {'params': state.params, 'batch_stats': state.batch_stats}, pretrained)
        state = state.replace(params=variables['params'], batch_stats=variables['batch_stats'])
        if lead:
            print(f'initialised from {config.init_from} (step {from_step}); kept fresh: '
                  f'{", ".join(fresh) or "nothing"}', flush=True)

    train_fn, eval_fn = compile_steps(model, tx, learning_rate_fn, config, mesh)
    writer = create_writer(workdir)
    hooks = [periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                             writer=writer, every_secs=30)]
    if config.profile and lead:
        hooks.append(periodic_actions.Profile(logdir=str(workdir), num_profile_steps=5))

    def run_eval(step):
        values = evaluate(eval_fn, mesh, state, pipeline, config.eval_batch_size)
        return {'step': step, **{f'eval_{k}': v for k, v in values.items()}}

    step = int(state.step)
    batches = input_pipeline.prefetch(
        input_pipeline.train_iterator(pipeline, step, config.batch_size, jax.process_index(),
                                      jax.process_count()),
        functools.partial(parallel.shard_batch, mesh))
    guard = faults.NonFiniteGuard()
    eval_result = history['eval'][-1] if history['eval'] else None
    stopped_by = None
    while step < config.num_train_steps:
        with jax.profiler.StepTraceAnnotation('train', step_num=step):
            state, m = train_fn(state, next(batches))
        step += 1
        guard.add(step, m.loss.total, m.param_norm.total)
        train_metrics = train_metrics.merge(m)
        for hook in hooks:
            hook(step)
        last = step == config.num_train_steps
        if step % config.log_every_steps == 0 or last:
            guard.check_all()
            summary = {f'train_{k}': v
                       for k, v in parallel.host_values(train_metrics).items()}
            writer.write_scalars(step, summary)
            history['train'].append({'step': step, **summary})
            train_metrics = empty_metrics
        if step % config.eval_every_steps == 0 or last:
            eval_result = run_eval(step)
            writer.write_scalars(step, {k: v for k, v in eval_result.items() if k != 'step'})
            history['eval'].append(eval_result)
            state = state.replace(plateau_metric=parallel.replicated_scalar(
                mesh, eval_result['eval_top1_error']))
        stop_now = stop.requested()
        if step % config.checkpoint_every_steps == 0 or last or stop_now:
            guard.check_all()  # never checkpoint a diverged state
            ckpt.save(step, state, train_metrics, history)
        if stop_now:
            stopped_by = stop.signal_name or 'a signal to another process'
            break
    guard.check_all()
    ckpt.save(step, state, train_metrics, history)  # no-op when this step is saved already
    writer.close()
    if stopped_by:
        return {'step': step, 'stopped_by': stopped_by}

    if eval_result is None or eval_result['step'] != step:
        eval_result = run_eval(step)
    last_train = history['train'][-1] if history['train'] else {}
    results = {
        'step': step,
        'train_loss': last_train.get('train_loss', float('nan')),
        'train_top1_error': last_train.get('train_top1_error', float('nan')),
        'eval_loss': eval_result['eval_loss'],
        'eval_top1_error': eval_result['eval_top1_error'],
        'eval_top5_error': eval_result['eval_top5_error'],
        'wall_seconds': time.time() - start_time,
        'corrupt_records_skipped': pipeline.corrupt_records,
    }
    if lead:
        (workdir / 'results.json').write_text(json.dumps(results, indent=2))
        (workdir / 'history.json').write_text(json.dumps(history))
        plot.plot_runs({config.model.name: history}, workdir / 'curves.png')
    return results
