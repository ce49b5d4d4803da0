"""Steps kept on disk as exported programs (``step_cache``): a relaunch compiles them
without tracing, to the same executable, and anything that changes the program changes
the key."""

import jax
import numpy as np
import pytest

from resnet_jax import benchmark, parallel, step_cache


def _setup(tmp_path, **kwargs):
    return benchmark.setup('cifar_resnet8', 8, image_size=8, step_cache_dir=str(tmp_path),
                           **kwargs)


def _copy(state):
    """A new copy of ``state`` (the step donates its state)."""
    return jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x), x.sharding), state)


def _run(s):
    state, metrics = s['train_fn'](_copy(s['state']), s['batch'])
    return jax.tree_util.tree_map(np.asarray, (state.params, metrics.loss.total))


def _traces(monkeypatch):
    """Counts the train steps traced from now on."""
    from resnet_jax import steps
    calls = []
    original = steps.train_step
    monkeypatch.setattr(steps, 'train_step', lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.fixture(scope='module')
def first_launch(tmp_path_factory):
    """A first launch: the train step compiled and stored, and what one step gives."""
    directory = tmp_path_factory.mktemp('steps')
    s = _setup(directory)
    result = _run(s)
    return directory, s, result


def test_a_relaunch_loads_the_stored_step_without_tracing_and_gives_the_same_step(
        first_launch, monkeypatch):
    directory, s, result = first_launch
    assert not s['train_fn'].loaded
    assert [p.name.split('-')[0] for p in directory.iterdir()] == ['train_step']
    traced = _traces(monkeypatch)
    again = _setup(directory)
    assert _run(again) is not None and again['train_fn'].loaded and not traced
    for a, b in zip(jax.tree_util.tree_leaves(result), jax.tree_util.tree_leaves(_run(
            _setup(directory)))):
        np.testing.assert_array_equal(a, b)  # the same executable: the same bits


def test_what_changes_the_program_changes_the_key(first_launch, monkeypatch):
    directory, s, _ = first_launch
    path = s['train_fn'].path(s['state'], s['batch'])
    other_batch = dict(s['batch'], image=s['batch']['image'][:4])
    assert s['train_fn'].path(s['state'], other_batch) != path  # the arguments
    assert _setup(directory, compiler_options={'xla_cpu_prefer_vector_width': 128})[
        'train_fn'].path(s['state'], s['batch']) != path  # the plan's options
    monkeypatch.setattr(step_cache, 'source_digest', lambda: 'edited')
    assert s['train_fn'].path(s['state'], s['batch']) != path  # the package's source
    monkeypatch.undo()
    monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_enable_fast_math=true')
    assert s['train_fn'].path(s['state'], s['batch']) != path  # XLA's flags


def test_a_changed_config_compiles_its_own_step(first_launch, monkeypatch):
    directory, s, _ = first_launch
    config = s['config'].copy_and_resolve_references()
    config.label_smoothing = 0.1
    from resnet_jax import optim, steps
    lr_fn = optim.create_learning_rate_fn(config)
    train_fn, _ = steps.compile_steps(s['model'], optim.create_optimizer(config, lr_fn), lr_fn,
                                      config, s['mesh'], s['plan'], cache_dir=str(directory))
    assert train_fn.path(s['state'], s['batch']) != s['train_fn'].path(s['state'], s['batch'])


def test_a_damaged_entry_is_compiled_again_and_replaced(first_launch, tmp_path):
    _, s, result = first_launch
    fresh = _setup(tmp_path)
    _run(fresh)
    [entry] = tmp_path.iterdir()
    stored = entry.read_bytes()
    entry.write_bytes(stored[:len(stored) // 2])
    again = _setup(tmp_path)
    for a, b in zip(jax.tree_util.tree_leaves(result), jax.tree_util.tree_leaves(_run(again))):
        np.testing.assert_array_equal(a, b)
    assert not again['train_fn'].loaded
    third = _setup(tmp_path)  # the entry was replaced by one that loads
    _run(third)
    assert third['train_fn'].loaded


def test_the_cached_step_donates_the_state_like_the_jitted_one(first_launch):
    _, s, _ = first_launch
    state = _copy(s['state'])
    s['train_fn'](state, s['batch'])
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(state))


def test_other_argument_types_run_the_jitted_step(first_launch):
    _, s, _ = first_launch
    _run(s)
    half = parallel.shard_batch(s['mesh'], {k: np.asarray(v)[:4] for k, v in s['batch'].items()})
    state, metrics = s['train_fn'](_copy(s['state']), half)
    assert np.isfinite(float(metrics.loss.compute()))
