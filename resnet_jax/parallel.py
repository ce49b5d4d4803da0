"""Placement over a mesh of every device of every host, the compilation cache and the
XLA:CPU options of every compiled step.

One 1-D ``Mesh`` over every device of every process: batches are split along it
(``P('data')``), the train state is replicated (``P()``).
"""

import functools
import os

import jax
import numpy as np
from clu import metrics
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


# XLA:CPU (jax 0.10) hands convolutions, matrix products and reductions to YNNPACK, which
# ran each convolution on one thread here, where XLA's own (Eigen) convolutions use every
# core: 3x3 convolutions of CIFAR ResNets at batch 128 on 2 cores ran at 215-235 GFLOP/s
# with YNNPACK and 340-400 without. Its reductions stay (BatchNorm's statistics, 30%
# slower without), so only those are handed to it.
_CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}


@functools.cache
def cpu_compiler_options() -> dict:
    """XLA options for every program the library compiles on the CPU backend (train and
    eval steps, ``evaluate``); ``{}`` on other backends or where this XLA lacks them.
    Research code jitting ``model.apply`` itself can pass them as
    ``jax.jit(..., compiler_options=cpu_compiler_options())``."""
    if jax.default_backend() != 'cpu':
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS).lower(1.0).compile()
    except jax.errors.JaxRuntimeError:  # an XLA without the option: its defaults
        return {}
    return dict(_CPU_OPTIONS)


def enable_compilation_cache(path: str, min_compile_seconds: float = 1.0) -> None:
    """JAX's persistent compilation cache in ``path``: a relaunch of the same config
    loads its compiled steps instead of compiling them."""
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
        lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def host_values(collection: metrics.Collection) -> dict[str, float]:
    """A metrics collection's values as floats (its arrays are replicated: any shard will do,
    which also works when the arrays span several processes)."""
    local = jax.tree_util.tree_map(
        lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x,
        collection)
    return {k: float(v) for k, v in local.compute().items()}


def replicate(mesh: Mesh, value: np.ndarray) -> jax.Array:
    """A host array (the same on every process) replicated over the mesh."""
    return jax.make_array_from_callback(value.shape, NamedSharding(mesh, P()),
                                        lambda index: value[index])


def replicated_scalar(mesh: Mesh, value: float) -> jax.Array:
    """A float32 scalar replicated over the mesh (valid on several processes too)."""
    return replicate(mesh, np.float32(value))
