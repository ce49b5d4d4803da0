"""The batches training reads, by ``dataset.decoder``: JPEGs decoded by DALI on the devices,
or everything built by the host's input workers and copied over."""

from __future__ import annotations

import functools

import jax
import ml_collections
from jax.sharding import Mesh

from resnet_jax import parallel
from resnet_jax.data import dali, prepare
from resnet_jax.data import pipeline as data_pipeline


def decoder(config: ml_collections.ConfigDict) -> str:
    """Training's decoder, 'cpu' or 'dali' (``dataset.decoder``); ConfigError where the
    config's cannot run."""
    name = config.dataset.name
    return dali.choose(config.dataset.decoder, name, name in prepare.IN_MEMORY_DATASETS)


def batches(pipeline, mesh: Mesh, start_step: int, batch_size: int, decoder: str = 'cpu'):
    """Global training batches ``start_step``, ... on ``mesh``, built ahead in a thread:
    decoded by DALI on the devices (``decoder='dali'``), or by the host's input workers and
    copied over."""
    if decoder == 'dali':
        built = dali.train_batches(pipeline, mesh, start_step, batch_size)
        return data_pipeline.prefetch(built, lambda batch: batch)
    built = data_pipeline.train_iterator(
        pipeline, start_step, batch_size, jax.process_index(), jax.process_count()
    )
    return data_pipeline.prefetch(built, functools.partial(parallel.shard_batch, mesh))
