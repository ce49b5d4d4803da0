"""A run's checkpoints as their meta files record them (no orbax): the steps on disk, and
whether a config may resume, evaluate or load them. A config that disagrees with the
recorded ``resnet_jax.config.identity`` is refused with ``CheckpointMismatch`` naming the
fields; such a checkpoint is never taken for a corrupt one.
"""

from __future__ import annotations

import json
import threading

import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from resnet_jax import config as config_lib
from resnet_jax.config import ConfigError
from resnet_jax.training.checksums import CorruptCheckpoint


class CheckpointMismatch(ConfigError):
    """A checkpoint written by a config that differs from this one where it matters (its
    identity, or the tree it holds). Refused; the checkpoint is left as it is."""


def step_dirs(directory: epath.Path) -> list[int]:
    """The complete steps in ``directory``, newest first: orbax's finalised ones (on a local
    disk a temporary folder renamed; in a bucket, where nothing renames, a step folder with
    its commit file)."""
    directory = epath.Path(directory)
    if not directory.is_dir():
        return []
    steps = [p for p in directory.iterdir() if p.name.isdigit()]
    return sorted(
        (int(p.name) for p in steps if ocp.utils.is_checkpoint_finalized(p)), reverse=True
    )


def read_meta(directory: epath.Path, step: int) -> dict:
    """The ``meta`` item of a step; CorruptCheckpoint when it cannot be read."""
    try:
        meta = json.loads((epath.Path(directory) / str(step) / 'meta' / 'metadata').read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f'its meta cannot be read ({type(e).__name__})') from None
    if not isinstance(meta, dict):
        raise CorruptCheckpoint('its meta is not a JSON object')
    return meta


def _format(value) -> str:
    return repr(tuple(value)) if isinstance(value, list) else repr(value)


def _listed(differences) -> str:
    return ', '.join(
        f'{field} {_format(saved)} (this config: {_format(mine)})'
        for field, saved, mine in differences
    )


def check_identity(
    directory: epath.Path, step: int, meta: dict, config: ml_collections.ConfigDict
) -> None:
    """Raises CheckpointMismatch, naming every field and both values, where ``config``
    disagrees with the identity recorded in ``meta``."""
    differences = config_lib.identity_differences(config_lib.recorded_identity(meta), config)
    if not differences:
        return
    workdir = epath.Path(directory).parent
    raise CheckpointMismatch(
        f'the checkpoints in {directory} (step {step}) were written with '
        f'{_listed(differences)}; resume with the same values, use another --workdir for a '
        f'new run, or start one from these weights with --config.init_from={workdir}'
    )


def architecture_differences(meta: dict, config: ml_collections.ConfigDict) -> str:
    """Where the network recorded with a checkpoint (``config.ARCHITECTURE_FIELDS``)
    differs from ``config.model``'s, named with both values ('' where it does not)."""
    recorded = {
        k: v
        for k, v in config_lib.recorded_identity(meta).items()
        if k in config_lib.ARCHITECTURE_FIELDS
    }
    return _listed(config_lib.identity_differences(recorded, config))


def check_model(
    directory: epath.Path, step: int, meta: dict, config: ml_collections.ConfigDict
) -> None:
    """CheckpointMismatch where the network recorded with a checkpoint differs from
    ``config.model``'s: what evaluation and loading check before reading weights."""
    differences = architecture_differences(meta, config)
    if differences:
        raise CheckpointMismatch(
            f'checkpoint step {step} in {directory} holds another '
            f'model: {differences}; evaluate it with its own '
            'config (leave out --config) or pass the config it was '
            'trained with'
        )


def resumed_from(directory: epath.Path, steps: list[int], step: int) -> bool:
    """Whether the latest readable checkpoint was written by a run resumed from ``step``."""
    for latest in steps:
        try:
            return read_meta(directory, latest).get('rolled_back_to') == step
        except CorruptCheckpoint:
            continue
    return False


def describe_latest(directory, within: float = 2.0) -> str:
    """``step N in DIR`` for the newest complete step (``none``), looked up for ``within``
    seconds at most: the line of a run being ended must not wait on a stalled bucket."""
    found = [f'not known ({directory} did not answer in {within:.0f} s)']

    def look():
        steps = step_dirs(directory)
        found[0] = f'step {steps[0]} in {directory}' if steps else 'none'

    lookup = threading.Thread(target=look, daemon=True)
    lookup.start()
    lookup.join(within)
    return found[0]


def describe_checkpoints(directory: epath.Path) -> str:
    """``step 10 (loss 2.31, parameter norm 44.2), step 20 (...)``."""
    parts = []
    for step in sorted(step_dirs(directory)):
        try:
            meta = read_meta(directory, step)
        except CorruptCheckpoint:
            parts.append(f'step {step} (unreadable)')
            continue
        loss, norm = meta.get('loss'), meta.get('param_norm')
        if loss is None and meta.get('history', {}).get('train'):
            loss = meta['history']['train'][-1].get('train_loss')
        facts = [
            f'loss {loss:.4g}' if loss is not None else None,
            f'parameter norm {norm:.4g}' if norm is not None else None,
        ]
        facts = [f for f in facts if f]
        parts.append(f'step {step}' + (f' ({", ".join(facts)})' if facts else ''))
    return ', '.join(parts) or 'none'


def check_resume(
    directory: epath.Path, config: ml_collections.ConfigDict, resume_step: int | None = None
) -> None:
    """Before a run starts: ConfigError when the latest readable checkpoint in
    ``directory`` was written by a config of another identity, or when ``resume_step``
    is not one of its steps. Reads the meta files only, changes nothing."""
    directory = epath.Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(
            f'{directory} is not a directory (the run keeps its checkpoints '
            'there); move it or use another --workdir'
        )
    steps = step_dirs(directory)
    if resume_step is not None and not resumed_from(directory, steps, resume_step):
        if resume_step not in steps:
            raise ConfigError(
                f'--resume_step={resume_step}: {directory} has no checkpoint '
                f'of step {resume_step}; it has: '
                f'{describe_checkpoints(directory)}'
            )
        steps = [resume_step]
    for step in steps:
        try:
            meta = read_meta(directory, step)
        except CorruptCheckpoint:  # unreadable: restore_latest sets it aside later
            continue
        check_identity(directory, step, meta, config)
        return
