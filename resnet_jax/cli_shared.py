"""What the ``resnet-jax`` commands share: the flags defined once (``--config``, a shipped
config named by its file name from any folder; workdir; multi-process launch; compilation
cache; model), the one-line exit on bad input, joining a multi-process run."""

from __future__ import annotations

import importlib.util
import os
import sys

# TensorFlow only feeds the input pipelines: keep its start-up chatter off the console.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
# Bucket paths through fsspec (gcsfs, s3fs: the gcs and s3 extras) rather than TensorFlow's
# file system, which epath picks (once per process) where TensorFlow is installed: its
# import costs each launch ~10 s (a run never imports TensorFlow otherwise) and its GCS
# client has no endpoint setting (no emulator, no private endpoint). Without gcsfs,
# TensorFlow's as before; EPATH_USE_TF=1 keeps TensorFlow's.
if importlib.util.find_spec('gcsfs'):
    os.environ.setdefault('EPATH_USE_TF', 'false')

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS


def fail(message: str, code: int = 2) -> None:
    """One clear line and an exit code: bad input never gets a traceback. A process of a
    multi-process run ends at once: a normal exit would wait at JAX's shutdown barrier
    for peers that may be waiting on it in a collective; its end is seen by their
    heartbeat, and their watch reports it (``training.supervisor``)."""
    tag = process_tag()
    print(f'{tag}error: {message}', file=sys.stderr, flush=True)
    if tag:
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


def process_tag() -> str:
    """``[process N] `` in a multi-process run, whose processes' logs are read side by
    side (a pod's workers, Slurm's tasks); nothing otherwise."""
    jax = sys.modules.get('jax')  # not imported for a flag refused before the run starts
    if jax is None or not jax.distributed.is_initialized():
        return ''
    return f'[process {jax.process_index()}] '


def config_flag(default: str | None, help_text: str) -> None:
    config_flags.DEFINE_config_file('config', default, help_text, lock_config=True)


def config_path(argv: list[str]) -> str | None:
    """The config file (without its ``:arg``) that ``argv`` names, or None."""
    path = None
    for i, arg in enumerate(argv):
        if arg.startswith('--config='):
            path = arg[len('--config=') :]
        elif arg == '--config' and i + 1 < len(argv):
            path = argv[i + 1]
    return path.split(':')[0] if path is not None else None


def resolved_config(argv: list[str]) -> list[str]:
    """``argv`` with a shipped config named by its file name given as its path."""
    from resnet_jax import config as config_lib

    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith('--config='):
            out[i] = '--config=' + config_lib.resolve_config_path(arg[len('--config=') :])
        elif arg == '--config' and i + 1 < len(out):
            out[i + 1] = config_lib.resolve_config_path(out[i + 1])
    return out


def workdir_flag(default: str | None, help_text: str) -> None:
    flags.DEFINE_string('workdir', default, help_text)


def multihost_flags() -> None:
    flags.DEFINE_string(
        'coordinator_address',
        None,
        'host:port of process 0, for a '
        'multi-process run (SLURM, Open MPI and TPU pods are detected '
        'without it).',
    )
    flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
    flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')
    flags.DEFINE_integer(
        'heartbeat_timeout_seconds',
        100,
        'A process silent this long is declared dead, and the others stop with an error.',
    )
    flags.DEFINE_integer(
        'startup_timeout_seconds',
        300,
        'How long the processes wait for '
        'each other to join; then each stops with one line naming the '
        'coordinator.',
    )


def cache_flag() -> None:
    flags.DEFINE_string(
        'compilation_cache_dir',
        os.environ.get('JAX_COMPILATION_CACHE_DIR')
        or os.path.expanduser('~/.cache/resnet_jax/jax'),
        "JAX's persistent compilation cache: a relaunch loads its compiled programs ('' "
        'turns it off; default: $JAX_COMPILATION_CACHE_DIR if set).',
    )


def model_flags() -> None:
    """``--model`` (a name of ``models.list_models()``) and the model fields as
    ``--config.model.<field>=<value>`` over the embedded default config."""
    flags.DEFINE_string(
        'model',
        None,
        'The network: a name of resnet_jax.models.list_models() '
        '(cifar_resnetN / cifar_plainN for any N = 6n+2); default: the '
        "config's.",
    )
    config_flag(
        default_config(),
        'A config file whose model (and recipe) is used; its '
        'fields are set with --config.<field>=<value>, e.g. '
        '--config.model.dtype=bfloat16.',
    )


def default_config() -> str:
    from resnet_jax import config as config_lib

    return str(config_lib.shipped_configs_dir() / 'default.py')


def joined(what: str) -> None:
    """Joins a multi-process run named by the flags (or a detected cluster)."""
    from resnet_jax import parallel

    try:
        parallel.initialize_distributed(
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            FLAGS.heartbeat_timeout_seconds,
            FLAGS.startup_timeout_seconds,
        )
    except Exception as e:  # jax raises RuntimeError / XlaRuntimeError / ValueError
        fail(f'cannot join the multi-process {what}: {str(e).splitlines()[0]}')


def quiet() -> None:
    """The libraries' chatter off the console (orbax logs each failure it raises, with its
    traceback): the commands print results and errors themselves."""
    from resnet_jax.training import faults

    logging.set_verbosity(logging.FATAL)
    faults.quiet_closed_loop_callbacks()


def validated(config):
    from resnet_jax import config as config_lib
    from resnet_jax.config import ConfigError

    try:
        config_lib.validate(config)
    except ConfigError as e:
        fail(str(e))
    return config


def with_model(config):
    """``config`` with ``--model`` as its model's name, validated."""
    from resnet_jax import config as config_lib

    if FLAGS.model:
        config = config_lib.from_dict(config.to_dict())
        config.model.name = FLAGS.model
    return validated(config)
