"""Orbax checkpoints of the train state, with the run's identity, checksums and history.

Each checkpoint step holds three items: ``state`` (the ``TrainState`` pytree, in the
model's own tree), ``train_metrics`` (the training metrics accumulated since the last log
line, so a run resumed mid-window logs exactly what an uninterrupted run logs) and
``meta`` (JSON):

* ``identity``: the fields of the config that wrote it that give the checkpoint its
  meaning (``resnet_jax.config.identity``). A config that disagrees on any of them is
  refused (``CheckpointMismatch``, one line naming the fields and both values); such a
  checkpoint is never taken for a corrupt one.
* ``checksums``: SHA-256 digests of the arrays being saved, one per part of the state
  (``params``, ``batch_stats``, ``opt_state``, ..., ``train_metrics``), computed on the
  host from the values handed to orbax and written with them in the same atomic step
  (orbax writes a step to a temporary directory and renames it when every item is
  complete, so a half-written step is never seen). Every restore verifies the parts it
  reads (training, ``evaluate``, ``load``, ``init_from``).
* ``history`` (the metric history, so curves continue after a restart), the loss and
  parameter norm of the step, and ``rolled_back_to`` when the run was resumed from an
  earlier step (``resume_step``).

A step that cannot be read, or whose values differ from its checksums, is corrupt:
training moves it aside as ``corrupt-<step>-<time>`` (its files kept, never deleted) and
resumes from the previous step with a one-line warning; ``evaluate`` and ``load`` pass
over it the same way without moving it. Saving is asynchronous; a save that cannot
complete (a full disk, a folder without permission, a quota) raises
``CheckpointWriteError`` at once or at the next ``poll`` (every step), and the earlier
steps are kept.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
from typing import Any, Callable, Iterable, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from resnet_jax import config as config_lib
from resnet_jax.config import ConfigError

ITEMS = ('state', 'train_metrics', 'meta')
CHECKSUM = 'sha256'
WEIGHTS = ('raw', 'ema')


class CheckpointMismatch(ConfigError):
    """A checkpoint written by a config that differs from this one where it matters (its
    identity, or the tree it holds). Refused; the checkpoint is left as it is."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written; the earlier ones are kept."""


class CorruptCheckpoint(RuntimeError):
    """A step whose files cannot be read or whose values differ from its checksums."""


# --- names, digests and metadata -------------------------------------------------------------

def _key_name(key) -> str:
    for attribute in ('key', 'name', 'idx'):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def leaf_names(tree: Any) -> list[tuple[str, Any]]:
    """``[('params/conv1/kernel', leaf), ...]``: each leaf by the names on its path, the
    same for a ``TrainState``, the dicts orbax restores it as, and its metadata."""
    return [('/'.join(_key_name(k) for k in path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _host(value) -> np.ndarray:
    if isinstance(value, jax.Array):  # replicated: this process's copy will do
        value = value.addressable_data(0)
    return np.ascontiguousarray(np.asarray(value))


def digest(named_leaves: Iterable[tuple[str, Any]]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``named_leaves``, in name
    order."""
    h = hashlib.sha256()
    for name, value in sorted(named_leaves, key=lambda item: item[0]):
        array = _host(value)
        h.update(f'{name}|{array.dtype.name}|{array.shape};'.encode())
        h.update(array.reshape(-1).view(np.uint8))
    return h.hexdigest()


def checksums(state: Any, metrics: Any) -> dict[str, str]:
    """The digest of each part of the state (its first path name: ``params``,
    ``batch_stats``, ``opt_state``, ``step``, ...) and of ``train_metrics``."""
    parts: dict[str, list] = {}
    for name, leaf in leaf_names(state):
        parts.setdefault(name.split('/')[0], []).append((name, leaf))
    out = {f'state/{part}': digest(leaves) for part, leaves in parts.items()}
    out['train_metrics'] = digest(leaf_names(metrics))
    return out


def verify(checksummed: dict[str, str] | None, item: str, tree: Any) -> None:
    """Raises CorruptCheckpoint where the parts of ``tree`` (the restored ``item``,
    'state' or 'train_metrics') differ from the recorded checksums (none recorded: an
    older checkpoint, nothing to compare)."""
    if not checksummed:
        return
    if item == 'train_metrics':
        expected = {'train_metrics': checksummed.get('train_metrics')}
        found = {'train_metrics': digest(leaf_names(tree))}
    else:
        parts: dict[str, list] = {}
        for name, leaf in leaf_names(tree):
            parts.setdefault(name.split('/')[0], []).append((name, leaf))
        expected = {p: checksummed.get(f'state/{p}') for p in parts}
        found = {p: digest(leaves) for p, leaves in parts.items()}
    bad = sorted(p for p in found if expected[p] is not None and expected[p] != found[p])
    if bad:
        raise CorruptCheckpoint(f'the contents of {", ".join(bad)} differ from the '
                                f'{CHECKSUM} checksum recorded with it')


def step_dirs(directory: epath.Path) -> list[int]:
    """The complete steps in ``directory`` (orbax's names; temporary ones excluded),
    newest first."""
    directory = epath.Path(directory)
    if not directory.is_dir():
        return []
    return sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()),
                  reverse=True)


def read_meta(directory: epath.Path, step: int) -> dict:
    """The ``meta`` item of a step, read as the JSON file it is (no CheckpointManager);
    CorruptCheckpoint when it cannot be read."""
    try:
        meta = json.loads((epath.Path(directory) / str(step) / 'meta' / 'metadata').read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f'its meta cannot be read ({type(e).__name__})') from None
    if not isinstance(meta, dict):
        raise CorruptCheckpoint('its meta is not a JSON object')
    return meta


def _format(value) -> str:
    return repr(tuple(value)) if isinstance(value, list) else repr(value)


def check_identity(directory: epath.Path, step: int, meta: dict,
                   config: ml_collections.ConfigDict) -> None:
    """Raises CheckpointMismatch, naming every field and both values, where ``config``
    disagrees with the identity recorded in ``meta``."""
    differences = config_lib.identity_differences(config_lib.recorded_identity(meta), config)
    if not differences:
        return
    workdir = epath.Path(directory).parent
    listed = ', '.join(f'{field} {_format(saved)} (this config: {_format(mine)})'
                       for field, saved, mine in differences)
    raise CheckpointMismatch(
        f'the checkpoints in {directory} (step {step}) were written with {listed}; resume '
        f'with the same values, use another --workdir for a new run, or start one from '
        f'these weights with --config.init_from={workdir}')


def _tree_differences(saved: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """The first difference between two ``{name: (shape, dtype)}`` tables, or None."""
    for name in sorted(set(saved) | set(expected)):
        if name not in saved:
            return f'it has no {name}'
        if name not in expected:
            return f'it holds {name}, which this config\'s state has not'
        if saved[name] != expected[name]:
            return f'its {name} is {saved[name]}, this config\'s {expected[name]}'
    return None


def _shapes(tree: Any) -> dict[str, tuple]:
    return {name: (tuple(leaf.shape), np.dtype(leaf.dtype).name)
            for name, leaf in leaf_names(tree)}


def _agree_all(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (one all-gather on several)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.min(multihost_utils.process_allgather(np.int32(flag))))


def _item_handlers() -> dict:
    return {'state': ocp.StandardCheckpointHandler(),
            'train_metrics': ocp.StandardCheckpointHandler(),
            'meta': ocp.JsonCheckpointHandler()}


# --- the run's checkpointer --------------------------------------------------------------------

class _ModelLayout:
    """The model's own tree, as it is."""

    def from_model(self, state):
        return state

    def to_model(self, state):
        return state


class Start(NamedTuple):
    """What ``Checkpointer.start`` returns: the state to train from (in the steps'
    layout), the metrics of its unfinished log window, the metric history, and the step
    resumed from (None for a new run)."""
    state: Any
    metrics: Any
    history: dict
    resumed_step: int | None


class Checkpointer:
    """The checkpoints of one training run: saves on request (asynchronously), keeps the
    last ``config.keep_checkpoints`` steps, restores the latest good one, and finds any
    failure to save at once (``poll`` after every step)."""

    def __init__(self, directory: epath.Path, config: ml_collections.ConfigDict,
                 on_first_save=None):
        self.config = config
        self.identity = config_lib.identity(config)
        self.directory = epath.Path(os.path.abspath(directory))  # orbax needs absolute paths
        # Directories created in the calling thread: where that fails (permissions, a
        # read-only mount), save() raises at once instead of leaving orbax's writer threads
        # waiting for a directory that never comes.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints, create=True, enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=_item_handlers())
        self.rolled_back_to: int | None = None
        self._pending: int | None = None  # a step being written in the background
        self._on_first_save = on_first_save  # called once the first save is complete
        self._layout = _ModelLayout()  # how the run's steps hold the state (start's)
        self._closed = False

    # -- saving ---------------------------------------------------------------------------

    def save(self, step: int, state: Any, metrics: Any, history: dict,
             loss: float | None = None, param_norm: float | None = None) -> None:
        """Starts writing ``step`` of ``state`` (in the layout the run's steps hold it,
        ``start``'s; saved in the model's own tree); a no-op when it is saved already.
        Raises CheckpointWriteError if an earlier save failed or this one cannot start."""
        self.wait()  # orbax waits for the previous save anyway: its failure is its own
        if step in self.manager.all_steps():
            return
        state = self._layout.to_model(state)
        meta = {'identity': self.identity, 'history': copy.deepcopy(history),
                'loss': loss, 'param_norm': param_norm,
                'checksums': {'algorithm': CHECKSUM, 'parts': checksums(state, metrics)}
                if jax.process_index() == 0 else None}
        if self.rolled_back_to is not None:
            meta['rolled_back_to'] = self.rolled_back_to
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                train_metrics=ocp.args.StandardSave(metrics),
                meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:  # noqa: BLE001 (orbax and the file system raise many types)
            raise self.write_error(e, step) from None
        self._pending = step

    def poll(self) -> None:
        """Raises CheckpointWriteError if the save in the background failed; costs
        nothing while it runs."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self._finish()

    def wait(self) -> None:
        """Waits for the save in the background; CheckpointWriteError if it failed."""
        if self._pending is not None:
            self._finish()

    def _finish(self) -> None:
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self.write_error(e, step) from None
        # orbax logs some failures of its background commit without raising them (a
        # rename refused): a step is saved when its directory has its final name.
        if jax.process_index() == 0 and not (self.directory / str(step)).is_dir():
            raise self.write_error(self._why_unwritable(), step)
        if self._on_first_save is not None:
            callback, self._on_first_save = self._on_first_save, None
            try:
                callback()
            except OSError as e:
                raise self.write_error(e, target=e.filename or "the run's config.json"
                                       ) from None

    def _why_unwritable(self) -> Exception:
        try:
            faults_check = self.directory / f'.write-test-{os.getpid()}'
            faults_check.write_text('')
            faults_check.unlink()
        except OSError as e:
            return e
        return RuntimeError('orbax did not commit it')

    def write_error(self, error: Exception, step: int | None = None,
                    target: str | None = None) -> CheckpointWriteError:
        """The error of a write that failed (of checkpoint ``step``, or of ``target``),
        naming its cause and the last complete checkpoint."""
        done = [s for s in step_dirs(self.directory) if s != step]
        last = (f'the last complete checkpoint is step {done[0]} (kept)' if done
                else 'no checkpoint of this run is complete')
        target = target or f'checkpoint step {step} in {self.directory}'
        return CheckpointWriteError(
            f'cannot write {target}: {describe_os_error(error)}; {last}. Free space or fix '
            'the folder, then relaunch the same command to resume')

    def close(self) -> None:
        """Waits for the last save (raising its failure) and releases orbax's threads."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 (a failure already reported by wait)
                pass

    # -- restoring ------------------------------------------------------------------------

    def start(self, fresh: Any, metrics: Any, layout: Any = None,
              start_from: Callable[[Any], Any] | None = None) -> Start:
        """The state a launch trains from, in ``layout`` (the ``StateLayout`` of the steps
        that train it; None: the model's own tree), which the checkpointer converts from
        and, when saving, back to the model's own tree: the latest good checkpoint
        (``restore_latest``), else ``start_from(fresh)`` (e.g. the weights of another run),
        else ``fresh``. ``fresh`` and ``metrics`` are also the templates of a restore."""
        self._layout = layout or _ModelLayout()
        restored = self.restore_latest(fresh, metrics)
        if restored is not None:
            state, metrics, meta = restored
            return Start(self._layout.from_model(state), metrics, meta['history'],
                         int(state.step))
        state = start_from(fresh) if start_from is not None else fresh
        return Start(self._layout.from_model(state), metrics, {'train': [], 'eval': []}, None)

    def restore_latest(self, state: Any, metrics: Any) -> tuple[Any, Any, dict] | None:
        """``(state, metrics, meta)`` of the latest good checkpoint, or None.

        ``state`` and ``metrics`` are templates of the right structure and sharding.
        Corrupt steps are moved aside (``set_aside``); a checkpoint that does not fit
        the config raises CheckpointMismatch.
        """
        for step in step_dirs(self.directory):
            try:
                meta = read_meta(self.directory, step)
                check_identity(self.directory, step, meta, self.config)
                self._check_tree(step, state, metrics)
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(state),
                    train_metrics=ocp.args.StandardRestore(metrics)))
                parts = (meta.get('checksums') or {}).get('parts')
                verify(parts, 'state', restored['state'])
                verify(parts, 'train_metrics', restored['train_metrics'])
                good = True
            except CheckpointMismatch:
                raise
            except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many types)
                good, problem = False, e
            if not _agree_all(good):
                self.set_aside(step, problem if not good else 'another process')
                continue
            self.rolled_back_to = meta.get('rolled_back_to', self.rolled_back_to)
            return restored['state'], restored['train_metrics'], meta
        return None

    def _check_tree(self, step: int, state: Any, metrics: Any) -> None:
        """CheckpointMismatch when the step's arrays are not the ones this config's state
        holds (an unreadable table of them: CorruptCheckpoint)."""
        try:
            metadata = self.manager.item_metadata(step)
            saved = {'state': _shapes(metadata['state']),
                     'train_metrics': _shapes(metadata['train_metrics'])}
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpoint(f'its array metadata cannot be read ({type(e).__name__})'
                                    ) from None
        for item, template in (('state', state), ('train_metrics', metrics)):
            difference = _tree_differences(saved[item], _shapes(template))
            if difference:
                raise CheckpointMismatch(
                    f'checkpoint step {step} in {self.directory} does not fit this config: '
                    f'{item}: {difference}; use another --workdir, or start a run from its '
                    f'weights with --config.init_from={self.directory.parent}')

    def set_aside(self, step: int, error, prefix: str = 'corrupt') -> None:
        """Moves ``step`` out of orbax's sight as ``<prefix>-<step>-<time>``, keeping its
        files, with a one-line warning."""
        reason = error if isinstance(error, str) else describe_error(error)
        if prefix == 'corrupt':
            print(f'warning: checkpoint step {step} is corrupt ({reason}); it is kept as '
                  f'corrupt-{step}-* and the previous checkpoint is used', flush=True)
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(
                self.directory / f'{prefix}-{step}-{int(time.time())}')
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f'set_aside_{prefix}_{step}')
        self.manager.reload()

    def roll_back(self, step: int) -> None:
        """Makes ``step`` the latest checkpoint: the later ones are moved aside as
        ``rolled-back-<step>-<time>`` (kept), and the checkpoints this run writes record
        that it resumed from ``step``. Nothing is moved when the latest checkpoint was
        written by a run already resumed from ``step`` (the same launch command again
        continues that run)."""
        steps = step_dirs(self.directory)
        if _resumed_from(self.directory, steps, step):
            return
        self.rolled_back_to = step
        later = [s for s in steps if s > step]
        for s in later:
            self.set_aside(s, 'rolled back', prefix='rolled-back')
        if later:
            print(f'resuming from step {step}: the later checkpoints '
                  f'({", ".join(map(str, sorted(later)))}) are kept as '
                  f'{self.directory}/rolled-back-<step>-<time>', flush=True)

    def describe(self) -> str:
        """The checkpoints on disk with their loss and parameter norm, for messages."""
        return describe_checkpoints(self.directory)


def _resumed_from(directory: epath.Path, steps: list[int], step: int) -> bool:
    """Whether the latest readable checkpoint was written by a run resumed from ``step``."""
    for latest in steps:
        try:
            return read_meta(directory, latest).get('rolled_back_to') == step
        except CorruptCheckpoint:
            continue
    return False


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
        facts = [f'loss {loss:.4g}' if loss is not None else None,
                 f'parameter norm {norm:.4g}' if norm is not None else None]
        facts = [f for f in facts if f]
        parts.append(f'step {step}' + (f' ({", ".join(facts)})' if facts else ''))
    return ', '.join(parts) or 'none'


def check_resume(directory: epath.Path, config: ml_collections.ConfigDict,
                 resume_step: int | None = None) -> None:
    """Before a run starts: ConfigError when the latest readable checkpoint in
    ``directory`` was written by a config of another identity, or when ``resume_step``
    is not one of its steps. Reads the meta files only, changes nothing."""
    directory = epath.Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f'{directory} is not a directory (the run keeps its checkpoints '
                          'there); move it or use another --workdir')
    steps = step_dirs(directory)
    if resume_step is not None and not _resumed_from(directory, steps, resume_step):
        if resume_step not in steps:
            raise ConfigError(f'--resume_step={resume_step}: {directory} has no checkpoint '
                              f'of step {resume_step}; it has: '
                              f'{describe_checkpoints(directory)}')
        steps = [resume_step]
    for step in steps:
        try:
            meta = read_meta(directory, step)
        except CorruptCheckpoint:  # unreadable: restore_latest sets it aside later
            continue
        check_identity(directory, step, meta, config)
        return


def describe_os_error(error: BaseException) -> str:
    """The cause of a failed write in a few words: 'No space left on device', ..."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error)
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
        return os.strerror(int(code.group(1)))
    for marker in ('RESOURCE_EXHAUSTED', 'PERMISSION_DENIED'):
        if marker in text:
            return marker.replace('_', ' ').lower()
    return describe_error(error)


def describe_error(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else ''
    return f'{type(error).__name__}: {first[:200]}' if not isinstance(
        error, CorruptCheckpoint) else first


# --- reading runs from outside the loop --------------------------------------------------------

def _numpy_restore(directory: epath.Path, step: int, parts: tuple[str, ...]) -> dict:
    """The ``state`` parts ``parts`` of ``step`` as numpy arrays (the others not read)."""
    handlers = {**_item_handlers(), 'state': ocp.PyTreeCheckpointHandler()}
    manager = ocp.CheckpointManager(
        directory, item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(create=False))
    try:
        tree = manager.item_metadata(step)['state']
        tree = getattr(tree, 'tree', tree)
        missing = [p for p in parts if p not in tree]
        if missing:
            raise KeyError(missing[0])
        wanted = {p: tree[p] for p in parts}
        # As host (numpy) arrays: valid in every process of a multi-process run, whatever
        # devices the checkpoint was written from.
        as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                          wanted)
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=wanted, restore_args=as_numpy, partial_restore=True)))['state']
    finally:
        manager.close()


def load_variables(workdir, step: int | None = None, weights: str = 'raw',
                   config: ml_collections.ConfigDict | None = None) -> tuple[dict, int]:
    """``({'params', 'batch_stats'}, step)`` of a run's latest (or given) checkpoint, as
    numpy arrays, read and checked against their checksums without reading the rest of
    the state; the workdir of a training run or of ``resnet-jax convert``.
    ``weights='ema'``: the exponential moving average of a run trained with
    ``ema_decay > 0``. With ``config``, a checkpoint of another model is refused before
    anything is read. A corrupt latest checkpoint is passed over (with a warning) for the
    previous one; a corrupt ``step``, asked for by number, is an error."""
    if weights not in WEIGHTS:
        raise ConfigError(f'unknown weights {weights!r}; allowed: {", ".join(WEIGHTS)}')
    directory = epath.Path(workdir).absolute() / 'checkpoints'
    if not directory.is_dir():
        raise ConfigError(f'no checkpoints in {workdir}')
    steps = step_dirs(directory)
    if not steps:
        raise ConfigError(f'no checkpoint in {directory}')
    if step is not None and step not in steps:
        raise ConfigError(f'{directory} has no checkpoint of step {step}; it has steps '
                          f'{", ".join(map(str, sorted(steps)))}')
    for candidate in [step] if step is not None else steps:
        try:
            meta = read_meta(directory, candidate)
            if config is not None:
                check_model(directory, candidate, meta, config)
            if weights == 'ema' and not _has_ema(meta):
                raise ConfigError(f'{workdir} has no EMA of the weights (its run had '
                                  "ema_decay=0); use weights='raw'")
            part = 'ema' if weights == 'ema' else None
            state = _numpy_restore(directory, candidate,
                                   (part,) if part else ('params', 'batch_stats'))
            verify((meta.get('checksums') or {}).get('parts'), 'state', state)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001
            if step is not None:
                raise ConfigError(f'checkpoint step {step} in {directory} is corrupt '
                                  f'({describe_error(e)})') from None
            print(f'warning: checkpoint step {candidate} in {directory} is corrupt '
                  f'({describe_error(e)}); using the previous one', flush=True)
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


def check_model(directory: epath.Path, step: int, meta: dict,
                config: ml_collections.ConfigDict) -> None:
    """CheckpointMismatch where the network recorded with a checkpoint
    (``config.ARCHITECTURE_FIELDS``) differs from ``config.model``'s: what evaluation and
    loading check before reading weights."""
    recorded = {k: v for k, v in config_lib.recorded_identity(meta).items()
                if k in config_lib.ARCHITECTURE_FIELDS}
    differences = config_lib.identity_differences(recorded, config)
    if differences:
        listed = ', '.join(f'{field} {_format(saved)} (this config: {_format(mine)})'
                           for field, saved, mine in differences)
        raise CheckpointMismatch(f'checkpoint step {step} in {directory} holds another '
                                 f'model: {listed}; evaluate it with its own config (leave '
                                 'out --config) or pass the config it was trained with')


def run_config(workdir) -> ml_collections.ConfigDict:
    """The config a run's ``config.json`` records (ConfigError if it has none)."""
    path = epath.Path(workdir) / 'config.json'
    if not path.exists():
        raise ConfigError(f'{workdir} has no config.json: not a resnet_jax run; pass '
                          'its config')
    try:
        return config_lib.from_dict(json.loads(path.read_text()))
    except ValueError as e:
        raise ConfigError(f'{path} cannot be read: {str(e).splitlines()[0]}') from None


def check_run_model(workdir, config: ml_collections.ConfigDict,
                    step: int | None = None) -> None:
    """CheckpointMismatch (before anything is read but the meta files) when the
    checkpoint ``load_variables`` would read first (``step``, or the latest readable
    one) holds another network than ``config``'s."""
    directory = epath.Path(workdir).absolute() / 'checkpoints'
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


def load(workdir, step: int | None = None,
         config: ml_collections.ConfigDict | None = None, weights: str = 'raw') -> LoadedRun:
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
    return LoadedRun(config_lib.model_from_config(config, num_classes), variables, config,
                     step)


def save_variables(workdir, variables: dict, config: ml_collections.ConfigDict,
                   **meta: Any) -> epath.Path:
    """Writes ``variables`` (params and batch_stats) as step 0 of a workdir, with its
    ``config.json`` and checksums: what ``resnet-jax evaluate``, ``load`` and
    ``init_from`` read. Used for converted weights."""
    workdir = epath.Path(workdir).absolute()
    if (workdir / 'config.json').exists() or (workdir / 'checkpoints').exists():
        raise ConfigError(f'{workdir} already holds a run (config.json or checkpoints/); '
                          'write converted weights into a new folder')
    workdir.mkdir(parents=True, exist_ok=True)
    variables = jax.tree_util.tree_map(np.asarray, dict(variables))
    manager = ocp.CheckpointManager(workdir / 'checkpoints', item_names=('state', 'meta'))
    parts = checksums(variables, {})
    parts.pop('train_metrics')
    manager.save(0, args=ocp.args.Composite(
        state=ocp.args.StandardSave(variables),
        meta=ocp.args.JsonSave({'identity': config_lib.identity(config), **meta,
                                'checksums': {'algorithm': CHECKSUM, 'parts': parts},
                                'history': {'train': [], 'eval': []}})))
    manager.wait_until_finished()
    manager.close()
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
    return workdir
