"""Launcher: ``python -m resnet_jax.main --config=configs/<file>.py[:<arg>] --workdir=<dir>``.

Any config field can be overridden: ``--config.batch_size=64 --config.model.shortcut=C``.
With no ``--config`` it trains the embedded default (``configs/default.py``).
"""

from __future__ import annotations

import os
import pathlib
import re
import sys

# TensorFlow only feeds the input pipeline: keep its start-up chatter off the console.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / 'configs' / 'default.py'

_FLAGS: dict = {}


def _define_flags() -> None:
    """Defines the flags. config_flags reads the config file and its ``--config.*``
    overrides from ``sys.argv`` right here, so bad input must be caught around this."""
    _FLAGS['config'] = config_flags.DEFINE_config_file(
        'config', str(_DEFAULT_CONFIG), 'Experiment config file (configs/*.py[:arg]).',
        lock_config=True)
    _FLAGS['workdir'] = flags.DEFINE_string(
        'workdir', 'workdirs/default', 'Directory for checkpoints, metrics, curves, results.')
    _FLAGS['coordinator'] = flags.DEFINE_string(
        'coordinator_address', None, 'host:port of process 0, for a multi-process run '
        '(clusters such as SLURM, Open MPI and TPU pods are detected without it).')
    _FLAGS['num_processes'] = flags.DEFINE_integer('num_processes', None,
                                                   'Processes in a multi-process run.')
    _FLAGS['process_id'] = flags.DEFINE_integer('process_id', None,
                                                'This process, in [0, num_processes).')
    _FLAGS['heartbeat'] = flags.DEFINE_integer(
        'heartbeat_timeout_seconds', 100, 'A process silent this long is declared dead and '
        'the others stop with an error instead of hanging.')
    _FLAGS['startup_timeout'] = flags.DEFINE_integer(
        'startup_timeout_seconds', 300, 'How long the processes of a multi-process run wait '
        'for each other to join; then each stops with one line naming the coordinator.')
    _FLAGS['resume_step'] = flags.DEFINE_integer(
        'resume_step', None, 'Resume from this checkpoint step instead of the latest (e.g. '
        'before a divergence); the later checkpoints are moved aside (kept), and the same '
        'command relaunched continues the resumed run.')
    _FLAGS['cache'] = flags.DEFINE_string(
        'compilation_cache_dir',
        os.environ.get('JAX_COMPILATION_CACHE_DIR') or os.path.expanduser(
            '~/.cache/resnet_jax/jax'),
        "JAX's persistent compilation cache, with the traced steps of single-process runs "
        "('' disables it; default: $JAX_COMPILATION_CACHE_DIR if set): relaunches skip "
        "tracing and compiling.")


def _fail(message: str) -> None:
    """One clear line and exit code 2: bad input never gets a traceback."""
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


_KINDS = {int: 'an integer', float: 'a number', bool: 'True or False', str: 'a string',
          tuple: 'a tuple, e.g. (1,2)'}


def _config_path(argv: list[str]) -> str:
    """The config file (without its ``:arg``) that ``argv`` names, or the default."""
    path = str(_DEFAULT_CONFIG)
    for i, arg in enumerate(argv):
        if arg.startswith('--config='):
            path = arg[len('--config='):]
        elif arg == '--config' and i + 1 < len(argv):
            path = argv[i + 1]
    return path.split(':')[0]


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
    path = _config_path(argv)
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
        if isinstance(e, flags.IllegalFlagValueError) and 'Unexpected None value' in text:
            return (f'config file {path}: get_config() returned None; it must return an '
                    'ml_collections.ConfigDict')
        if isinstance(e, flags.IllegalFlagValueError) and text.startswith('flag --') and \
                not text.startswith('flag --config'):
            return text[len('flag '):].splitlines()[0]
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


def _parse_flags(argv: list[str]) -> list[str]:
    path = _config_path(argv)
    if not os.path.isfile(path):
        _fail(f'cannot load config file {path}: it does not exist' if not os.path.exists(path)
              else f'cannot load config file {path}: it is not a file')
    logging.set_verbosity(logging.ERROR)  # config_flags' warnings: the error says it all
    try:
        _define_flags()
        rest = flags.FLAGS(argv)
        value = _FLAGS['config'].value  # a config file that failed to load raises here
    except Exception as e:  # noqa: BLE001 (a config file can raise anything)
        _fail(_one_line(e, argv))
    import ml_collections
    if not isinstance(value, ml_collections.ConfigDict):
        _fail(f'config file {_config_path(argv)}: get_config() returned a '
              f'{type(value).__name__}; it must return an ml_collections.ConfigDict')
    return rest


def _initialize_distributed() -> None:
    """Joins the processes of a multi-process run (explicit flags or a detected cluster)."""
    from resnet_jax import parallel
    parallel.initialize_distributed(_FLAGS['coordinator'].value, _FLAGS['num_processes'].value,
                                    _FLAGS['process_id'].value, _FLAGS['heartbeat'].value,
                                    _FLAGS['startup_timeout'].value)


def main(argv: list[str]) -> None:
    del argv
    from resnet_jax import config as config_lib
    from resnet_jax.config import ConfigError

    config, workdir = _FLAGS['config'].value, pathlib.Path(_FLAGS['workdir'].value)
    try:  # every field, before anything starts
        config_lib.validate(config)
    except ConfigError as e:
        _fail(str(e))
    resume_step = _FLAGS['resume_step'].value
    if resume_step is not None and resume_step < 0:
        _fail(f'--resume_step must be a checkpoint step (>= 0); got {resume_step}')

    import jax

    from resnet_jax import checkpointing, execution, faults, models, parallel, prepare, train
    faults.quiet_closed_loop_callbacks()

    # XLA's process options for the net, before JAX starts its backends.
    execution.configure_process(models.create_model(config.model.name), config.execution)
    try:
        _initialize_distributed()
    except Exception as e:  # jax raises RuntimeError / XlaRuntimeError / ValueError
        _fail(f'cannot join the multi-process run: {str(e).splitlines()[0]}')

    if _FLAGS['cache'].value:
        parallel.enable_compilation_cache(_FLAGS['cache'].value)
    # The libraries' chatter (orbax logs each failure it raises with its traceback): the
    # launcher prints results and errors itself.
    logging.set_verbosity(logging.FATAL)
    lead = jax.process_index() == 0
    try:
        results = train.train_and_evaluate(
            config, str(workdir), resume_step=resume_step,
            step_cache_dir=(parallel.step_cache_dir(_FLAGS['cache'].value)
                            if _FLAGS['cache'].value else None),
            prepare_progress=prepare.print_progress(f'preparing {config.dataset.name}')
            if lead else None)
    except ConfigError as e:
        _fail(str(e))
    except faults.NonFiniteLossError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(1)
    except checkpointing.CheckpointWriteError as e:
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
              f'  curves: {workdir / "curves.png"}\n  results: {workdir / "results.json"}')
        print('Next: CIFAR-10 (downloads it once):\n'
              '  python -m resnet_jax.main --config=configs/cifar10.py:resnet20 '
              '--workdir=workdirs/cifar10_resnet20\n'
              'ImageNet (prepare imagenet2012 in tfds manual_dir first, see README):\n'
              '  python -m resnet_jax.main --config=configs/imagenet.py:resnet50 '
              '--workdir=workdirs/imagenet_resnet50')


def run() -> None:
    """Console script ``resnet-jax``."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
    run()
