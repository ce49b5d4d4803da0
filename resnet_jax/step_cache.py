"""Train and eval steps kept on disk as exported programs, so that a relaunch does not
trace them.

JAX's persistent compilation cache (``parallel.enable_compilation_cache``) finds an
executable by its lowered program, so a relaunch still traces and lowers the step before
it looks: for a CIFAR ResNet's train step on CPU, 1.5-2 s of its relaunch. This cache
keeps the lowered program itself (``jax.export``, StableHLO), found by what the program is
made from: the source of this package, the versions of the libraries that trace it, JAX's
settings and ``XLA_FLAGS``, the devices, a description of the step (the run's config,
the model, the execution plan) and the shapes, dtypes and shardings of the arguments. A
relaunch reads the program and compiles it, which JAX's cache then answers; when any of
those inputs differs, the key differs and the step is traced as usual, then stored.

Only the program is kept here; the executables stay in JAX's cache, which compiles and
serialises them (an XLA:CPU executable that was itself loaded from a cache cannot be
serialised again: jaxlib 0.10 writes it without its kernels).

The description must determine the traced program: ``train.train_and_evaluate`` uses the
cache for models and optimisers built from the config by this package's own functions,
in single-process runs. An entry that cannot be read is traced again and replaced.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import sys
import tempfile
from typing import Any, Callable

import jax
from jax import export

# The libraries whose code is traced into a step.
_LIBRARIES = ('jax', 'jaxlib', 'flax', 'optax', 'clu', 'numpy')


@functools.cache
def source_digest() -> str:
    """SHA-256 of this package's Python source (every module, with its path)."""
    digest = hashlib.sha256()
    root = pathlib.Path(__file__).resolve().parent
    for path in sorted(root.rglob('*.py')):
        digest.update(str(path.relative_to(root)).encode() + b'\0' + path.read_bytes())
    return digest.hexdigest()


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ''


def environment() -> dict[str, Any]:
    """What besides a step's own description decides the program it lowers to."""
    devices = jax.devices()
    return {
        'source': source_digest(),
        'python': sys.version,
        'libraries': {name: _version(name) for name in _LIBRARIES},
        'jax_config': {k: repr(v) for k, v in sorted(jax.config.values.items())},
        'xla_flags': os.environ.get('XLA_FLAGS', ''),
        'platform_version': devices[0].client.platform_version,
        'devices': [(d.id, d.platform, d.device_kind, d.process_index) for d in devices],
    }


def describe(obj: Any) -> str:
    """``repr(obj)`` without memory addresses (a module's repr names the functions
    injected into it, 'at 0x...' differs from process to process)."""
    return re.sub(r' at 0x[0-9a-f]+', '', repr(obj))


def arguments_signature(args: tuple) -> dict[str, Any]:
    """The tree structure, shapes, dtypes and shardings of a step's arguments."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return {'tree': str(treedef),
            'leaves': [(tuple(x.shape), str(x.dtype), str(getattr(x, 'sharding', None)))
                       for x in leaves]}


def _per_leaf(prefix: tuple, args: tuple) -> list:
    """``prefix`` (one value per argument) repeated for each leaf of that argument."""
    return [value for value, arg in zip(prefix, args)
            for _ in jax.tree_util.tree_leaves(arg)]


class CachedStep:
    """``jax.jit(fun, in_shardings=..., out_shardings=..., donate_argnums=...,
    compiler_options=...)`` whose lowered program is kept in ``directory``.

    The first call loads the program for its arguments (or traces and stores it) and
    compiles it; later calls with arguments of the same types run that executable, others
    run ``fun`` jitted as usual. ``in_shardings`` holds one sharding per argument,
    ``out_shardings`` one for every output; ``description`` (JSON-able) must determine
    the program, with ``environment()`` and the arguments' signature it is the key;
    ``outputs_like`` maps the arguments to a tree with the structure of the outputs.
    """

    def __init__(self, fun: Callable, *, in_shardings: tuple, out_shardings: Any,
                 donate_argnums: tuple[int, ...] = (), compiler_options: dict | None = None,
                 directory: str | os.PathLike, name: str, description: Any,
                 outputs_like: Callable[..., Any]):
        self._fn, self._in_shardings, self._out_sharding = fun, in_shardings, out_shardings
        self._donate, self._options = donate_argnums, compiler_options
        self._directory, self._name = pathlib.Path(directory), name
        self._description, self._outputs_like = description, outputs_like
        self._jitted = jax.jit(fun, in_shardings=in_shardings, out_shardings=out_shardings,
                               donate_argnums=donate_argnums, compiler_options=compiler_options)
        self._call = None
        self.loaded = False  # whether the program came from the directory

    def path(self, *args) -> pathlib.Path:
        """The file of the program for ``args``."""
        key = json.dumps({'step': self._description, 'environment': environment(),
                          'arguments': arguments_signature(args)}, sort_keys=True, default=str)
        return self._directory / f'{self._name}-{hashlib.sha256(key.encode()).hexdigest()}.jax'

    def _flat_jit(self, fn: Callable, args: tuple) -> Any:
        """``fn`` of the arguments' leaves, jitted with this step's options per leaf."""
        donated = _per_leaf([i in self._donate for i in range(len(args))], args)
        return jax.jit(fn, in_shardings=_per_leaf(self._in_shardings, args),
                       out_shardings=self._out_sharding,
                       donate_argnums=tuple(i for i, d in enumerate(donated) if d),
                       compiler_options=self._options)

    def _export(self, args: tuple, out_tree) -> export.Exported | None:
        """The step's program for ``args`` (None where its outputs are not ``out_tree``)."""
        in_tree = jax.tree_util.tree_structure(args)
        traced_out_tree = []

        def flat(*leaves):
            outputs = self._fn(*jax.tree_util.tree_unflatten(in_tree, leaves))
            leaves, treedef = jax.tree_util.tree_flatten(outputs)
            traced_out_tree.append(treedef)
            return leaves

        exported = export.export(self._flat_jit(flat, args))(*jax.tree_util.tree_leaves(args))
        return exported if traced_out_tree == [out_tree] else None

    def _program(self, args: tuple, out_tree) -> export.Exported | None:
        path = self.path(*args)
        try:
            exported = export.deserialize(bytearray(path.read_bytes()))
            if len(exported.out_avals) == out_tree.num_leaves:
                self.loaded = True
                return exported
        except Exception:  # noqa: BLE001 (absent or damaged: traced again below)
            pass
        exported = self._export(args, out_tree)
        if exported is not None:
            _write(path, exported.serialize())
        return exported

    def compile(self, *args) -> Callable:
        """The step compiled for ``args`` (its program loaded or traced and stored)."""
        if self._call is None:
            out_tree = jax.tree_util.tree_structure(self._outputs_like(*args))
            exported = self._program(args, out_tree)
            if exported is None:  # the outputs are not shaped like ``outputs_like``'s
                self._call = self._jitted.lower(*args).compile()
            else:
                compiled = self._flat_jit(exported.call, args).lower(
                    *jax.tree_util.tree_leaves(args)).compile()
                self._call = functools.partial(
                    _call_flat, compiled, jax.tree_util.tree_structure(args), out_tree)
        return self._call

    def __call__(self, *args):
        call = self.compile(*args)
        try:
            return call(*args)
        except TypeError:  # other argument types than those compiled for
            return self._jitted(*args)


def _call_flat(compiled, in_tree, out_tree, *args):
    """``compiled`` (a function of the arguments' leaves) called on ``args``."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    if treedef != in_tree:
        raise TypeError(f'arguments {treedef} where the step was compiled for {in_tree}')
    return jax.tree_util.tree_unflatten(out_tree, compiled(*leaves))


def _write(path: pathlib.Path, payload: bytes) -> None:
    """``payload`` into ``path``, whole or not at all; a cache that cannot be written
    (read-only, full) is left as it is."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as f:
            temporary = f.name
            f.write(payload)
        os.replace(temporary, path)
    except OSError:
        if temporary is not None:
            pathlib.Path(temporary).unlink(missing_ok=True)
