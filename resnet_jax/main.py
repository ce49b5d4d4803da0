"""Launcher: ``python -m resnet_jax.main --config=configs/<file>.py[:<arg>] --workdir=<dir>``.

Any config field can be overridden: ``--config.batch_size=64 --config.model.shortcut=C``.
With no ``--config`` it trains the embedded default (``configs/default.py``).
"""

from __future__ import annotations

import os
import pathlib
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


def _one_line(error: BaseException) -> str:
    """The informative line of a flag/config error (config_flags nests several)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, IOError) and 'Failed loading config file' in str(error):
        missing = [line for line in lines if line.startswith('/') or 'No such file' in line]
        return f'cannot load config file: {missing[-1] if missing else lines[-1]}'
    if isinstance(error, (KeyError, AttributeError)):
        name = str(error).strip('"\'')
        given = [a.split('=')[0][2:] for a in sys.argv if a.startswith('--config.')
                 and a.split('=')[0].endswith('.' + name)]
        return f'unknown config field {given[0] if given else name!r}'
    return lines[0] if lines else repr(error)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        _define_flags()
        rest = flags.FLAGS(argv)
        _FLAGS['config'].value.to_dict()  # a config file that failed to load raises here
        return rest
    except (flags.Error, IOError, AttributeError, KeyError, ValueError, TypeError) as e:
        while isinstance(e, flags.Error) or 'Error whilst parsing' in str(e):
            if not (e.__cause__ or e.__context__):
                break
            e = e.__cause__ or e.__context__
        _fail(_one_line(e))


def _initialize_distributed() -> None:
    """Joins the processes of a multi-process run (explicit flags or a detected cluster)."""
    from resnet_jax import parallel
    parallel.initialize_distributed(_FLAGS['coordinator'].value, _FLAGS['num_processes'].value,
                                    _FLAGS['process_id'].value, _FLAGS['heartbeat'].value)


def main(argv: list[str]) -> None:
    del argv
    import jax

    from resnet_jax import execution, faults, models, parallel, prepare, train
    from resnet_jax.config import ConfigError

    try:  # XLA's process options for the net, before JAX starts its backends
        execution.configure_process(models.create_model(_FLAGS['config'].value.model.name),
                                    _FLAGS['config'].value.execution)
    except ValueError:  # an unknown net or plan: validate_config says which below
        pass
    try:
        _initialize_distributed()
    except Exception as e:  # jax raises RuntimeError / XlaRuntimeError / ValueError
        _fail(f'cannot join the multi-process run: {str(e).splitlines()[0]}')

    if _FLAGS['cache'].value:
        parallel.enable_compilation_cache(_FLAGS['cache'].value)
    logging.set_verbosity(logging.ERROR)  # the libraries' chatter; results are printed
    config, workdir = _FLAGS['config'].value, pathlib.Path(_FLAGS['workdir'].value)
    try:
        train.validate_config(config, jax.device_count(), progress=prepare.print_progress(
            f'preparing {config.dataset.name}') if jax.process_index() == 0 else None)
    except ConfigError as e:
        _fail(str(e))
    if jax.process_index() == 0:
        print(f'training {config.model.name} on {config.dataset.name} for '
              f'{config.num_train_steps} steps on {jax.device_count()} device(s) '
              f'({jax.default_backend()}); workdir {workdir}', flush=True)
    try:
        results = train.train_and_evaluate(config, str(workdir), step_cache_dir=(
            parallel.step_cache_dir(_FLAGS['cache'].value) if _FLAGS['cache'].value else None))
    except ConfigError as e:
        _fail(str(e))
    except faults.NonFiniteLossError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
    if 'stopped_by' in results:  # every process says where it stopped
        who = f'[process {jax.process_index()}] ' if jax.process_index() else ''
        print(f"{who}stopped by {results['stopped_by']} at step {results['step']}; checkpoint "
              'saved. Relaunch the same command to resume.', flush=True)
        return
    if jax.process_index() == 0:
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
