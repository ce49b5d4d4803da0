"""Orbax checkpoints of the train state, with the run's identity and history beside it.

Each checkpoint step holds two items: ``state`` (the ``TrainState`` pytree) and ``meta``
(JSON: the model and dataset names, so a workdir is never resumed with another model, and
the metric history, so curves continue exactly after a restart). Saving is asynchronous;
orbax writes each step to a temporary directory and renames it when complete, so a
half-written step is never taken for a good one.
"""

from __future__ import annotations

import copy
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from resnet_jax.config import ConfigError


def identity(config: ml_collections.ConfigDict) -> dict[str, str]:
    """What a checkpoint must match to be resumed by ``config``."""
    return {'model': config.model.name, 'dataset': config.dataset.name}


class Checkpointer:
    """Saves every call to ``save`` and keeps the last ``config.keep_checkpoints``."""

    def __init__(self, directory: epath.Path, config: ml_collections.ConfigDict):
        self.identity = identity(config)
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(directory, options=options,
                                             item_names=('state', 'meta'))

    def _meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))['meta']

    def check_identity(self) -> None:
        """Refuses (ConfigError) a workdir whose checkpoint is of another model or dataset."""
        step = self.manager.latest_step()
        if step is None:
            return
        meta = self._meta(step)
        for key, value in self.identity.items():
            if meta.get(key) != value:
                raise ConfigError(f'the checkpoint in {self.manager.directory} is of {key} '
                                  f'{meta.get(key)!r}, not {value!r}; use another --workdir')

    def restore_latest(self, template: Any) -> tuple[Any, dict] | None:
        """(state, history) of the latest checkpoint, or None when there is none.

        ``template`` is a state of the right structure and sharding (e.g. a fresh one).
        """
        step = self.manager.latest_step()
        if step is None:
            return None
        self.check_identity()
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(template)))['state']
        return state, self._meta(step)['history']

    def save(self, step: int, state: Any, history: dict) -> None:
        if step in self.manager.all_steps():
            return
        meta = {**self.identity, 'history': copy.deepcopy(history)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
