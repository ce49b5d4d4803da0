"""Every path a user gives: a local path or a bucket URL (``gs://``, ``s3://``), as one
``epath.Path``. What a local disk gives and a bucket does not (the run's lock, renames,
free space) is asked for with ``is_local``."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import tempfile

from etils import epath

from resnet_jax.config import ConfigError

# Scheme -> the fsspec file system epath reaches it through, and the extra that brings it.
BUCKETS = {'gs': ('gcsfs', 'gcs'), 's3': ('s3fs', 's3')}
_SCHEME = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*)://')

if importlib.util.find_spec('fsspec'):
    import fsspec

    # Bucket listings from the store, not fsspec's cache: a run's checkpoints are listed
    # while other processes write them (a cached listing misses a step's commit file, and
    # the step looks incomplete). Set before the first file system is made, at import.
    for _protocol in ('gs', 'gcs', 's3'):
        fsspec.config.conf.setdefault(_protocol, {}).setdefault('use_listings_cache', False)


def scheme(path) -> str | None:
    match = _SCHEME.match(os.fspath(path))
    return match.group(1).lower() if match else None


def is_local(path) -> bool:
    return scheme(path) is None


def resolve(path) -> epath.Path:
    """``path`` as an absolute ``epath.Path``; ConfigError (one line) for a URL scheme this
    installation cannot open."""
    name = scheme(path)
    if name is None:
        return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))  # local: no URL
    if name not in BUCKETS:
        raise ConfigError(
            f'{path}: cannot open {name}:// paths (local paths, '
            + ' and '.join(f'{s}://' for s in BUCKETS)
            + ' only)'
        )
    module, extra = BUCKETS[name]
    # epath reaches buckets through TensorFlow's file system where TensorFlow is installed,
    # unless EPATH_USE_TF is false (as the command line sets it: cli_shared), else fsspec.
    through_tf = os.environ.get('EPATH_USE_TF', '').lower() not in ('false', 'no', 'f', '0')
    if not (through_tf and importlib.util.find_spec('tensorflow')) and not (
        importlib.util.find_spec(module)
    ):
        raise ConfigError(
            f'{path}: {name}:// paths need {module}: pip install "resnet_jax[{extra}]"'
        )
    return epath.Path(os.fspath(path))


def check_writable(path: epath.Path, what: str, shown=None) -> None:
    """ConfigError (one line) unless a file can be written and removed in ``path`` (in a
    bucket: the bucket exists and this machine's credentials may write to it)."""
    probe = path / f'.write-test-{os.getpid()}'
    try:
        probe.write_text('')
        probe.unlink()
    except Exception as e:  # each file system raises its own; the message says which
        raise ConfigError(f'{what} {shown or path} is not writable: {describe(e)}') from None


def check_not_dangling(path: epath.Path) -> None:
    """ValueError (one line) where ``path`` is a symbolic link to nowhere (writing through it
    would raise a bare errno)."""
    if is_local(path) and os.path.islink(path) and not os.path.exists(path):
        raise ValueError(
            f'{path} is a symbolic link to {os.readlink(path)}, which does not exist; '
            'remove the link or name another path'
        )


def check_new_file(path: epath.Path, overwrite: bool = False) -> None:
    """ValueError (one line) where writing ``path`` would replace a file without
    ``overwrite``, or follow a symbolic link to nowhere."""
    check_not_dangling(path)
    if path.exists() and (path.is_dir() or not overwrite):
        raise ValueError(
            f'{path} is a folder'
            if path.is_dir()
            else f'{path} exists; name a new file (or overwrite=True, --overwrite)'
        )


def write_atomically(path: epath.Path, data: str | bytes) -> None:
    """``path`` holds ``data`` whole or its previous contents: on a local disk a temporary
    file renamed; in a bucket an object is replaced whole when its upload completes."""
    write = type(path).write_bytes if isinstance(data, bytes) else type(path).write_text
    if not is_local(path):
        write(path, data)
        return
    temporary = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    try:
        write(temporary, data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def local_file(path: epath.Path):
    """``path`` itself on a local disk; an object in a bucket as a temporary local copy, for
    readers that open files by name (safetensors maps them, Keras reads buckets through
    TensorFlow's file system only)."""
    if is_local(path):
        yield path
        return
    with tempfile.TemporaryDirectory() as folder:
        local = epath.Path(folder, path.name)
        local.write_bytes(path.read_bytes())
        yield local


def describe(error: BaseException) -> str:
    text = getattr(error, 'strerror', None) or str(error) or type(error).__name__
    return text.strip().splitlines()[0]
