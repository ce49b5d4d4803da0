"""The train loop around the compiled steps of ``resnet_jax.steps``.

Phases of ``train_and_evaluate``: config check -> mesh -> data -> model and optimiser ->
checkpoint restore -> loop (train, log, evaluate, checkpoint) -> results.

Data parallelism: one ``jax.jit`` step over a 1-D ``Mesh`` of every device of every host.
The state is replicated (``NamedSharding(mesh, P())``), the batch is split along its first
axis (``P('data')``), and XLA inserts the gradient all-reduce. BatchNorm statistics are
computed per ``bn_group_size`` examples of the *global* batch (see ``layers.BatchNorm``),
so a step computes the same function on 1 device or 1,000; the running statistics are
replicated, i.e. already identical ("averaged") on every device when evaluating or saving.
"""


import concurrent.futures
import functools
import itertools
import json
import os
import socket
import time

import jax
import ml_collections
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax import (checkpointing, execution, faults, input_pipeline, optim, parallel,
                        plot, progress, steps)
from resnet_jax import config as config_lib
from resnet_jax.config import ConfigError
from resnet_jax.steps import TrainMetrics, TrainState


# Event files of this process: two writers opened in the same second never share a name.
_EVENT_FILES = itertools.count()


class RunWriter:
    """The run's scalars on process 0: a line on the console per step (the speed and ETA
    scalars are on the console as the progress line instead) and a TensorBoard event file
    in the workdir. The loop passes numbers already on the host; the console line is
    printed at once, in order with the progress line, and the file is written from one
    background thread, so the loop never waits on the file system (as with clu's
    ``AsyncMultiWriter``). A failed write is raised by the next ``write_scalars`` or by
    ``close``.

    The event file holds TensorBoard's ``Event`` records (scalars as ``simple_value``),
    framed by TensorBoard's own ``RecordWriter``. clu's ``metric_writers`` and
    TensorBoard's ``EventFileWriter`` write the same records through TensorFlow's file
    API, and importing TensorFlow costs every launch ~10 s of start-up (2 CPU cores)."""

    def __init__(self, workdir: epath.Path | None):
        self._records = None
        if workdir is not None:
            from tensorboard.compat.proto import event_pb2
            from tensorboard.summary.writer.record_writer import RecordWriter

            self._event = event_pb2.Event
            name = (f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.'
                    f'{os.getpid()}.{next(_EVENT_FILES)}')  # TensorBoard's naming
            self._records = RecordWriter(open(os.path.join(workdir, name), 'xb'))  # noqa: SIM115
            self._append(self._event(wall_time=time.time(), file_version='brain.Event:2'))
        self._thread = concurrent.futures.ThreadPoolExecutor(1, 'resnet_jax_metric_writer')
        self._pending: list[concurrent.futures.Future] = []

    def _append(self, event) -> None:
        self._records.write(event.SerializeToString())

    def _write_event(self, step: int, scalars: dict[str, float], wall_time: float) -> None:
        event = self._event(wall_time=wall_time, step=step)
        for tag, value in scalars.items():
            event.summary.value.add(tag=tag, simple_value=value)
        self._append(event)
        self._records.flush()

    def _raise_failures(self, wait: bool) -> None:
        done = [f for f in self._pending if wait or f.done()]
        self._pending = [f for f in self._pending if f not in done]
        for future in done:
            future.result()

    def write_scalars(self, step: int, scalars) -> None:
        if self._records is None:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        console = {k: v for k, v in scalars.items() if k not in progress.SCALARS}
        if console:
            progress.print_line(f'[{step}] ' + ', '.join(f'{k}={v:.6g}'
                                                         for k, v in console.items()))
        self._raise_failures(wait=False)
        self._pending.append(self._thread.submit(self._write_event, int(step), scalars,
                                                 time.time()))

    def close(self, raise_failures: bool = True) -> None:
        """Waits for the pending writes and closes the file; ``raise_failures=False`` when
        the run is failing already (its own error is the one to report)."""
        try:
            if raise_failures:
                self._raise_failures(wait=True)
        finally:
            self._thread.shutdown()
            if self._records is not None:
                records, self._records = self._records, None
                try:
                    records.close()
                except OSError:
                    if raise_failures:
                        raise


def create_writer(workdir: epath.Path) -> RunWriter:
    """The run's metric writer: TensorBoard and the console on process 0, nothing
    elsewhere."""
    return RunWriter(workdir if jax.process_index() == 0 else None)


def evaluate(eval_fn, mesh: Mesh, state: TrainState, pipeline: input_pipeline.Pipeline,
             batch_size: int) -> dict[str, float]:
    """Metrics over the complete split (the padded tail is masked, never dropped)."""
    total = None
    for batch in pipeline.eval_batches(batch_size, jax.process_index(), jax.process_count()):
        m = eval_fn(state, parallel.shard_batch(mesh, batch))
        total = m if total is None else total.merge(m)
    return parallel.host_values(total)


# --- the loop --------------------------------------------------------------------------------

def validate_config(config: ml_collections.ConfigDict, num_devices: int,
                    progress=None) -> None:
    """Raises ConfigError on a config that cannot run, before anything is built: every
    field (``resnet_jax.config.validate``), then what depends on the devices and the data
    (a folder dataset is prepared here on first use, reporting ``progress(done, total)``)."""
    config_lib.validate(config)
    for field in ('batch_size', 'eval_batch_size'):
        value = config[field]
        if value % num_devices or value % jax.process_count():
            raise ConfigError(f'{field}={value} does not divide across {num_devices} devices '
                              f'({jax.process_count()} processes); use a multiple of '
                              f'{num_devices}')
    k = config.grad_accum_steps
    micro = config.batch_size // k
    if k > 1 and (micro % num_devices or micro % jax.process_count()):
        raise ConfigError(f'micro-batches of {micro} (batch_size={config.batch_size} / '
                          f'grad_accum_steps={k}) do not divide across {num_devices} devices '
                          f'({jax.process_count()} processes)')
    if config.init_from and not os.path.isdir(os.path.join(config.init_from, 'checkpoints')):
        raise ConfigError(f'init_from {config.init_from} holds no checkpoints (a training '
                          'workdir or the output of python -m resnet_jax.convert)')
    input_pipeline.check_config(config.dataset, progress)


def check_workdir(config: ml_collections.ConfigDict, workdir: str,
                  resume_step: int | None = None) -> None:
    """Raises ConfigError unless the run can write in ``workdir`` (created if needed) and
    its checkpoints there, if any, are this config's (``resume_step``: one of them).
    Changes nothing in an existing workdir."""
    faults.check_workdir(workdir)
    directory = epath.Path(os.path.abspath(workdir)) / 'checkpoints'
    checkpointing.check_resume(directory, config, resume_step)
    if directory.is_dir():
        faults.check_writable(directory, 'checkpoint folder')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices=None, step_cache_dir: str | None = None,
                       resume_step: int | None = None,
                       prepare_progress=None) -> dict[str, float]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint, or from
    checkpoint ``resume_step``: see ``Checkpointer.roll_back``) and returns the final
    metrics, also written to ``workdir/results.json``.

    With ``step_cache_dir``, a single-process run keeps its compiled steps there and a
    relaunch loads them without tracing (``step_cache``). ``prepare_progress(done, total)``
    reports the preparation of a folder dataset on first use.

    Stopped by SIGTERM/SIGINT, it checkpoints and returns ``{'stopped_by': <signal>,
    'step': N}`` without writing results. A config or workdir that cannot run raises
    ``ConfigError`` before anything is written (``config.json`` is written with the
    run's first checkpoint); a non-finite loss, ``faults.NonFiniteLossError`` naming the
    checkpoints on disk; a checkpoint that cannot be written,
    ``checkpointing.CheckpointWriteError``, at once.
    """
    start_time = time.time()
    mesh = parallel.create_mesh(devices)
    validate_config(config, mesh.size, prepare_progress)
    check_workdir(config, workdir, resume_step)
    workdir = epath.Path(os.path.abspath(workdir))  # orbax needs absolute paths

    def write_config():  # with the first checkpoint of this launch
        if jax.process_index() == 0:
            faults.write_atomically(workdir / 'config.json',
                                    config.to_json_best_effort(indent=2))

    with faults.WorkdirLock(workdir), faults.StopRequest() as stop:
        ckpt = checkpointing.Checkpointer(workdir / 'checkpoints', config,
                                          on_first_save=write_config)
        failed = True
        try:
            if resume_step is not None:
                ckpt.roll_back(resume_step)
            results = _train(config, workdir, mesh, ckpt, stop, start_time, step_cache_dir)
            failed = False
            return results
        except faults.NonFiniteLossError as e:
            ckpt.wait()
            raise faults.NonFiniteLossError(e.step, e.what, e.value,
                                            checkpoints=ckpt.describe()) from None
        except OSError as e:
            if not faults.is_write_failure(e, workdir):
                raise
            # the workdir's other files: the event file, results, curves
            raise ckpt.write_error(e, target=e.filename or f'in {workdir}') from None
        finally:
            if failed:  # the run's own error is the one to report
                try:
                    ckpt.close()
                except checkpointing.CheckpointWriteError:
                    pass
            else:
                ckpt.close()


def _train(config, workdir: epath.Path, mesh: Mesh, ckpt: checkpointing.Checkpointer,
           stop: faults.StopRequest, start_time: float,
           step_cache_dir: str | None) -> dict[str, float]:
    lead = jax.process_index() == 0

    # Data.
    pipeline = input_pipeline.Pipeline(config.dataset, config.seed)

    # Model, optimiser, state; the execution plan of the mesh's platform runs them.
    model = steps.create_model(config, pipeline.num_classes)
    plan = execution.plan_for_mesh(mesh, config.execution)
    learning_rate_fn = optim.create_learning_rate_fn(config)
    tx = optim.create_optimizer(config, learning_rate_fn)
    replicated = NamedSharding(mesh, P())
    ema = config.ema_decay > 0
    state = steps.init_train_state(model, tx, jax.random.key(config.seed),
                                   pipeline.image_shape(), mesh, plan, ema=ema)
    empty_metrics = jax.device_put(TrainMetrics.empty(), replicated)

    # Checkpoints: the latest readable one, with the metrics of its unfinished log window.
    # They hold the model's own tree; the state runs in the plan's layout.
    def packed(canonical_state):
        return jax.device_put(plan.pack_state(model, canonical_state), replicated)

    guard = faults.NonFiniteGuard()

    def save(step, state, train_metrics):
        guard.check_all()  # never checkpoint a diverged state
        loss_sum, norm = guard.values_at(step)  # the step's summed per-example losses
        loss = None if loss_sum is None else loss_sum / config.batch_size
        ckpt.save(step, plan.unpack_state(model, state), train_metrics, history, loss, norm)

    train_metrics, history = empty_metrics, {'train': [], 'eval': []}
    restored = ckpt.restore_latest(plan.unpack_state(model, state), empty_metrics)
    if lead:
        print(f'training {config.model.name} on {config.dataset.name} for '
              f'{config.num_train_steps} steps on {mesh.size} device(s) '
              f'({mesh.devices.flat[0].platform}); workdir {workdir}', flush=True)
    if restored is not None:
        canonical, train_metrics, meta = restored
        history = meta['history']
        state = packed(canonical)
        if lead:
            print(f'resumed from step {int(state.step)}', flush=True)
    elif config.init_from:
        pretrained, from_step = checkpointing.load_variables(config.init_from)
        canonical = plan.unpack_state(model, state)
        variables, fresh = checkpointing.merge_pretrained(
            {'params': canonical.params, 'batch_stats': canonical.batch_stats}, pretrained)
        canonical = canonical.replace(params=variables['params'],
                                      batch_stats=variables['batch_stats'])
        state = packed(steps.add_ema(canonical) if ema else canonical)
        if lead:
            print(f'initialised from {config.init_from} (step {from_step}); kept fresh: '
                  f'{", ".join(fresh) or "nothing"}', flush=True)

    train_fn, eval_fn = steps.compile_steps(
        model, tx, learning_rate_fn, config, mesh, plan,
        cache_dir=step_cache_dir if jax.process_count() == 1 else None)
    writer = create_writer(workdir)
    try:  # the event file is closed and the writer's thread ended whatever happens
        report = progress.Progress(config.num_train_steps, config.batch_size, mesh.size, start_time,
                                   writer.write_scalars, progress.print_line if lead else None)
        hooks = []
        if config.profile and lead:
            from clu import periodic_actions
            hooks.append(periodic_actions.Profile(logdir=str(workdir), num_profile_steps=5))

        def run_eval(step):
            values = evaluate(eval_fn, mesh, state, pipeline, config.eval_batch_size)
            result = {'step': step, **{f'eval_{k}': v for k, v in values.items()}}
            if ema:
                values = evaluate(eval_fn, mesh, steps.with_ema_weights(state), pipeline,
                                  config.eval_batch_size)
                result.update({f'eval_ema_{k}': v for k, v in values.items()})
            return result

        step = int(state.step)
        batches = input_pipeline.prefetch(
            input_pipeline.train_iterator(pipeline, step, config.batch_size, jax.process_index(),
                                          jax.process_count()),
            functools.partial(parallel.shard_batch, mesh))
        eval_result = history['eval'][-1] if history['eval'] else None
        stopped_by = None
        previous = None  # the last step's metrics, on the host once the guard checked them
        while step < config.num_train_steps:
            with jax.profiler.StepTraceAnnotation('train', step_num=step):
                state, m = train_fn(state, next(batches))
            step += 1
            guard.add(step, m.loss.total, m.param_norm.total)
            ckpt.poll()  # a checkpoint that failed to write stops the run now
            train_metrics = train_metrics.merge(m)
            report.start(step)
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
                report.report(step, summary['train_loss'])
            elif report.due() and previous is not None:
                # The loss of step - 1: the guard has fetched it already (no device sync).
                report.report(step - 1, parallel.host_values(previous)['loss'])
            previous = m
            if step % config.eval_every_steps == 0 or last:
                eval_result = run_eval(step)
                writer.write_scalars(step, {k: v for k, v in eval_result.items() if k != 'step'})
                history['eval'].append(eval_result)
                state = state.replace(plateau_metric=parallel.replicated_scalar(
                    mesh, eval_result['eval_top1_error']))
            checkpoint_now = step % config.checkpoint_every_steps == 0 or last
            stop_now = stop.requested(step, boundary=checkpoint_now or
                                      step % config.log_every_steps == 0)
            if checkpoint_now or stop_now:
                save(step, state, train_metrics)
            if stop_now:
                stopped_by = stop.signal_name or 'a preemption notice (SIGTERM to a process)'
                break
        batches.close()  # stops the input pipeline's workers
        guard.check_all()
        save(step, state, train_metrics)  # no-op when this step is saved already
    except BaseException:
        writer.close(raise_failures=False)
        raise
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
        **{k: v for k, v in eval_result.items() if k.startswith('eval_ema_')},
        'wall_seconds': time.time() - start_time,
        'corrupt_records_skipped': pipeline.corrupt_records,
    }
    if lead:
        (workdir / 'results.json').write_text(json.dumps(results, indent=2))
        (workdir / 'history.json').write_text(json.dumps(history))
        plot.plot_runs({config.model.name: history}, workdir / 'curves.png')
    return results
