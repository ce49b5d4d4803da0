"""Trained runs read from outside the training loop: ``load`` (``resnet_jax.load``),
``load_variables``, a run's ``config.json``, and ``save_variables`` for converted weights.
"""

from __future__ import annotations

import io
import json
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from resnet_jax import config as config_lib
from resnet_jax import paths
from resnet_jax.config import ConfigError
from resnet_jax.training.checkpoints import describe_error, item_handlers
from resnet_jax.training.checksums import CHECKSUM, CorruptCheckpoint, checksums, verify
from resnet_jax.training.run_identity import check_model, read_meta, step_dirs

WEIGHTS = ('raw', 'ema')


def _numpy_restore(directory: epath.Path, step: int, parts: tuple[str, ...]) -> dict:
    """The ``state`` parts ``parts`` of ``step`` as numpy arrays (the others not read)."""
    handlers = {**item_handlers(), 'state': ocp.PyTreeCheckpointHandler()}
    manager = ocp.CheckpointManager(
        directory, item_handlers=handlers, options=ocp.CheckpointManagerOptions(create=False)
    )
    try:
        tree = manager.item_metadata(step)['state']
        tree = getattr(tree, 'tree', tree)
        missing = [p for p in parts if p not in tree]
        if missing:
            raise KeyError(missing[0])
        wanted = {p: tree[p] for p in parts}
        # As host (numpy) arrays: valid in every process of a multi-process run, whatever
        # devices the checkpoint was written from.
        as_numpy = jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted
        )
        return manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=wanted, restore_args=as_numpy, partial_restore=True
                )
            ),
        )['state']
    finally:
        manager.close()


def load_variables(
    workdir,
    step: int | None = None,
    weights: str = 'raw',
    config: ml_collections.ConfigDict | None = None,
) -> tuple[dict, int]:
    """``({'params', 'batch_stats'}, step)`` of a run's latest (or given) checkpoint, as
    numpy arrays, read and checked against their checksums without reading the rest of
    the state; the workdir of a training run or of ``resnet-jax convert``.
    ``weights='ema'``: the exponential moving average of a run trained with
    ``ema_decay > 0``. With ``config``, a checkpoint of another model is refused before
    anything is read. A corrupt latest checkpoint is passed over (with a warning) for the
    previous one; a corrupt ``step``, asked for by number, is an error."""
    if weights not in WEIGHTS:
        raise ConfigError(f'unknown weights {weights!r}; allowed: {", ".join(WEIGHTS)}')
    directory = paths.resolve(workdir) / 'checkpoints'
    if not directory.is_dir():
        raise ConfigError(f'no checkpoints in {workdir}')
    steps = step_dirs(directory)
    if not steps:
        raise ConfigError(f'no checkpoint in {directory}')
    if step is not None and step not in steps:
        raise ConfigError(
            f'{directory} has no checkpoint of step {step}; it has steps '
            f'{", ".join(map(str, sorted(steps)))}'
        )
    for candidate in [step] if step is not None else steps:
        try:
            meta = read_meta(directory, candidate)
            if config is not None:
                check_model(directory, candidate, meta, config)
            if weights == 'ema' and not _has_ema(meta):
                raise ConfigError(
                    f'{workdir} has no EMA of the weights (its run had '
                    "ema_decay=0); use weights='raw'"
                )
            part = 'ema' if weights == 'ema' else None
            state = _numpy_restore(
                directory, candidate, (part,) if part else ('params', 'batch_stats')
            )
            verify((meta.get('checksums') or {}).get('parts'), 'state', state)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001
            if step is not None:
                raise ConfigError(
                    f'checkpoint step {step} in {directory} is corrupt ({describe_error(e)})'
                ) from None
            print(
                f'warning: checkpoint step {candidate} in {directory} is corrupt '
                f'({describe_error(e)}); using the previous one',
                flush=True,
            )
            continue
        if part:
            state = state['ema']
        return {'params': state['params'], 'batch_stats': state['batch_stats']}, candidate
    raise ConfigError(f'every checkpoint in {directory} is corrupt')


def _has_ema(meta: dict) -> bool:
    recorded = config_lib.recorded_identity(meta)
    if 'ema_decay' in recorded:
        return recorded['ema_decay'] > 0
    return bool(recorded.get('ema'))


def run_config(workdir) -> ml_collections.ConfigDict:
    """The config a run's ``config.json`` records (ConfigError if it has none)."""
    path = paths.resolve(workdir) / 'config.json'
    if not path.exists():
        raise ConfigError(f'{workdir} has no config.json: not a resnet_jax run; pass its config')
    try:
        return config_lib.from_dict(json.loads(path.read_text()))
    except ValueError as e:
        raise ConfigError(f'{path} cannot be read: {str(e).splitlines()[0]}') from None


def check_run_model(workdir, config: ml_collections.ConfigDict, step: int | None = None) -> None:
    """CheckpointMismatch (before anything is read but the meta files) when the
    checkpoint ``load_variables`` would read first (``step``, or the latest readable
    one) holds another network than ``config``'s."""
    directory = paths.resolve(workdir) / 'checkpoints'
    for candidate in [step] if step is not None else step_dirs(directory):
        try:
            meta = read_meta(directory, candidate)
        except CorruptCheckpoint:
            continue
        check_model(directory, candidate, meta, config)
        return


class LoadedRun(NamedTuple):
    """What ``load`` returns: ``model, variables, config, step = resnet_jax.load(workdir)``."""

    model: Any
    variables: dict
    config: ml_collections.ConfigDict
    step: int


def load(
    workdir,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
    weights: str = 'raw',
) -> LoadedRun:
    """A trained run (or the output of ``resnet-jax convert``) as the model, its
    variables (``{'params', 'batch_stats'}``, the model's own tree), its config and the
    checkpoint step: the latest good checkpoint, or ``step``. ``model.apply(variables,
    images)`` is ready to run. ``config`` replaces the run's own ``config.json`` (a
    checkpoint of another model is refused). ``weights='ema'`` gives the exponential
    moving average of the weights (runs with ``ema_decay > 0``; ``ConfigError``, a
    ``ValueError``, for others).
    """

    config = run_config(workdir) if config is None else config
    variables, step = load_variables(workdir, step, weights, config)
    num_classes = int(np.shape(variables['params']['fc']['bias'])[0])
    return LoadedRun(config_lib.model_from_config(config, num_classes), variables, config, step)


# A run with 'mean' preprocessing keeps its training set's mean image beside config.json.
MEAN_FILE = 'mean_image.npy'


def save_mean(workdir, mean: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(mean, np.float32))
    paths.write_atomically(paths.resolve(workdir) / MEAN_FILE, buffer.getvalue())


def preprocess(images, workdir, config: ml_collections.ConfigDict | None = None) -> jax.Array:
    """``images`` (uint8 or [0, 1] floats, NHWC) as the run in ``workdir`` was trained on
    them: its ``dataset.preprocessing``, with the mean image it kept for 'mean' (the
    channel mean where the images' size differs from the training crop's)."""
    from resnet_jax import models

    config = run_config(workdir) if config is None else config
    style = config.dataset.preprocessing
    if style != 'mean':
        return models.preprocess(images, style)
    path = paths.resolve(workdir) / MEAN_FILE
    if not path.exists():
        raise ConfigError(
            f'{workdir} keeps no {MEAN_FILE} (runs from before it was kept): pass the '
            "training set's mean, models.preprocess(images, 'mean', mean=...)"
        )
    mean = np.load(io.BytesIO(path.read_bytes()))
    if tuple(np.shape(images)[-3:-1]) != mean.shape[:2]:
        mean = mean.reshape(-1, mean.shape[-1]).mean(0)
    return models.preprocess(images, 'mean', mean=mean)


def save_variables(
    workdir, variables: dict, config: ml_collections.ConfigDict, **meta: Any
) -> epath.Path:
    """Writes ``variables`` (params and batch_stats) as step 0 of a workdir, with its
    ``config.json`` and checksums: what ``resnet-jax evaluate``, ``load`` and
    ``init_from`` read. Used for converted weights."""
    workdir = paths.resolve(workdir)
    if (workdir / 'config.json').exists() or (workdir / 'checkpoints').exists():
        raise ConfigError(
            f'{workdir} already holds a run (config.json or checkpoints/); '
            'write converted weights into a new folder'
        )
    workdir.mkdir(parents=True, exist_ok=True)
    variables = jax.tree_util.tree_map(np.asarray, dict(variables))
    manager = ocp.CheckpointManager(workdir / 'checkpoints', item_names=('state', 'meta'))
    parts = checksums(variables, {})
    parts.pop('train_metrics')
    manager.save(
        0,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(variables),
            meta=ocp.args.JsonSave(
                {
                    'identity': config_lib.identity(config),
                    **meta,
                    'checksums': {'algorithm': CHECKSUM, 'parts': parts},
                    'history': {'train': [], 'eval': []},
                }
            ),
        ),
    )
    manager.wait_until_finished()
    manager.close()
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
    return workdir
