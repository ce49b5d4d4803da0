"""The checkpoints of a training run, through orbax's CheckpointManager.

Each step holds ``state`` (in the model's own tree), ``train_metrics`` (since the last log
line, so a resumed run logs what an uninterrupted one would) and ``meta`` (JSON: identity,
checksums, metric history, loss, parameter norm, ``rolled_back_to`` after a rollback). A
step that cannot be read or fails its checksums is kept aside as ``corrupt-<step>-<time>``.
Saves are asynchronous; one that fails raises ``CheckpointWriteError`` at once or at the
next ``poll``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from resnet_jax import config as config_lib
from resnet_jax import paths
from resnet_jax.training.checksums import CHECKSUM, CorruptCheckpoint, checksums, leaf_names, verify
from resnet_jax.training.run_identity import (
    CheckpointMismatch,
    check_identity,
    describe_checkpoints,
    read_meta,
    resumed_from,
    step_dirs,
)


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written; the earlier ones are kept."""


def _tree_differences(saved: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """The first difference between two ``{name: (shape, dtype)}`` tables, or None."""
    for name in sorted(set(saved) | set(expected)):
        if name not in saved:
            return f'it has no {name}'
        if name not in expected:
            return f"it holds {name}, which this config's state has not"
        if saved[name] != expected[name]:
            return f"its {name} is {saved[name]}, this config's {expected[name]}"
    return None


def _shapes(tree: Any) -> dict[str, tuple]:
    return {name: (tuple(leaf.shape), np.dtype(leaf.dtype).name) for name, leaf in leaf_names(tree)}


def _agree_all(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (one all-gather on several)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(flag))))


def item_handlers() -> dict:
    return {
        'state': ocp.StandardCheckpointHandler(),
        'train_metrics': ocp.StandardCheckpointHandler(),
        'meta': ocp.JsonCheckpointHandler(),
    }


class Start(NamedTuple):
    """What ``Checkpointer.start`` returns: the state (in the steps' layout), the metrics of
    its unfinished log window, the history, and the step resumed from (None: a new run)."""

    state: Any
    metrics: Any
    history: dict
    resumed_step: int | None


class Checkpointer:
    """The checkpoints of one training run: saves on request (asynchronously), keeps the
    last ``config.keep_checkpoints`` steps, restores the latest good one, and finds any
    failure to save at once (``poll`` after every step)."""

    def __init__(
        self, directory: epath.Path, config: ml_collections.ConfigDict, on_first_save=None
    ):
        self.config = config
        self.identity = config_lib.identity(config)
        self.directory = paths.resolve(directory)  # absolute, as orbax needs
        # Directories created in this thread, so that save() raises where that fails instead
        # of orbax's writer threads waiting for a directory that never comes.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints,
            create=True,
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=item_handlers()
        )
        self.rolled_back_to: int | None = None
        self._pending: int | None = None  # a step being written in the background
        self._on_first_save = on_first_save  # called once the first save is complete
        self._layout = None  # how the run's steps hold the state (start's); None: as the model
        self._closed = False

    # -- saving ---------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        metrics: Any,
        history: dict,
        loss: float | None = None,
        param_norm: float | None = None,
    ) -> None:
        """Starts writing ``step`` of ``state`` (in ``start``'s layout); a no-op when it is
        saved. CheckpointWriteError if an earlier save failed or this one cannot start."""
        self.wait()  # orbax waits for the previous save anyway: its failure is its own
        if step in self.manager.all_steps():
            return
        if self._layout is not None:
            state = self._layout.to_model(state)
        meta = {
            'identity': self.identity,
            'history': copy.deepcopy(history),
            'loss': loss,
            'param_norm': param_norm,
            'checksums': {'algorithm': CHECKSUM, 'parts': checksums(state, metrics)}
            if jax.process_index() == 0
            else None,
        }
        if self.rolled_back_to is not None:
            meta['rolled_back_to'] = self.rolled_back_to
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    train_metrics=ocp.args.StandardSave(metrics),
                    meta=ocp.args.JsonSave(meta),
                ),
                force=True,
            )
        except Exception as e:  # noqa: BLE001 (orbax and the file system raise many types)
            raise self.write_error(e, step) from None
        self._pending = step

    def poll(self) -> None:
        """CheckpointWriteError if the save in the background failed; free while it runs."""
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
        except Exception as e:
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
                raise self.write_error(e, target=e.filename or "the run's config.json") from None

    def _why_unwritable(self) -> Exception:
        try:
            faults_check = self.directory / f'.write-test-{os.getpid()}'
            faults_check.write_text('')
            faults_check.unlink()
        except OSError as e:
            return e
        return RuntimeError('orbax did not commit it')

    def write_error(
        self, error: Exception, step: int | None = None, target: str | None = None
    ) -> CheckpointWriteError:
        """The error of a write that failed (of checkpoint ``step``, or of ``target``),
        naming its cause and the last complete checkpoint."""
        done = [s for s in step_dirs(self.directory) if s != step]
        last = (
            f'the last complete checkpoint is step {done[0]} (kept)'
            if done
            else 'no checkpoint of this run is complete'
        )
        target = target or f'checkpoint step {step} in {self.directory}'
        return CheckpointWriteError(
            f'cannot write {target}: {describe_os_error(error)}; {last}. Free space or fix '
            'the folder, then relaunch the same command to resume'
        )

    def close(self) -> None:
        """Waits for the last save (raising its failure) and releases orbax's threads."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            with contextlib.suppress(Exception):  # a failure already reported by wait
                self.manager.close()

    # -- restoring ------------------------------------------------------------------------

    def start(
        self,
        fresh: Any,
        metrics: Any,
        layout: Any = None,
        start_from: Callable[[Any], Any] | None = None,
    ) -> Start:
        """The state a launch trains from, in ``layout`` (the steps' ``StateLayout``; None:
        the model's tree): the latest good checkpoint, else ``start_from(fresh)``, else
        ``fresh``. ``fresh`` and ``metrics`` are also the templates of a restore."""
        self._layout = layout
        from_model = layout.from_model if layout is not None else lambda state: state
        restored = self.restore_latest(fresh, metrics)
        if restored is not None:
            state, metrics, meta = restored
            return Start(from_model(state), metrics, meta['history'], int(state.step))
        state = start_from(fresh) if start_from is not None else fresh
        return Start(from_model(state), metrics, {'train': [], 'eval': []}, None)

    def restore_latest(self, state: Any, metrics: Any) -> tuple[Any, Any, dict] | None:
        """``(state, metrics, meta)`` of the latest good checkpoint (corrupt ones set aside),
        or None; ``state`` and ``metrics`` are templates. CheckpointMismatch if it does not
        fit the config."""
        for step in step_dirs(self.directory):
            try:
                meta = read_meta(self.directory, step)
                check_identity(self.directory, step, meta, self.config)
                self._check_tree(step, state, metrics)
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(state),
                        train_metrics=ocp.args.StandardRestore(metrics),
                    ),
                )
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
            saved = {
                'state': _shapes(metadata['state']),
                'train_metrics': _shapes(metadata['train_metrics']),
            }
        except Exception as e:
            raise CorruptCheckpoint(
                f'its array metadata cannot be read ({type(e).__name__})'
            ) from None
        for item, template in (('state', state), ('train_metrics', metrics)):
            difference = _tree_differences(saved[item], _shapes(template))
            if difference:
                raise CheckpointMismatch(
                    f'checkpoint step {step} in {self.directory} does not fit this config: '
                    f'{item}: {difference}; use another --workdir, or start a run from its '
                    f'weights with --config.init_from={self.directory.parent}'
                )

    def set_aside(self, step: int, error, prefix: str = 'corrupt') -> None:
        """Moves ``step`` out of orbax's sight as ``<prefix>-<step>-<time>``, keeping its
        files, with a one-line warning."""
        reason = error if isinstance(error, str) else describe_error(error)
        if prefix == 'corrupt' and jax.process_index() == 0:  # one line for the run
            print(
                f'warning: checkpoint step {step} is corrupt ({reason}); it is kept as '
                f'corrupt-{step}-* and the previous checkpoint is used',
                flush=True,
            )
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(
                self.directory / f'{prefix}-{step}-{int(time.time())}'
            )
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f'set_aside_{prefix}_{step}')
        self.manager.reload()

    def roll_back(self, step: int) -> None:
        """Makes ``step`` the latest checkpoint: later ones are kept aside as
        ``rolled-back-<step>-<time>``, and this run's checkpoints record ``step``. Nothing
        moves when the latest was written by a run already resumed from ``step``."""
        steps = step_dirs(self.directory)
        resumed = resumed_from(self.directory, steps, step)
        if jax.process_count() > 1:  # all have listed the steps before process 0 moves one
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f'roll_back_{step}_listed')
        if resumed:
            return
        self.rolled_back_to = step
        later = [s for s in steps if s > step]
        for s in later:
            self.set_aside(s, 'rolled back', prefix='rolled-back')
        if later and jax.process_index() == 0:
            print(
                f'resuming from step {step}: the later checkpoints '
                f'({", ".join(map(str, sorted(later)))}) are kept as '
                f'{self.directory}/rolled-back-<step>-<time>',
                flush=True,
            )

    def describe(self) -> str:
        """The checkpoints on disk with their loss and parameter norm, for messages."""
        return describe_checkpoints(self.directory)


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
    return (
        f'{type(error).__name__}: {first[:200]}'
        if not isinstance(error, CorruptCheckpoint)
        else first
    )
