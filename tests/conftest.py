"""Shared fixtures. Four host-platform CPU devices, so data-parallel code runs on a mesh."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
# Most tests compile small programs and run them a few times: XLA's LLVM optimisation costs
# more than it saves there (JAX's own switch for that case; the same HLO programs, compiled
# at -O0). Inherited by the workers and every process the tests launch; the end-to-end runs
# of the default recipe turn it off (``run_main(optimized=True)``). JAX reads it at import.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')


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
        os.sched_setaffinity(0, cores[i * len(cores) // count:(i + 1) * len(cores) // count])


_pin_xdist_worker()

import importlib.util  # noqa: E402
import pathlib  # noqa: E402
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


# The longest tests: the default recipe run to the end (~7 min each beside the other worker).
_LONGEST = ('test_default_run_reaches_below_3_percent_and_resumes',
            'test_lars_trains_the_default_run_below_5_percent')


def pytest_collection_modifyitems(config, items):
    """Longest first: the modules holding the end-to-end runs start the session (each on
    its own xdist worker, with its run first), so the short tests fill in around them
    rather than leaving one worker idle at the end."""
    first = {item.module.__name__ for item in items
             if getattr(item, 'originalname', item.name) in _LONGEST}

    def key(item):
        module = item.module.__name__
        if module not in first:
            return (1, '', 1)  # the rest keep their order (the sort is stable)
        return (0, module, int(getattr(item, 'originalname', item.name) not in _LONGEST))
    items.sort(key=key)


def pytest_unconfigure(config):
    if _CACHE_DIR:  # removed by the process that made it, at the end of the session
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)

import pytest  # noqa: E402


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI=true), a skipped interop test fails: the CI installs the interop extra,
    so a skip there means a library went missing, not that it is optional."""
    report = yield
    if report.skipped and os.environ.get('CI') == 'true' and item.get_closest_marker('interop'):
        report.outcome = 'failed'
        report.longrepr = f'interop test skipped in CI: {report.longrepr}'
    return report


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


def run_main(*args: str, devices: int = 1, timeout: float = 1800, cwd=REPO,
             optimized: bool = False, python_flags=()) -> subprocess.CompletedProcess:
    """Runs ``python -m resnet_jax.main`` as a user would, on ``devices`` CPU devices;
    ``optimized``: with XLA's full optimisation, as users run (for runs of many steps)."""
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    if optimized:
        env.pop('JAX_DISABLE_MOST_OPTIMIZATIONS', None)
    return subprocess.run([sys.executable, *python_flags, '-m', 'resnet_jax.main', *args],
                          cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='session')
def photos_dir(tmp_path_factory) -> str:
    """A tfds data_dir holding the photos dataset (tests/photos.py), built once per session."""
    import photos
    return photos.build(str(tmp_path_factory.mktemp('photos')))
