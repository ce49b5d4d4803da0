"""The ``resnet-jax`` command: ``resnet-jax COMMAND [--flag=value ...]``.

    resnet-jax train --config=cifar10.py:resnet110 --workdir=workdirs/c10_r110
    resnet-jax evaluate --workdir=workdirs/c10_r110 --protocol=ten_crop
    resnet-jax convert --from=torchvision --input=r50.pth --model=resnet50 --output=workdirs/r50
    resnet-jax summary --model=resnet50
    resnet-jax benchmark --model=cifar_resnet56 --batch_size=128
    resnet-jax prepare --dataset=imagenet2012
    resnet-jax plot workdirs/c10_r20 workdirs/c10_r110 --output=fig6.png

``python -m resnet_jax COMMAND`` is the same, and ``python -m resnet_jax.main`` is
``train``. ``resnet-jax COMMAND --help`` lists a command's flags. One flag library (absl)
and one spelling (``--batch_size``) for all of them; ``--config`` (a config file, its
``:arg`` and any ``--config.<field>=<value>`` override) is read by ``ml_collections``'
``config_flags`` wherever a config is read; the flags of a multi-process launch and of
the compilation cache are defined once. A shipped config is named by its file name
(``cifar10.py:resnet110``) from any folder (``resnet_jax.config.resolve_config_path``).

Bad input (a flag, a config field or file, a workdir, a dataset) prints one line,
``error: ...``, and exits with code 2 before anything is written; a run that fails
(a divergence, a checkpoint that cannot be written) prints one line and exits with 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import sys
import textwrap
from typing import Callable

# TensorFlow only feeds the input pipelines: keep its start-up chatter off the console.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS


def _fail(message: str, code: int = 2) -> None:
    """One clear line and an exit code: bad input never gets a traceback."""
    print(f'error: {message}', file=sys.stderr, flush=True)
    sys.exit(code)


# --- flags shared by several commands, defined once ------------------------------------------

def _config_flag(default: str | None, help_text: str) -> None:
    config_flags.DEFINE_config_file('config', default, help_text, lock_config=True)


def _workdir_flag(default: str | None, help_text: str) -> None:
    flags.DEFINE_string('workdir', default, help_text)


def _multihost_flags() -> None:
    flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a '
                        'multi-process run (SLURM, Open MPI and TPU pods are detected '
                        'without it).')
    flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
    flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')
    flags.DEFINE_integer('heartbeat_timeout_seconds', 100, 'A process silent this long is '
                         'declared dead, and the others stop with an error.')
    flags.DEFINE_integer('startup_timeout_seconds', 300, 'How long the processes wait for '
                         'each other to join; then each stops with one line naming the '
                         'coordinator.')


def _cache_flag() -> None:
    flags.DEFINE_string(
        'compilation_cache_dir',
        os.environ.get('JAX_COMPILATION_CACHE_DIR') or os.path.expanduser(
            '~/.cache/resnet_jax/jax'),
        "JAX's persistent compilation cache: a relaunch loads its compiled programs ('' "
        'turns it off; default: $JAX_COMPILATION_CACHE_DIR if set).')


def _model_flags() -> None:
    """``--model`` (a name of ``models.list_models()``) and the model fields as
    ``--config.model.<field>=<value>`` over the embedded default config."""
    flags.DEFINE_string('model', None, 'The network: a name of resnet_jax.models.list_models() '
                        '(cifar_resnetN / cifar_plainN for any N = 6n+2); default: the '
                        "config's.")
    _config_flag(_default_config(), 'A config file whose model (and recipe) is used; its '
                 'fields are set with --config.<field>=<value>, e.g. '
                 '--config.model.dtype=bfloat16.')


def _default_config() -> str:
    from resnet_jax import config as config_lib
    return str(config_lib.shipped_configs_dir() / 'default.py')


def _joined(what: str) -> None:
    """Joins a multi-process run named by the flags (or a detected cluster)."""
    from resnet_jax import parallel
    try:
        parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id, FLAGS.heartbeat_timeout_seconds,
                                        FLAGS.startup_timeout_seconds)
    except Exception as e:  # jax raises RuntimeError / XlaRuntimeError / ValueError
        _fail(f'cannot join the multi-process {what}: {str(e).splitlines()[0]}')


def _quiet() -> None:
    """The libraries' chatter off the console (orbax logs each failure it raises, with its
    traceback): the commands print results and errors themselves."""
    from resnet_jax.training import faults
    logging.set_verbosity(logging.FATAL)
    faults.quiet_closed_loop_callbacks()


def _validated(config):
    from resnet_jax import config as config_lib
    from resnet_jax.config import ConfigError
    try:
        config_lib.validate(config)
    except ConfigError as e:
        _fail(str(e))
    return config


def _with_model(config):
    """``config`` with ``--model`` as its model's name, validated."""
    from resnet_jax import config as config_lib
    if FLAGS.model:
        config = config_lib.from_dict(config.to_dict())
        config.model.name = FLAGS.model
    return _validated(config)


# --- the commands ------------------------------------------------------------------------------

def _define_train() -> None:
    _config_flag(_default_config(), 'The experiment: a config file, '
                 'path/to/file.py[:arg] or a shipped one by name (cifar10.py:resnet110, '
                 'imagenet.py:resnet50); any field is set with --config.<field>=<value>. '
                 'Default: the embedded default (cifar_resnet20 on the digits).')
    _workdir_flag('workdirs/default', 'Directory for checkpoints, metrics, curves, results; '
                  'the same command again resumes.')
    flags.DEFINE_integer('resume_step', None, 'Resume from this checkpoint step instead of '
                         'the latest (e.g. before a divergence); the later checkpoints are '
                         'moved aside (kept), and the same command again continues the '
                         'resumed run.')
    _multihost_flags()
    _cache_flag()


def _train(argv: list[str]) -> None:
    """Trains the config's network with the paper's recipe (sec. 3.4, 4.2), resuming from
    the workdir's latest checkpoint."""
    del argv
    config = _validated(FLAGS.config)
    if FLAGS.resume_step is not None and FLAGS.resume_step < 0:
        _fail(f'--resume_step must be a checkpoint step (>= 0); got {FLAGS.resume_step}')
    workdir = pathlib.Path(FLAGS.workdir)

    from resnet_jax import config as config_lib
    from resnet_jax.backends import xla_options

    # XLA's process options for the net, before JAX starts its backends.
    xla_options.configure(config_lib.model_from_config(config, 10).stage_sizes,
                          config.execution)
    _joined('run')

    import jax

    from resnet_jax import parallel
    from resnet_jax.config import ConfigError
    from resnet_jax.data import prepare
    from resnet_jax.training import checkpoints, faults, loop

    if FLAGS.compilation_cache_dir:
        parallel.enable_compilation_cache(FLAGS.compilation_cache_dir)
    _quiet()
    lead = jax.process_index() == 0
    try:
        results = loop.train_and_evaluate(
            config, str(workdir), resume_step=FLAGS.resume_step,
            prepare_progress=prepare.print_progress(f'preparing {config.dataset.name}')
            if lead else None)
    except ConfigError as e:
        _fail(str(e))
    except faults.NonFiniteLossError as e:
        _fail(str(e), code=1)
    except checkpoints.CheckpointWriteError as e:
        # orbax's writer threads and tensorstore's callbacks of the failed save may still be
        # waiting or may complain as the interpreter shuts down (tracebacks, or a wait until
        # their timeout): the message is out, every earlier checkpoint is on disk and the
        # kernel releases the workdir's lock, so the process ends here.
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    if 'stopped_by' in results:  # every process says where it stopped
        who = f'[process {jax.process_index()}] ' if jax.process_index() else ''
        print(f"{who}stopped by {results['stopped_by']} at step {results['step']}; checkpoint "
              'saved. Relaunch the same command to resume.', flush=True)
        return
    if lead:
        print(f"step {results['step']}: test top-1 error {100 * results['eval_top1_error']:.2f}%,"
              f" top-5 {100 * results['eval_top5_error']:.2f}%, train loss "
              f"{results['train_loss']:.4f}, {results['wall_seconds']:.0f} s")
        print(f'  checkpoints: {workdir / "checkpoints"}\n'
              f'  TensorBoard event files: {workdir} (tensorboard --logdir {workdir})\n'
              f'  curves: {workdir / "curves.png"}\n  results: {workdir / "results.json"}\n'
              f'  evaluate: resnet-jax evaluate --workdir={workdir} --protocol=ten_crop')
        print('Next: CIFAR-10 (downloads it once):\n'
              '  resnet-jax train --config=cifar10.py:resnet20 '
              '--workdir=workdirs/cifar10_resnet20\n'
              'ImageNet (prepare imagenet2012 in tfds manual_dir first, see README):\n'
              '  resnet-jax train --config=imagenet.py:resnet50 '
              '--workdir=workdirs/imagenet_resnet50')


def _define_evaluate() -> None:
    from resnet_jax.evaluation import protocols
    from resnet_jax.training import checkpoints
    _workdir_flag(None, 'The run (or converted weights) to evaluate.')
    flags.mark_flag_as_required('workdir')
    flags.DEFINE_enum('protocol', 'center', protocols.PROTOCOLS, 'The test protocol.')
    _config_flag(None, "The config to evaluate with (default: the run's own config.json); "
                 'a checkpoint of another network is refused.')
    flags.DEFINE_string('data_dir', None, "The dataset's tfds data_dir (default: the "
                        "config's).")
    flags.DEFINE_integer('batch_size', 64, 'Images per batch (each of their views is run).',
                         lower_bound=1)
    flags.DEFINE_integer('step', None, 'The checkpoint step (default: the latest good one).')
    flags.DEFINE_enum('weights', 'raw', checkpoints.WEIGHTS, 'The trained weights, or their '
                      'moving average (runs with ema_decay > 0).')
    _multihost_flags()
    _cache_flag()


def _evaluate(argv: list[str]) -> None:
    """Evaluates a run with one of the paper's test protocols (center, 10-crop,
    multi-scale) over the whole eval split; the result is kept as
    ``eval_<protocol>.json`` in the workdir."""
    del argv
    config = _validated(FLAGS.config) if FLAGS.config is not None else None
    _joined('evaluation')

    import jax

    from resnet_jax import parallel
    from resnet_jax.config import ConfigError
    from resnet_jax.data import prepare
    from resnet_jax.evaluation import protocols
    from resnet_jax.training import faults

    if FLAGS.compilation_cache_dir:
        parallel.enable_compilation_cache(FLAGS.compilation_cache_dir)
    _quiet()
    workdir = pathlib.Path(FLAGS.workdir)
    try:
        if jax.process_index() == 0 and workdir.is_dir():  # where the result goes
            faults.check_writable(workdir, 'workdir')
        model, variables, config, step, pipeline = protocols.prepare_run(
            workdir, config, FLAGS.step, FLAGS.weights, FLAGS.data_dir,
            prepare.print_progress('preparing the dataset'))
    except (ConfigError, ValueError, OSError) as e:
        _fail(str(e).splitlines()[0])
    result = protocols.evaluate_protocol(model, variables, pipeline, FLAGS.protocol,
                                         FLAGS.batch_size, execution_plan=config.execution)
    record = {'protocol': FLAGS.protocol, 'step': step, 'weights': FLAGS.weights,
              'processes': jax.process_count(), 'devices': jax.device_count(), **result}
    if jax.process_index() == 0:  # one report, kept with the run
        print(f'{config.model.name} step {step} ({FLAGS.weights} weights), {FLAGS.protocol}: '
              f'top-1 error {100 * result["top1_error"]:.2f}%, top-5 error '
              f'{100 * result["top5_error"]:.2f}% on {result["num_images"]} images '
              f'({result["images_per_sec"]:.1f} images/s on {jax.device_count()} devices)')
        suffix = '_ema' if FLAGS.weights == 'ema' else ''
        (workdir / f'eval_{FLAGS.protocol}{suffix}.json').write_text(
            json.dumps(record, indent=2))
        print(json.dumps(record))


def _define_convert() -> None:
    from resnet_jax.tools import convert
    flags.DEFINE_enum('from', 'auto', ['auto', *convert.SOURCES],
                      'Where the weights come from; auto tells by the file: .h5/.keras '
                      '(Keras), a folder with config.json (transformers), a .safetensors/.pth/'
                      '.pt/.bin file by its names (torchvision and timm share them).')
    flags.DEFINE_string('input', None, 'The weights: a .safetensors/.pth/.pt/.bin state dict '
                        '(torchvision, timm), a transformers save_pretrained folder, an .h5 or '
                        '.keras model (Keras).')
    flags.DEFINE_enum('model', None, list(convert.IMAGENET_DEPTHS), 'The network (default: '
                      'inferred from the weights; when given, checked against them).')
    flags.DEFINE_string('output', None, 'The workdir to write (evaluate and '
                        '--config.init_from read it); with --to, the file to write '
                        '(.safetensors or .pth).')
    flags.DEFINE_enum('to', None, ['torchvision'], "The other direction: a workdir's latest "
                      "weights as torchvision's state dict (needs --workdir and --output); "
                      'a network torchvision does not compute is refused.')
    _workdir_flag(None, 'With --to: the run (or converted weights) to write out; its '
                  'config.json says which network it is.')
    flags.mark_flag_as_required('output')


def _convert(argv: list[str]) -> None:
    """Converts torchvision, timm, Hugging Face transformers or Keras ResNet weights into a
    workdir of this library, or (--to=torchvision) a workdir's weights into a state dict
    torchvision's resnets load strictly."""
    del argv
    import warnings
    if FLAGS.to:
        _convert_to_torchvision()
        return
    if FLAGS.workdir is not None:
        _fail('--workdir is read with --to=torchvision; converting into this library, '
              '--output names the workdir to write')
    if FLAGS.input is None:
        _fail('--input is required (or --to=torchvision --workdir=W to convert the other way)')
    if not os.path.exists(FLAGS.input):
        _fail(f'{FLAGS.input} does not exist')
    if os.path.exists(FLAGS.output) and (not os.path.isdir(FLAGS.output)
                                         or os.listdir(FLAGS.output)):
        _fail(f'--output={FLAGS.output} exists and is not an empty folder; converted weights '
              'go into a new workdir')
    from resnet_jax.tools import convert
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always', UserWarning)
            model, variables, source = convert.load_weights(FLAGS.input, FLAGS.model,
                                                            kind=FLAGS['from'].value)
        for warning in caught:  # a stripped prefix: one line each
            if issubclass(warning.category, UserWarning):
                print(f'warning: {warning.message}', file=sys.stderr, flush=True)
        _quiet()
        out = convert.save_converted(model, variables, FLAGS.model, source, FLAGS.output)
    except (ValueError, TypeError, ImportError, OSError) as e:
        _fail(str(e).splitlines()[0])
    print(f'wrote {out} ({convert.table1_name(model)} from {source}, preprocessing '
          f'{convert.PREPROCESSING[source]}); evaluate with: resnet-jax evaluate '
          f'--workdir={out} --protocol=ten_crop')


def _convert_to_torchvision() -> None:
    """``--to=torchvision``: the workdir's network checked, then its latest good
    checkpoint written as a torchvision state dict (nothing is written when refused)."""
    if FLAGS['from'].present or FLAGS.input is not None:
        _fail('--to=torchvision reads --workdir; --from and --input are for converting '
              'into this library')
    if FLAGS.workdir is None:
        _fail('--to=torchvision needs --workdir (the run to write out)')
    output = pathlib.Path(FLAGS.output)
    if output.suffix not in ('.safetensors', '.pth', '.pt'):
        _fail(f'--output={output}: write a .safetensors, .pth or .pt file')
    if output.exists():
        _fail(f'--output={output} exists; name a new file')
    if not os.path.isdir(FLAGS.workdir):
        _fail(f'{FLAGS.workdir} does not exist' if not os.path.exists(FLAGS.workdir)
              else f'{FLAGS.workdir} is not a folder')
    if output.suffix != '.safetensors':
        try:  # before anything imports TensorFlow (the other order can crash the process)
            import torch  # noqa: F401
        except ImportError:
            _fail(f"writing {output.name} needs torch: pip install 'resnet_jax[interop]' "
                  '(a .safetensors file needs no torch)')
    from resnet_jax.tools import convert
    from resnet_jax.training import checkpoints
    _quiet()
    try:
        model = convert.check_torchvision(FLAGS.workdir)  # before reading any weights
        variables, step = checkpoints.load_variables(FLAGS.workdir)
        convert.to_torchvision(variables, FLAGS.workdir, path=output)
    except (ValueError, TypeError, ImportError, OSError) as e:
        _fail(str(e).splitlines()[0])
    name = convert.table1_name(model)
    print(f'wrote {output} ({name}, step {step} of {FLAGS.workdir}); load with: '
          f'torchvision.models.{name}().load_state_dict(state_dict, strict=True)')


def _define_summary() -> None:
    _model_flags()
    flags.DEFINE_integer('image_size', None, 'The input side (default: 224 for the ImageNet '
                         'nets, 32 for the CIFAR nets).', lower_bound=1)


def _summary(argv: list[str]) -> None:
    """A Table-1-like view of a network: per stage its output size, blocks, parameters
    and multiply-adds."""
    del argv
    from resnet_jax import config as config_lib
    from resnet_jax.tools import summary
    config = _with_model(FLAGS.config)
    name = config.model.name
    model = config_lib.model_from_config(config, 10 if name.startswith('cifar') else 1000)
    size = FLAGS.image_size or (32 if model.stem == 'cifar' else 224)
    try:
        print(summary.format_table(name, summary.summarize(model, size)))
    except ValueError as e:  # an input too small for the net
        _fail(str(e))


def _define_benchmark() -> None:
    _model_flags()
    flags.DEFINE_integer('batch_size', 128, 'The global batch.', lower_bound=1)
    flags.DEFINE_integer('image_size', None, 'The input side (default: 224 for the ImageNet '
                         'nets, 32 for the CIFAR nets).', lower_bound=1)
    flags.DEFINE_integer('steps', 10, 'Timed steps (after 2 warm-up steps).', lower_bound=1)
    flags.DEFINE_bool('json', False, 'End with the figures as one JSON line.')
    _cache_flag()
    FLAGS.set_default('compilation_cache_dir', '')  # a benchmark compiles unless told


def _benchmark(argv: list[str]) -> None:
    """Train and eval images/s on synthetic data, the train step's compile time, peak
    host memory, and the achieved FLOP/s beside the device's matmul rate."""
    del argv
    config = _with_model(FLAGS.config)
    from resnet_jax import config as config_lib
    from resnet_jax.backends import xla_options
    xla_options.configure(config_lib.model_from_config(config, 10).stage_sizes,
                          config.execution)  # before JAX starts its backends
    from resnet_jax import parallel
    from resnet_jax.tools import benchmark
    if FLAGS.compilation_cache_dir:
        parallel.enable_compilation_cache(FLAGS.compilation_cache_dir)
    r = benchmark.run(config, FLAGS.batch_size, FLAGS.image_size, FLAGS.steps)
    print(benchmark.report(r))
    if FLAGS.json:
        print(json.dumps(r))


def _define_prepare() -> None:
    flags.DEFINE_string('dataset', None, 'The dataset: imagenet2012 (or any tfds dataset '
                        'built as ArrayRecord), or folder:/path/to/images.')
    flags.mark_flag_as_required('dataset')
    flags.DEFINE_string('data_dir', None, "tfds' data_dir (default: ~/tensorflow_datasets).")
    flags.DEFINE_integer('image_size', 224, 'The crop side the mean image is for.',
                         lower_bound=1)
    flags.DEFINE_integer('max_images', None, 'Average this many training images at most.',
                         lower_bound=1)
    flags.DEFINE_integer('num_workers', 0, 'Worker processes (0: one per core).',
                         lower_bound=0)


def _prepare(argv: list[str]) -> None:
    """Prepares a dataset once: the training set's mean image (a tfds dataset), or a
    folder's index and mean image."""
    del argv
    from resnet_jax.config import ConfigError
    from resnet_jax.data import folder, prepare
    progress = prepare.print_progress(f'reading {FLAGS.dataset}')
    try:
        prepare.check_dataset(FLAGS.dataset, FLAGS.data_dir, image_size=FLAGS.image_size,
                              num_workers=FLAGS.num_workers, progress=progress)
    except ConfigError as e:
        _fail(str(e))
    if folder.is_folder(FLAGS.dataset):
        print('prepared', folder.store_dir(folder.folder_path(FLAGS.dataset)))
        return
    print('wrote', prepare.compute_mean(FLAGS.dataset, FLAGS.data_dir, FLAGS.image_size,
                                        FLAGS.max_images, FLAGS.num_workers, progress))


def _define_plot() -> None:
    flags.DEFINE_string('output', 'curves.png', 'The figure to write.')


def _plot(argv: list[str]) -> None:
    """Overlays the training curves of runs (``WORKDIR ...``) as the paper's Fig. 4 and 6:
    training error dashed, test error bold."""
    from resnet_jax.training import curves
    workdirs = [pathlib.Path(a) for a in argv[1:]]
    if not workdirs:
        _fail('name the runs to plot: resnet-jax plot WORKDIR [WORKDIR ...]')
    histories = {}
    for workdir in workdirs:
        if not (workdir / 'history.json').exists():
            _fail(f'{workdir} has no history.json (is it a finished run?)')
        histories[workdir.name] = curves.load_history(workdir)
    curves.plot_runs(histories, FLAGS.output)
    print(f'wrote {FLAGS.output}')


@dataclasses.dataclass(frozen=True)
class Command:
    summary: str  # one line for the list of commands
    define: Callable[[], None]
    run: Callable[[list[str]], None]
    positional: str = ''  # what positional arguments it takes ('' : none)


COMMANDS = {
    'train': Command('train a config (resuming its workdir)', _define_train, _train),
    'evaluate': Command("a run's test error by a protocol of the paper", _define_evaluate,
                        _evaluate),
    'convert': Command('weights from torchvision, timm, transformers or Keras into a '
                       'workdir, or out to torchvision', _define_convert,
                       _convert),
    'summary': Command('a Table-1-like view of a network', _define_summary, _summary),
    'benchmark': Command('images/s, compile time and FLOP/s on synthetic data',
                         _define_benchmark, _benchmark),
    'prepare': Command("a dataset's mean image, or a folder's index", _define_prepare,
                       _prepare),
    'plot': Command("runs' training curves in one figure (Fig. 4 and 6)", _define_plot, _plot,
                    positional='WORKDIR [WORKDIR ...]'),
}


# --- parsing -------------------------------------------------------------------------------------

_KINDS = {int: 'an integer', float: 'a number', bool: 'True or False', str: 'a string',
          tuple: 'a tuple, e.g. (1,2)'}


def _config_path(argv: list[str]) -> str | None:
    """The config file (without its ``:arg``) that ``argv`` names, or None."""
    path = None
    for i, arg in enumerate(argv):
        if arg.startswith('--config='):
            path = arg[len('--config='):]
        elif arg == '--config' and i + 1 < len(argv):
            path = argv[i + 1]
    return path.split(':')[0] if path is not None else None


def _resolved(argv: list[str]) -> list[str]:
    """``argv`` with a shipped config named by its file name given as its path."""
    from resnet_jax import config as config_lib
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith('--config='):
            out[i] = '--config=' + config_lib.resolve_config_path(arg[len('--config='):])
        elif arg == '--config' and i + 1 < len(out):
            out[i + 1] = config_lib.resolve_config_path(out[i + 1])
    return out


def _field_kind(name: str) -> str:
    from resnet_jax import config as config_lib
    default = config_lib.flatten(config_lib.base_config()).get(name)
    return _KINDS.get(type(default), 'a value of its type')


def _one_line(error: BaseException, argv: list[str]) -> str:
    """The informative line of a flag or config error (config_flags nests several)."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    path = _config_path(argv) or 'the default config'
    for e in chain:
        if isinstance(e, flags.UnrecognizedFlagError):
            name = e.flagname
            return (f"unknown config field '{name[len('config.'):]}' (every field: "
                    'resnet_jax/config.py)' if name.startswith('config.')
                    else f'unknown flag --{name} (see --help)')
    for e in chain:
        text = str(e)
        field = re.match(r'flag --config\.([\w.]+)=(.*?): ', text)
        if field:
            return (f'{field.group(1)} must be {_field_kind(field.group(1))}; got '
                    f'{field.group(2)!r}')
        required = re.search(r'Flag --(\w+) must have a value other than None', text)
        if required:
            return f'--{required.group(1)} is required (see --help)'
        if isinstance(e, flags.IllegalFlagValueError) and 'Unexpected None value' in text:
            return (f'config file {path}: get_config() returned None; it must return an '
                    'ml_collections.ConfigDict')
        if isinstance(e, flags.Error) and not text.startswith('flag --config'):
            return text[len('flag '):].splitlines()[0] if text.startswith('flag ') else \
                text.splitlines()[0]
    first = chain[-1]
    lines = [line.strip() for line in str(first).splitlines() if line.strip()]
    if isinstance(first, (KeyError, AttributeError)) and 'get_config' not in str(first):
        name = str(first).strip('"\'')
        given = [a.split('=')[0][len('--config.'):] for a in argv if a.startswith('--config.')
                 and a.split('=')[0].split('.')[-1] == name]
        if given:
            return f"unknown config field '{given[0]}' (every field: resnet_jax/config.py)"
    if isinstance(first, AttributeError) and 'get_config' in str(first):
        return f'cannot load config file {path}: it has no get_config()'
    return (f'cannot load config file {path}: {type(first).__name__}: '
            f'{lines[0] if lines else ""}').rstrip(': ')


def _parse(command: Command, argv: list[str]) -> list[str]:
    """Parses ``argv`` (the program and the command's flags) into the flags; one line and
    exit code 2 for anything that does not parse."""
    path = _config_path(argv)
    if path is not None and not os.path.isfile(path):
        _fail(f'cannot load config file {path}: it does not exist' if not os.path.exists(path)
              else f'cannot load config file {path}: it is not a file')
    logging.set_verbosity(logging.ERROR)  # config_flags' warnings: the error says it all
    try:
        rest = FLAGS(argv)
        value = FLAGS['config'].value if 'config' in FLAGS else None
    except Exception as e:  # noqa: BLE001 (a config file can raise anything)
        _fail(_one_line(e, argv))
    import ml_collections
    if (value is not None or path is not None) and not isinstance(
            value, ml_collections.ConfigDict):
        _fail(f'config file {path}: get_config() returned '
              f'{"None" if value is None else "a " + type(value).__name__}; it must return an '
              'ml_collections.ConfigDict')
    if len(rest) > 1 and not command.positional:
        _fail(f'unexpected argument {rest[1]!r} (flags are --name=value; see --help)')
    return rest


def _help(name: str, command: Command) -> str:
    """The command's description and its flags."""
    doc = ' '.join(' '.join(command.run.__doc__.split('\n\n')[0].split()).split())
    lines = [f'usage: resnet-jax {name} [--flag=value ...]'
             f'{" " + command.positional if command.positional else ""}', '',
             textwrap.fill(doc, 88), '', 'flags:']
    entries = [(f'--{f.name}',
                f'{f.help}{"" if f.default is None else f" (default: {f.default_as_str})"}')
               for f in sorted(FLAGS.get_flags_for_module(__name__), key=lambda f: f.name)]
    if any(f.name == 'config' for f in FLAGS.get_flags_for_module(__name__)):
        entries.append(('--config.<field>=<value>', 'any field of the config (every one is '
                        'documented in resnet_jax/config.py)'))
    for flag, text in entries:
        lines.append(f'  {flag}')
        lines.append(textwrap.fill(text, 88, initial_indent=' ' * 6, subsequent_indent=' ' * 6))
    return '\n'.join(lines)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = [f'  {name:<{width}}  {c.summary}' for name, c in COMMANDS.items()]
    return '\n'.join(['usage: resnet-jax COMMAND [--flag=value ...]', '', 'commands:', *rows,
                      '', "'resnet-jax COMMAND --help' lists a command's flags."])


def main(argv: list[str] | None = None) -> None:
    """``resnet-jax COMMAND ...`` (``argv``: the whole command line, sys.argv's form)."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ('-h', '--help', 'help'):
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    name = argv[1]
    command = COMMANDS.get(name)
    if command is None:
        _fail(f'unknown command {name!r}; commands: {", ".join(COMMANDS)}')
    # config_flags reads the command line (sys.argv) when its flag is defined, to define the
    # --config.<field> overrides: the command's own line, a shipped config named as a path.
    sys.argv = [f'resnet-jax {name}', *_resolved(argv[2:])]
    try:
        command.define()
    except Exception as e:  # noqa: BLE001 (a config file can raise anything)
        _fail(_one_line(e, sys.argv))
    if any(a in ('-h', '--help', '--helpfull', '-?') for a in argv[2:]):
        print(_help(name, command))
        sys.exit(0)
    app.run(command.run, argv=list(sys.argv), flags_parser=lambda args: _parse(command, args))


def run() -> None:
    """The console script ``resnet-jax``."""
    main()
