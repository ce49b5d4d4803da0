"""The train loop: ``train_and_evaluate(config, workdir)``, the paper's recipe over compiled
``steps``, in phases: checks before anything is written, the run (``Run.__init__``), the
loop (``Run.train``), the results (``Run.results``). One ``jax.jit`` step over a 1-D mesh
of every device; BatchNorm groups are of the global batch, so a step computes the same
function on 1 device or 1,000.
"""

from __future__ import annotations

import contextlib
import json
import time

import jax
import ml_collections
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import config as config_lib
from resnet_jax import parallel, paths
from resnet_jax.config import ConfigError
from resnet_jax.data import pipeline as data_pipeline
from resnet_jax.data import prepare
from resnet_jax.training import (
    checkpoints,
    curves,
    events,
    faults,
    finetune,
    inputs,
    memory,
    optim,
    progress,
    run_identity,
    runs,
    steps,
)


def validate_config(config: ml_collections.ConfigDict, num_devices: int, progress_fn=None) -> None:
    """Raises ConfigError on a config that cannot run, before anything is built (a folder
    dataset is prepared here on first use, reporting ``progress_fn(done, total)``)."""
    config_lib.validate(config)
    for field in ('batch_size', 'eval_batch_size'):
        value = config[field]
        if value % num_devices or value % jax.process_count():
            raise ConfigError(
                f'{field}={value} does not divide across {num_devices} devices '
                f'({jax.process_count()} processes); use a multiple of '
                f'{num_devices}'
            )
    k = config.grad_accum_steps
    micro = config.batch_size // k
    if k > 1 and (micro % num_devices or micro % jax.process_count()):
        raise ConfigError(
            f'micro-batches of {micro} (batch_size={config.batch_size} / '
            f'grad_accum_steps={k}) do not divide across {num_devices} devices '
            f'({jax.process_count()} processes)'
        )
    if config.init_from and not (paths.resolve(config.init_from) / 'checkpoints').is_dir():
        raise ConfigError(
            f'init_from {config.init_from} holds no checkpoints (a training '
            'workdir or the output of resnet-jax convert)'
        )
    inputs.decoder(config)
    prepare.check_config(config.dataset, progress_fn)


def check_workdir(
    config: ml_collections.ConfigDict, workdir: str, resume_step: int | None = None
) -> None:
    """Raises ConfigError unless the run can write in ``workdir`` (or create it) and its
    checkpoints there, if any, are this config's (``resume_step``: one of them). Changes
    nothing."""
    faults.check_workdir(workdir)
    directory = paths.resolve(workdir) / 'checkpoints'
    run_identity.check_resume(directory, config, resume_step)
    if directory.is_dir():
        faults.check_writable(directory, 'checkpoint folder')


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    devices=None,
    resume_step: int | None = None,
    prepare_progress=None,
    stop_grace_seconds: float | None = None,
) -> dict[str, float]:
    """Trains ``config`` in ``workdir`` (resuming from its latest good checkpoint, or from
    ``resume_step``) and returns the final metrics, also in ``workdir/results.json``;
    stopped by SIGTERM/SIGINT, it checkpoints and returns ``{'stopped_by': <signal>,
    'step': N}``. Raises ConfigError before anything is written; a non-finite loss,
    ``faults.NonFiniteLossError`` naming the checkpoints on disk; a file of the run that
    cannot be written, ``checkpoints.CheckpointWriteError``. ``stop_grace_seconds``: end
    the process (exit 1) that long after a stop signal if the run has not ended (the
    launcher's; None in your own code, where the process is yours).
    """
    start_time = time.time()
    mesh = parallel.create_mesh(devices)
    validate_config(config, mesh.size, prepare_progress)
    check_workdir(config, workdir, resume_step)
    # The data, the model and the compiled step before anything is written: a batch that
    # cannot fit leaves no workdir behind.
    # A new run checks its batch now; a resumed one once its checkpoint is read (a mismatch
    # is refused sooner, and a finished run compiles nothing).
    path = paths.resolve(workdir)
    run = Run(
        config, mesh, start_time, check_memory=not run_identity.step_dirs(path / 'checkpoints')
    )
    new_workdir = not path.exists()
    workdir = faults.create_workdir(workdir)  # absolute, as orbax needs

    def write_config():  # with the first checkpoint of this launch
        if jax.process_index() == 0:
            paths.write_atomically(workdir / 'config.json', config.to_json_best_effort(indent=2))
            if config.dataset.preprocessing == 'mean':  # for runs.preprocess
                runs.save_mean(workdir, run.pipeline.mean)

    failed = True
    try:
        with (
            faults.WorkdirLock(workdir),
            faults.StopRequest(workdir / 'checkpoints', stop_grace_seconds) as stop,
        ):
            ckpt = checkpoints.Checkpointer(
                workdir / 'checkpoints', config, on_first_save=write_config
            )
            try:
                if resume_step is not None:
                    ckpt.roll_back(resume_step)
                run.start(workdir, ckpt)
                results = run.train(stop)
                if 'stopped_by' not in results:
                    results = run.results(stop)
                failed = False
                return results
            except faults.NonFiniteLossError as e:
                ckpt.wait()
                raise faults.NonFiniteLossError(
                    e.step, e.what, e.value, checkpoints=ckpt.describe()
                ) from None
            except OSError as e:
                if not faults.is_write_failure(e, workdir):
                    raise
                # the run's other files: the event file, results, curves
                raise ckpt.write_error(e, target=e.filename or f'in {workdir}') from None
            except jax.errors.JaxRuntimeError as e:
                if 'RESOURCE_EXHAUSTED' not in str(e):
                    raise
                raise memory.OutOfMemoryError(config.batch_size, run.largest_batch) from None
            finally:
                if failed:  # the run's own error is the one to report
                    with contextlib.suppress(checkpoints.CheckpointWriteError):
                        ckpt.close()
                else:
                    ckpt.close()
    finally:
        if failed and new_workdir and not run.steps_taken and jax.process_index() == 0:
            workdir.rmtree(missing_ok=True)  # a run that never took a step leaves nothing


class Run:
    """One launch of a training run: its data, model, optimiser and compiled steps (built by
    ``__init__``, which writes nothing), its state (``start``, from the workdir's
    checkpoints), trained by ``train`` and reported by ``results``."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mesh: Mesh,
        start_time: float,
        check_memory: bool = True,
    ):
        self.config, self.mesh, self.start_time = config, mesh, start_time
        self.lead = jax.process_index() == 0

        self.pipeline = data_pipeline.Pipeline(config.dataset, config.seed)
        self.decoder = inputs.decoder(config)
        if len(self.pipeline.train) < config.batch_size:
            raise ConfigError(
                f'batch_size={config.batch_size} is larger than the training split of '
                f'{config.dataset.name} ({len(self.pipeline.train)} examples)'
            )

        self.model = config_lib.model_from_config(config, self.pipeline.num_classes)
        self.learning_rate_fn = optim.create_learning_rate_fn(config)
        self.tx = optim.create_optimizer(config, self.learning_rate_fn)

        self.train_fn, self.eval_fn, layout = steps.compile_steps(
            self.model, self.tx, self.learning_rate_fn, config, mesh
        )

        # In the steps' layout: the checkpointer converts it to and from the model's.
        self.layout = layout
        self.ema = config.ema_decay > 0
        self.fresh = steps.init_train_state(
            self.model,
            self.tx,
            jax.random.key(config.seed),
            self.pipeline.image_shape(),
            mesh,
            ema=self.ema,
        )
        # From host values: JAX's device_put of a device array onto a mesh of several
        # processes with one device each gives an array orbax cannot save. (A cross-process
        # check: before the compile below, whose time differs between processes by more than
        # Gloo's 30 s to set up its first collective.)
        self.empty_metrics = jax.device_put(
            jax.device_get(steps.TrainMetrics.empty()), NamedSharding(mesh, P())
        )
        self.guard = faults.NonFiniteGuard()
        self.initialised_from = None
        self.largest_batch, self.steps_taken = 0, 0  # (steps taken by this launch)
        self.stop: faults.StopRequest | None = None  # (set by train: an evaluation ends early)
        self.memory_checked = False
        if check_memory:
            self._check_memory()

    def _check_memory(self) -> None:
        """The train step compiled now (the first step reuses it), to refuse a batch that
        cannot fit."""
        config, mesh = self.config, self.mesh
        self.memory_checked = True
        replicated = NamedSharding(mesh, P())
        state = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
            jax.eval_shape(self.layout.from_model, self.fresh),
        )
        self.largest_batch = memory.check_fits(
            lambda size: self.train_fn.lower(state, self._batch_shape(size)).compile(),
            config.batch_size,
            mesh.size * config.grad_accum_steps * max(config.model.bn_group_size, 1),
            mesh.local_devices[0],  # (memory_stats: of a device of this process)
        )

    def _batch_shape(self, size: int) -> dict:
        """A global batch of ``size`` as the train step takes it (from one example's arrays)."""
        one = self.pipeline.train_examples(0, size, 0, 1)
        split = NamedSharding(self.mesh, P('data'))
        return {
            k: jax.ShapeDtypeStruct((size, *v.shape[1:]), v.dtype, sharding=split)
            for k, v in one.items()
            if k != 'skipped'
        }

    def start(self, workdir: epath.Path, ckpt: checkpoints.Checkpointer) -> None:
        """The state to train from: ``ckpt``'s latest good checkpoint, else ``init_from``'s
        weights, else fresh."""
        config, mesh = self.config, self.mesh
        self.workdir, self.ckpt = workdir, ckpt
        start = ckpt.start(
            self.fresh,
            self.empty_metrics,
            self.layout,
            start_from=self._start_from if config.init_from else None,
        )
        if not self.memory_checked and int(start.state.step) < config.num_train_steps:
            self._check_memory()
        del self.fresh
        self.state, self.train_metrics, self.history = start.state, start.metrics, start.history
        if self.lead:
            print(
                f'training {config.model.name} on {config.dataset.name} for '
                f'{config.num_train_steps} steps on {mesh.size} device(s) '
                f'({mesh.devices.flat[0].platform}'
                f'{", JPEGs decoded by DALI" if self.decoder == "dali" else ""}); '
                f'workdir {workdir}',
                flush=True,
            )
            if start.resumed_step is not None:
                print(f'resumed from step {start.resumed_step}', flush=True)
            elif self.initialised_from:
                print(self.initialised_from, flush=True)
        self.last_eval = self.history['eval'][-1] if self.history['eval'] else None

    def _start_from(self, state: steps.TrainState) -> steps.TrainState:
        """``state`` (fresh) with the weights of ``config.init_from``; a layer of another
        shape (an fc for other classes) stays freshly initialised."""
        workdir = self.config.init_from
        pretrained, from_step = runs.load_variables(workdir)
        moved = finetune.transfer(
            {'params': state.params, 'batch_stats': state.batch_stats}, pretrained
        )
        state = state.replace(
            params=moved.variables['params'], batch_stats=moved.variables['batch_stats']
        )
        self.initialised_from = f'initialised from {workdir} (step {from_step}): {moved}'
        meta = run_identity.read_meta(paths.resolve(workdir) / 'checkpoints', from_step)
        differences = run_identity.architecture_differences(meta, self.config)
        if differences:  # (v1 weights fit v1.5's shapes: they compute another function)
            self.initialised_from += (
                f'\nwarning: init_from {workdir} was trained as another network: '
                f'{differences}; its weights are used where their shapes agree'
            )
        return steps.add_ema(state) if self.ema else state

    def train(self, stop: faults.StopRequest) -> dict:
        """Trains to ``num_train_steps`` or a stop request, logging, evaluating and
        checkpointing when due; returns ``{'step': N}`` (and ``'stopped_by'``)."""
        config, step = self.config, int(self.state.step)
        self.stop = stop
        writer = events.create_writer(self.workdir)
        report = progress.Progress(
            config.num_train_steps,
            config.batch_size,
            self.mesh.size,
            self.start_time,
            writer.write_scalars,
            progress.print_line if self.lead else None,
        )
        profile = None
        if config.profile and self.lead:
            from clu import periodic_actions

            profile = periodic_actions.Profile(logdir=str(self.workdir), num_profile_steps=5)
        batches = inputs.batches(self.pipeline, self.mesh, step, config.batch_size, self.decoder)
        stopped_by = None
        due = step % config.eval_every_steps == 0 and 0 < step < config.num_train_steps
        if due and (self.last_eval is None or self.last_eval['step'] != step):
            self._evaluate(step, writer)  # cut short by the stop this run resumes from
        try:  # the event file is closed, the input workers stopped, whatever happens
            previous = None  # the last step's metrics, on the host once the guard checked them
            while step < config.num_train_steps:
                with jax.profiler.StepTraceAnnotation('train', step_num=step):
                    self.state, metrics = self.train_fn(self.state, next(batches))
                step += 1
                self.steps_taken += 1
                self.guard.add(step, metrics.loss.total, metrics.param_norm.total)
                self.ckpt.poll()  # a checkpoint that failed to write stops the run now
                self.train_metrics = self.train_metrics.merge(metrics)
                report.start(step)
                if profile is not None:
                    profile(step)
                last = step == config.num_train_steps
                if step % config.log_every_steps == 0 or last:
                    self._log(step, writer, report)
                elif report.due() and previous is not None:
                    # The loss of step - 1: the guard has fetched it already (no device sync).
                    report.report(step - 1, parallel.host_values(previous)['loss'])
                previous = metrics
                if step % config.eval_every_steps == 0 or last:
                    self._evaluate(step, writer)
                checkpoint_now = step % config.checkpoint_every_steps == 0 or last
                stop_now = stop.requested(
                    step, boundary=checkpoint_now or step % config.log_every_steps == 0
                )
                if checkpoint_now or stop_now:
                    self._checkpoint(step)
                if stop_now:
                    stopped_by = stop.signal_name or 'a preemption notice (SIGTERM to a process)'
                    break
            batches.close()  # stops the input pipeline's workers
            self._checkpoint(step)  # a no-op when this step is saved already
        except BaseException:
            batches.close()
            writer.close(raise_failures=False)
            raise
        writer.close()
        return {'step': step, 'stopped_by': stopped_by} if stopped_by else {'step': step}

    def _log(self, step: int, writer: events.RunWriter, report: progress.Progress) -> None:
        """The training metrics of the steps since the last log line."""
        self.guard.check_all()
        summary = {f'train_{k}': v for k, v in parallel.host_values(self.train_metrics).items()}
        writer.write_scalars(step, summary)
        self.history['train'].append({'step': step, **summary})
        self.train_metrics = self.empty_metrics
        report.report(step, summary['train_loss'])

    def _evaluate(self, step: int, writer: events.RunWriter | None = None) -> dict | None:
        """The metrics over the whole eval split (and the EMA's), recorded in the history;
        the error feeds the reduce-on-plateau schedule. None: cut short by a stop request."""
        metrics = self._eval(self.state)
        if metrics is None:
            return None
        result = {'step': step, **{f'eval_{k}': v for k, v in metrics.items()}}
        if self.ema:
            metrics = self._eval(steps.with_ema_weights(self.state))
            if metrics is None:
                return None
            result.update({f'eval_ema_{k}': v for k, v in metrics.items()})
        if writer is not None:
            writer.write_scalars(step, {k: v for k, v in result.items() if k != 'step'})
            self.history['eval'].append(result)
            self.state = self.state.replace(
                plateau_metric=parallel.replicated_scalar(self.mesh, result['eval_top1_error'])
            )
        self.last_eval = result
        return result

    def _eval(self, state: steps.TrainState) -> dict[str, float] | None:
        """Metrics over the complete split (the padded tail is masked, never dropped);
        None when a stop request cut it short (a single process leaves an evaluation of
        ImageNet's 50,000 images to checkpoint in time; processes would have to agree)."""
        total = None
        batches = self.pipeline.eval_batches(
            self.config.eval_batch_size, jax.process_index(), jax.process_count()
        )
        for batch in batches:
            if self.stop is not None and self.stop.signal_name and jax.process_count() == 1:
                batches.close()
                return None
            m = self.eval_fn(state, parallel.shard_batch(self.mesh, batch))
            total = m if total is None else total.merge(m)
        return parallel.host_values(total)

    def _checkpoint(self, step: int) -> None:
        """Saves ``step`` (in the background), never a diverged state."""
        self.guard.check_all()
        loss_sum, norm = self.guard.values_at(step)  # the step's summed per-example losses
        loss = None if loss_sum is None else loss_sum / self.config.batch_size
        self.ckpt.save(step, self.state, self.train_metrics, self.history, loss, norm)

    def results(self, stop: faults.StopRequest | None = None) -> dict[str, float]:
        """The final metrics (evaluating the last step if it was not), written with the
        history and the curves to the workdir."""
        self.stop = stop
        step = int(self.state.step)
        evaluated = self.last_eval
        if evaluated is None or evaluated['step'] != step:
            evaluated = self._evaluate(step)
        if evaluated is None:
            return {'step': step, 'stopped_by': stop.signal_name}
        last_train = self.history['train'][-1] if self.history['train'] else {}
        results = {
            'step': step,
            'train_loss': last_train.get('train_loss', float('nan')),
            'train_top1_error': last_train.get('train_top1_error', float('nan')),
            'eval_loss': evaluated['eval_loss'],
            'eval_top1_error': evaluated['eval_top1_error'],
            'eval_top5_error': evaluated['eval_top5_error'],
            **{k: v for k, v in evaluated.items() if k.startswith('eval_ema_')},
            'wall_seconds': time.time() - self.start_time,
            'corrupt_records_skipped': self.pipeline.corrupt_records,
        }
        if self.lead:
            (self.workdir / 'results.json').write_text(json.dumps(results, indent=2))
            (self.workdir / 'history.json').write_text(json.dumps(self.history))
            curves.plot_runs({self.config.model.name: self.history}, self.workdir / 'curves.png')
        return results
