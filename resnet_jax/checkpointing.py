"""Orbax checkpoints of the train state, with the run's identity and history beside it.

Each checkpoint step holds three items: ``state`` (the ``TrainState`` pytree),
``train_metrics`` (the training metrics accumulated since the last log line, so a run resumed
mid-window logs exactly what an uninterrupted run logs) and ``meta`` (JSON: the model and
dataset names, so a workdir is never resumed with another model, and the metric history,
so curves continue after a restart). Saving is asynchronous; orbax writes each step to a
temporary directory and renames it when complete, so a half-written step is never taken
for a good one. A step that cannot be read is moved aside (never deleted) and the previous
one is used, with a warning.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from resnet_jax.config import ConfigError


def identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by ``config``: the model, the dataset and
    whether the state holds an EMA of the weights (``config.ema_decay > 0``)."""
    return {'model': config.model.name, 'dataset': config.dataset.name,
            'ema': config.ema_decay > 0}


# What a checkpoint's meta lacks was not recorded then: checkpoints written before the EMA
# existed have none.
_META_DEFAULTS = {'ema': False}


def check_identity(directory: epath.Path, config: ml_collections.ConfigDict) -> None:
    """Refuses (ConfigError) checkpoints of another model or dataset; changes nothing.

    Reads the JSON of the ``meta`` items directly: no CheckpointManager, whose collective
    set-up would have processes that do and do not see the directory disagree.
    """
    directory = epath.Path(directory)
    if not directory.exists():
        return
    steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)
    for step in steps:
        try:
            meta = json.loads((directory / str(step) / 'meta' / 'metadata').read_text())
        except (OSError, ValueError):  # unreadable: restore_latest sets it aside later
            continue
        Checkpointer.check_meta(directory, meta, identity(config))
        return


class Checkpointer:
    """Saves on request and keeps the last ``config.keep_checkpoints`` steps."""

    def __init__(self, directory: epath.Path, config: ml_collections.ConfigDict):
        self.identity = identity(config)
        self.directory = epath.Path(os.path.abspath(directory))  # orbax needs absolute paths
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=('state', 'train_metrics', 'meta'))

    @staticmethod
    def check_meta(directory, meta: dict, expected: dict) -> None:
        for key, value in expected.items():
            found = meta.get(key, _META_DEFAULTS.get(key))
            if found == value:
                continue
            if key == 'ema':
                raise ConfigError(
                    f'the checkpoint in {directory} was written '
                    f'{"with" if found else "without"} an EMA of the weights; resume it '
                    f'with ema_decay {"> 0" if found else "= 0"} or use another --workdir')
            raise ConfigError(f'the checkpoint in {directory} is of {key} '
                              f'{found!r}, not {value!r}; use another --workdir')

    def _meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))['meta']

    def _check(self, meta: dict) -> None:
        self.check_meta(self.directory, meta, self.identity)

    def _set_aside(self, step: int, error: Exception) -> None:
        """Moves an unreadable step out of orbax's sight, keeping its files."""
        logging.warning('checkpoint step %d in %s cannot be read (%s: %s); falling back to '
                        'the previous one', step, self.directory, type(error).__name__,
                        str(error).splitlines()[0] if str(error) else '')
        print(f'warning: checkpoint step {step} is unreadable; it is kept as '
              f'corrupt-{step}-* and the previous checkpoint is used', flush=True)
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(
                self.directory / f'corrupt-{step}-{int(time.time())}')
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f'set_aside_{step}')
        self.manager.reload()

    def restore_latest(self, state: Any, metrics: Any) -> tuple[Any, Any, dict] | None:
        """(state, metrics, history) of the latest readable checkpoint, or None.

        ``state`` and ``metrics`` are templates of the right structure and sharding.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self._meta(step)
                self._check(meta)
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(state),
                    train_metrics=ocp.args.StandardRestore(metrics)))
            except ConfigError:
                raise
            except Exception as e:  # orbax/tensorstore raise many types on bad files
                self._set_aside(step, e)
                continue
            return restored['state'], restored['train_metrics'], meta['history']
        return None

    def save(self, step: int, state: Any, metrics: Any, history: dict) -> None:
        if step in self.manager.all_steps():
            return
        meta = {**self.identity, 'history': copy.deepcopy(history)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), train_metrics=ocp.args.StandardSave(metrics),
            meta=ocp.args.JsonSave(meta)), force=True)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


WEIGHTS = ('raw', 'ema')


def load_variables(workdir, step: int | None = None,
                   weights: str = 'raw') -> tuple[dict, int]:
    """``({'params', 'batch_stats'}, step)`` of a run's latest (or given) checkpoint, as
    numpy arrays; the workdir of a training run or of ``python -m resnet_jax.convert``.
    ``weights='ema'``: the exponential moving average of a run trained with
    ``ema_decay > 0``."""
    if weights not in WEIGHTS:
        raise ConfigError(f'unknown weights {weights!r}; allowed: {", ".join(WEIGHTS)}')
    directory = epath.Path(workdir).absolute() / 'checkpoints'
    if not directory.exists():
        raise ConfigError(f'no checkpoints in {workdir}')
    manager = ocp.CheckpointManager(directory, item_names=('state',),
                                    item_handlers={'state': ocp.PyTreeCheckpointHandler()},
                                    options=ocp.CheckpointManagerOptions(create=False))
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f'no checkpoint in {directory}')
        # As host (numpy) arrays: valid in every process of a multi-process run, whatever
        # devices the checkpoint was written from.
        tree = manager.item_metadata(step)['state']
        as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                          getattr(tree, 'tree', tree))
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(restore_args=as_numpy)))['state']
    finally:
        manager.close()
    if weights == 'ema':
        if not state.get('ema'):
            raise ConfigError(f'{workdir} has no EMA of the weights (its run had '
                              "ema_decay=0); use weights='raw'")
        state = state['ema']
    return {'params': state['params'], 'batch_stats': state['batch_stats']}, step


class LoadedRun(NamedTuple):
    """What ``load`` returns: ``model, variables, config, step = resnet_jax.load(workdir)``."""
    model: Any
    variables: dict
    config: ml_collections.ConfigDict
    step: int


def load(workdir, step: int | None = None,
         config: ml_collections.ConfigDict | None = None, weights: str = 'raw') -> LoadedRun:
    """A trained run (or the output of ``python -m resnet_jax.convert``) as the model, its
    variables (``{'params', 'batch_stats'}``, the model's own tree), its config and the
    checkpoint step: the latest checkpoint, or ``step``. ``model.apply(variables, images)``
    is ready to run. ``config`` replaces the run's own ``config.json``. ``weights='ema'``
    gives the exponential moving average of the weights (runs with ``ema_decay > 0``;
    ``ConfigError``, a ``ValueError``, for others).
    """
    from resnet_jax import steps
    from resnet_jax.config import from_dict

    workdir = epath.Path(workdir)
    if config is None:
        if not (workdir / 'config.json').exists():
            raise ConfigError(f'{workdir} has no config.json: not a resnet_jax run; pass '
                              'its config')
        config = from_dict(json.loads((workdir / 'config.json').read_text()))
    variables, step = load_variables(workdir, step, weights)
    num_classes = int(np.shape(variables['params']['fc']['bias'])[0])
    return LoadedRun(steps.create_model(config, num_classes), variables, config, step)


def merge_pretrained(fresh: Any, pretrained: Any) -> tuple[Any, list[str]]:
    """``fresh`` with every leaf that ``pretrained`` has in the same shape replaced;
    returns the names of the leaves kept fresh (e.g. an fc for another number of classes)."""
    flat = {jax.tree_util.keystr(p): v for p, v in
            jax.tree_util.tree_flatten_with_path(pretrained)[0]}
    kept = []

    def pick(path, leaf):
        value = flat.get(jax.tree_util.keystr(path))
        if value is None or tuple(value.shape) != tuple(leaf.shape):
            kept.append(jax.tree_util.keystr(path))
            return leaf
        return jax.device_put(jax.numpy.asarray(value, leaf.dtype), leaf.sharding)

    return jax.tree_util.tree_map_with_path(pick, fresh), kept


def save_variables(workdir, variables: dict, config: ml_collections.ConfigDict,
                   **meta: Any) -> epath.Path:
    """Writes ``variables`` (params and batch_stats) as step 0 of a workdir, with its
    ``config.json``: what ``resnet_jax.evaluate`` and ``init_from`` read. Used for
    converted weights."""
    workdir = epath.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    manager = ocp.CheckpointManager(workdir / 'checkpoints', item_names=('state', 'meta'))
    manager.save(0, args=ocp.args.Composite(
        state=ocp.args.StandardSave(jax.tree_util.tree_map(np.asarray, variables)),
        meta=ocp.args.JsonSave({**identity(config), **meta,
                                'history': {'train': [], 'eval': []}})))
    manager.wait_until_finished()
    manager.close()
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
    return workdir
