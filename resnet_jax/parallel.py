"""Data parallelism over one 1-D mesh of every device of every process (batches split along
``'data'``, the state replicated), and the compilation cache."""

import os
import sys
import threading
from collections.abc import Callable

import jax
import numpy as np
from clu import metrics
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def cluster_launch() -> str | None:
    """The kind of multi-process launch this process is part of, if any."""
    if os.environ.get('JAX_COORDINATOR_ADDRESS'):
        return 'JAX_COORDINATOR_ADDRESS'
    if int(os.environ.get('SLURM_NTASKS', '1') or 1) > 1:
        return 'SLURM'
    if int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
        return 'Open MPI'
    if ',' in os.environ.get('TPU_WORKER_HOSTNAMES', ''):
        return 'TPU pod'
    return None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_seconds: int = 100,
    startup_timeout_seconds: int = 300,
    on_timeout: Callable[[str], None] | None = None,
) -> None:
    """Joins the processes of a multi-process run: given a coordinator, or in a detected
    cluster (SLURM, Open MPI, TPU pods); nothing for a single process. If not all join in
    ``startup_timeout_seconds``, a watchdog calls ``on_timeout(message)`` (default: one line
    naming this process on stderr, exit code 2) before JAX's client aborts with a C++ stack
    trace. ValueError for flags that cannot make a run."""
    cluster = cluster_launch()
    if coordinator_address is None and cluster is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError(
                f'--num_processes={num_processes} needs --coordinator_address '
                '(host:port of process 0) outside SLURM, Open MPI or a TPU pod'
            )
        return
    if num_processes is not None and num_processes < 1:
        raise ValueError(f'--num_processes must be positive; got {num_processes}')
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f'--process_id={process_id} is not in [0, {num_processes})')
    if startup_timeout_seconds < 1 or heartbeat_timeout_seconds < 1:
        raise ValueError(
            '--startup_timeout_seconds and --heartbeat_timeout_seconds must be positive'
        )
    where = coordinator_address or f'the coordinator of the {cluster} launch'
    if process_id:
        message = (
            f'no answer within {startup_timeout_seconds} s from {where} (process 0): '
            'is it running and reachable? (--startup_timeout_seconds)'
        )
    else:
        others = f'the other {num_processes - 1}' if num_processes else 'the other'
        message = (
            f'{others} process(es) did not join {where} within '
            f'{startup_timeout_seconds} s (--startup_timeout_seconds)'
        )
    tag = f'[process {process_id}] ' if process_id is not None else ''
    on_timeout = on_timeout or (
        lambda m: _exit_with(f'{tag}error: cannot join the multi-process run: {m}')
    )
    watchdog = threading.Timer(startup_timeout_seconds, on_timeout, (message,))
    watchdog.daemon = True
    # CPU processes exchange gradients over gloo (this setting only concerns the CPU backend).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    watchdog.start()
    try:
        # JAX's own deadline a little later: the watchdog reports first.
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=startup_timeout_seconds + 30,
            heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        )
    finally:
        watchdog.cancel()


def _exit_with(message: str) -> None:
    """One line on stderr and exit code 2, from any thread (the main one is inside JAX)."""
    sys.stderr.write(f'{message}\n')
    sys.stderr.flush()
    os._exit(2)


def enable_compilation_cache(path: str, min_compile_seconds: float = 0.0) -> None:
    """JAX's persistent compilation cache in ``path`` ('': as JAX's settings say), every
    program kept by default: the ~120 small ones of a CIFAR ResNet's op-by-op init are most
    of a first launch's start-up (``experiments/results/performance.md``). Off for a
    multi-process run on CPU from jax 0.11 on: with jax 0.12.1, processes that load the step
    from the cache hang at its first run (its Gloo collectives never meet; 0.10.2 runs)."""
    if (
        jax.process_count() > 1
        and jax.default_backend() == 'cpu'
        and jax.__version_info__ >= (0, 11)
    ):
        jax.config.update('jax_enable_compilation_cache', False)  # also $JAX_COMPILATION_CACHE_DIR
        return
    if not path:
        return
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(path))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', min_compile_seconds)


def create_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over ``devices`` (default: every device of every host)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), ('data',))


def shard_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Builds global arrays, split over the mesh, from this host's slice of a batch."""
    sharding = NamedSharding(mesh, P('data'))
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch
    )


def host_values(collection: metrics.Collection) -> dict[str, float]:
    """A metrics collection's values as floats (its arrays are replicated: any shard will do,
    which also works when the arrays span several processes)."""
    local = jax.tree_util.tree_map(
        lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, collection
    )
    return {k: float(v) for k, v in local.compute().items()}


def replicate(mesh: Mesh, value: np.ndarray) -> jax.Array:
    """A host array (the same on every process) replicated over the mesh."""
    return jax.make_array_from_callback(
        value.shape, NamedSharding(mesh, P()), lambda index: value[index]
    )


def replicated_scalar(mesh: Mesh, value: float) -> jax.Array:
    """A float32 scalar replicated over the mesh (valid on several processes too)."""
    return replicate(mesh, np.float32(value))
