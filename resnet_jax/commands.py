"""The ``resnet-jax`` commands but ``convert`` (``tools/convert_command.py``), a
``define_<command>()`` and ``run_<command>(argv)`` pair each: train and evaluate a run,
and the tools (summary, benchmark, prepare, plot)."""

from __future__ import annotations

import json
import os
import sys
import traceback

from absl import flags

from resnet_jax.cli_shared import (
    cache_flag,
    config_flag,
    default_config,
    fail,
    joined,
    model_flags,
    multihost_flags,
    process_tag,
    quiet,
    validated,
    with_model,
    workdir_flag,
)

FLAGS = flags.FLAGS


def define_train() -> None:
    config_flag(
        default_config(),
        'The experiment: a config file, '
        'path/to/file.py[:arg] or a shipped one by name (cifar10.py:resnet110, '
        'imagenet.py:resnet50); any field is set with --config.<field>=<value>. '
        'Default: the embedded default (cifar_resnet20 on the digits).',
    )
    workdir_flag(
        'workdirs/default',
        'Directory for checkpoints, metrics, curves, results; the same command again resumes.',
    )
    flags.DEFINE_integer(
        'resume_step',
        None,
        'Resume from this checkpoint step instead of '
        'the latest (e.g. before a divergence); the later checkpoints are '
        'moved aside (kept), and the same command again continues the '
        'resumed run.',
    )
    flags.DEFINE_integer(
        'stop_grace_seconds',
        25,
        'After SIGTERM/SIGINT, a run that has not ended (its input stuck, a save that '
        'hangs) is ended this long after it, with one line (exit 1); set it below your '
        "scheduler's grace period (Kubernetes: 30 s). 0: never.",
    )
    multihost_flags()
    cache_flag()


def _end_at_once_or_raise() -> None:
    """The exception being handled, raised; in a multi-process run its traceback, then this
    process ends at once (a normal exit waits at JAX's shutdown barrier for peers blocked
    in a collective with it; their watch reports the end)."""
    import jax

    if jax.process_count() == 1:
        raise  # (the exception the caller is handling)
    traceback.print_exc()
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


def run_train(argv: list[str]) -> None:
    """Trains the config's network with the paper's recipe (sec. 3.4, 4.2), resuming from
    the workdir's latest checkpoint."""
    del argv
    config = validated(FLAGS.config)
    if FLAGS.resume_step is not None and FLAGS.resume_step < 0:
        fail(f'--resume_step must be a checkpoint step (>= 0); got {FLAGS.resume_step}')
    if FLAGS.stop_grace_seconds < 0:
        fail(f'--stop_grace_seconds must be >= 0 (0: never); got {FLAGS.stop_grace_seconds}')

    from resnet_jax import parallel
    from resnet_jax.training import supervisor

    multi_process = (
        FLAGS.coordinator_address or (FLAGS.num_processes or 1) > 1 or parallel.cluster_launch()
    )
    if multi_process and supervisor.needed():
        sys.exit(
            supervisor.run(
                FLAGS.workdir,
                FLAGS.heartbeat_timeout_seconds,
                FLAGS.stop_grace_seconds,
                supervisor.process_tag(FLAGS.process_id),
            )
        )

    from resnet_jax import config as config_lib
    from resnet_jax.backends import xla_options

    # XLA's process options for the net, before JAX starts its backends.
    xla_options.configure(config_lib.model_from_config(config, 10).stage_sizes, config.execution)
    xla_options.configure_input(config.dataset.decoder)
    joined('run')

    import jax

    from resnet_jax import paths
    from resnet_jax.config import ConfigError
    from resnet_jax.data import prepare
    from resnet_jax.data.workers import InputError
    from resnet_jax.training import checkpoints, faults, loop, memory

    parallel.enable_compilation_cache(FLAGS.compilation_cache_dir)
    quiet()
    lead = jax.process_index() == 0
    try:
        results = loop.train_and_evaluate(
            config,
            FLAGS.workdir,
            resume_step=FLAGS.resume_step,
            stop_grace_seconds=FLAGS.stop_grace_seconds or None,
            prepare_progress=prepare.print_progress(f'preparing {config.dataset.name}')
            if lead
            else None,
        )
    except ConfigError as e:
        fail(str(e))
    except (faults.NonFiniteLossError, memory.OutOfMemoryError, InputError) as e:
        fail(str(e), code=1)
    except jax.errors.JaxRuntimeError as e:
        supervisor.await_verdict(e, FLAGS.workdir, FLAGS.heartbeat_timeout_seconds)
        _end_at_once_or_raise()
    except checkpoints.CheckpointWriteError as e:
        # orbax's writer threads and tensorstore's callbacks of the failed save may still be
        # waiting or may complain as the interpreter shuts down (tracebacks, or a wait until
        # their timeout): the message is out, every earlier checkpoint is on disk and the
        # kernel releases the workdir's lock, so the process ends here.
        print(f'{process_tag()}error: {e}', file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    except Exception:
        _end_at_once_or_raise()
    if 'stopped_by' in results:  # every process says where it stopped
        print(
            f'{process_tag()}stopped by {results["stopped_by"]} at step {results["step"]}; '
            'checkpoint saved. Relaunch the same command to resume.',
            flush=True,
        )
        return
    workdir = paths.resolve(FLAGS.workdir)
    if lead:
        print(
            f'step {results["step"]}: test top-1 error {100 * results["eval_top1_error"]:.2f}%,'
            f' top-5 {100 * results["eval_top5_error"]:.2f}%, train loss '
            f'{results["train_loss"]:.4f}, {results["wall_seconds"]:.0f} s'
        )
        print(
            f'  checkpoints: {workdir / "checkpoints"}\n'
            f'  TensorBoard event files: {workdir} (tensorboard --logdir {workdir})\n'
            f'  curves: {workdir / "curves.png"}\n  results: {workdir / "results.json"}\n'
            f'  evaluate: resnet-jax evaluate --workdir={workdir} --protocol=ten_crop'
        )
        print(
            'Next: CIFAR-10 (downloads it once):\n'
            '  resnet-jax train --config=cifar10.py:resnet20 '
            '--workdir=workdirs/cifar10_resnet20\n'
            'ImageNet (prepare imagenet2012 in tfds manual_dir first, see README):\n'
            '  resnet-jax train --config=imagenet.py:resnet50 '
            '--workdir=workdirs/imagenet_resnet50'
        )


def define_evaluate() -> None:
    from resnet_jax.evaluation import protocols
    from resnet_jax.training import runs

    workdir_flag(None, 'The run (or converted weights) to evaluate.')
    flags.mark_flag_as_required('workdir')
    flags.DEFINE_multi_enum(
        'protocol',
        ['center'],
        protocols.PROTOCOLS,
        'The test protocol; repeat the flag for several (the run is loaded once).',
    )
    config_flag(
        None,
        "The config to evaluate with (default: the run's own config.json); "
        'a checkpoint of another network is refused.',
    )
    flags.DEFINE_string('data_dir', None, "The dataset's tfds data_dir (default: the config's).")
    flags.DEFINE_integer(
        'batch_size', 64, 'Images per batch (each of their views is run).', lower_bound=1
    )
    flags.DEFINE_integer('step', None, 'The checkpoint step (default: the latest good one).')
    flags.DEFINE_enum(
        'weights',
        'raw',
        runs.WEIGHTS,
        'The trained weights, or their moving average (runs with ema_decay > 0).',
    )
    multihost_flags()
    cache_flag()


def run_evaluate(argv: list[str]) -> None:
    """Evaluates a run with the paper's test protocols (center, 10-crop, multi-scale)
    over the whole eval split; each result is kept as ``eval_<protocol>.json`` in the
    workdir."""
    del argv
    config = validated(FLAGS.config) if FLAGS.config is not None else None
    joined('evaluation')

    import jax

    from resnet_jax import parallel, paths
    from resnet_jax.config import ConfigError
    from resnet_jax.data import prepare
    from resnet_jax.data.workers import InputError
    from resnet_jax.evaluation import protocols
    from resnet_jax.training import faults

    parallel.enable_compilation_cache(FLAGS.compilation_cache_dir)
    quiet()
    try:
        workdir = paths.resolve(FLAGS.workdir)
        if jax.process_index() == 0 and workdir.is_dir():  # where the result goes
            faults.check_writable(workdir, 'workdir')
        model, variables, config, step, pipeline = protocols.prepare_run(
            workdir,
            config,
            FLAGS.step,
            FLAGS.weights,
            FLAGS.data_dir,
            prepare.print_progress('preparing the dataset'),
        )
    except (ConfigError, ValueError, OSError) as e:
        fail(str(e).splitlines()[0])
    for protocol in dict.fromkeys(FLAGS.protocol):  # in the order given, each once
        try:
            result = protocols.evaluate_protocol(
                model,
                variables,
                pipeline,
                protocol,
                FLAGS.batch_size,
                execution_plan=config.execution,
            )
        except InputError as e:
            fail(str(e), code=1)
        record = {
            'protocol': protocol,
            'step': step,
            'weights': FLAGS.weights,
            'processes': jax.process_count(),
            'devices': jax.device_count(),
            **result,
        }
        if jax.process_index() == 0:  # one report, kept with the run
            print(
                f'{config.model.name} step {step} ({FLAGS.weights} weights), {protocol}: '
                f'top-1 error {100 * result["top1_error"]:.2f}%, top-5 error '
                f'{100 * result["top5_error"]:.2f}% on {result["num_images"]} images '
                f'({result["images_per_sec"]:.1f} images/s on {jax.device_count()} devices)'
            )
            suffix = '_ema' if FLAGS.weights == 'ema' else ''
            (workdir / f'eval_{protocol}{suffix}.json').write_text(json.dumps(record, indent=2))
            print(json.dumps(record))


def define_summary() -> None:
    model_flags()
    flags.DEFINE_integer(
        'image_size',
        None,
        'The input side (default: 224 for the ImageNet nets, 32 for the CIFAR nets).',
        lower_bound=1,
    )


def run_summary(argv: list[str]) -> None:
    """A Table-1-like view of a network: per stage its output size, blocks, parameters
    and multiply-adds."""
    del argv
    from resnet_jax import config as config_lib
    from resnet_jax.tools import summary

    config = with_model(FLAGS.config)
    name = config.model.name
    model = config_lib.model_from_config(config, 10 if name.startswith('cifar') else 1000)
    size = FLAGS.image_size or (32 if model.stem == 'cifar' else 224)
    try:
        print(summary.format_table(name, summary.summarize(model, size)))
    except ValueError as e:  # an input too small for the net
        fail(str(e))


def define_benchmark() -> None:
    model_flags()
    flags.DEFINE_integer('batch_size', 128, 'The global batch.', lower_bound=1)
    flags.DEFINE_integer(
        'image_size',
        None,
        'The input side (default: 224 for the ImageNet nets, 32 for the CIFAR nets).',
        lower_bound=1,
    )
    flags.DEFINE_integer('steps', 10, 'Timed steps (after 2 warm-up steps).', lower_bound=1)
    flags.DEFINE_bool('json', False, 'End with the figures as one JSON line.')
    cache_flag()
    FLAGS.set_default('compilation_cache_dir', '')  # a benchmark compiles unless told


def run_benchmark(argv: list[str]) -> None:
    """Train and eval images/s on synthetic data, the train step's compile time, peak
    host memory, and the achieved FLOP/s beside the device's matmul rate."""
    del argv
    config = with_model(FLAGS.config)
    from resnet_jax import config as config_lib
    from resnet_jax.backends import xla_options

    xla_options.configure(
        config_lib.model_from_config(config, 10).stage_sizes, config.execution
    )  # before JAX starts its backends
    from resnet_jax import parallel
    from resnet_jax.tools import benchmark

    parallel.enable_compilation_cache(FLAGS.compilation_cache_dir)
    try:
        r = benchmark.run(config, FLAGS.batch_size, FLAGS.image_size, FLAGS.steps)
    except config_lib.ConfigError as e:  # a batch the device cannot hold
        fail(str(e))
    print(benchmark.report(r))
    if FLAGS.json:
        print(json.dumps(r))


def define_prepare() -> None:
    flags.DEFINE_string(
        'dataset',
        None,
        'The dataset: imagenet2012 (or any tfds dataset '
        'built as ArrayRecord), or folder:/path/to/images.',
    )
    flags.mark_flag_as_required('dataset')
    flags.DEFINE_string('data_dir', None, "tfds' data_dir (default: ~/tensorflow_datasets).")
    flags.DEFINE_integer('image_size', 224, 'The crop side the mean image is for.', lower_bound=1)
    flags.DEFINE_integer(
        'max_images', None, 'Average this many training images at most.', lower_bound=1
    )
    flags.DEFINE_integer('num_workers', 0, 'Worker processes (0: one per core).', lower_bound=0)


def run_prepare(argv: list[str]) -> None:
    """Prepares a dataset once: the training set's mean image (a tfds dataset), or a
    folder's index and mean image."""
    del argv
    from resnet_jax.config import ConfigError
    from resnet_jax.data import folder, prepare
    from resnet_jax.data.workers import InputError

    progress = prepare.print_progress(f'reading {FLAGS.dataset}')
    try:
        prepare.check_dataset(
            FLAGS.dataset,
            FLAGS.data_dir,
            image_size=FLAGS.image_size,
            num_workers=FLAGS.num_workers,
            progress=progress,
        )
    except ConfigError as e:
        fail(str(e))
    except InputError as e:
        fail(str(e), code=1)
    if folder.is_folder(FLAGS.dataset):
        print('prepared', folder.store_dir(folder.folder_path(FLAGS.dataset)))
        return
    print(
        'wrote',
        prepare.compute_mean(
            FLAGS.dataset,
            FLAGS.data_dir,
            FLAGS.image_size,
            FLAGS.max_images,
            FLAGS.num_workers,
            progress,
        ),
    )


def define_plot() -> None:
    flags.DEFINE_string('output', 'curves.png', 'The figure to write.')


def run_plot(argv: list[str]) -> None:
    """Overlays the training curves of runs (``WORKDIR ...``) as the paper's Fig. 4 and 6:
    training error dashed, test error bold."""
    from resnet_jax import paths
    from resnet_jax.config import ConfigError
    from resnet_jax.training import curves

    try:
        workdirs = [paths.resolve(a) for a in argv[1:]]
    except ConfigError as e:
        fail(str(e))
    if not workdirs:
        fail('name the runs to plot: resnet-jax plot WORKDIR [WORKDIR ...]')
    histories = {}
    for workdir in workdirs:
        if not (workdir / 'history.json').exists():
            fail(f'{workdir} has no history.json (is it a finished run?)')
        histories[workdir.name] = curves.load_history(workdir)
    curves.plot_runs(histories, paths.resolve(FLAGS.output))
    print(f'wrote {FLAGS.output}')
