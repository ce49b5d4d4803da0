"""Workdirs in a Cloud Storage bucket, as on a pod, against a real GCS server on localhost
(conftest's ``gcs``): training, resuming, loading and starting from it, and the bad URLs
refused before anything is written. Killed in a bucket: test_faults."""

import json
import os

import pytest
from etils import epath
from test_train import tiny_config

import resnet_jax
from resnet_jax import paths
from resnet_jax.config import ConfigError
from resnet_jax.training import loop as train


def json_in(path):
    return json.loads(epath.Path(path).read_text())


def test_a_run_in_a_bucket_trains_resumes_and_loads_from_it(gcs, data_dir, tmp_path):
    """In-process: the run's files land in the bucket, none on the local disk; a second
    call resumes from the bucket's checkpoints; ``load`` and ``init_from`` read them."""
    os.chdir(tmp_path)  # where a path mistaken for a local one would appear
    workdir = f'{gcs()}/runs/first'
    results = train.train_and_evaluate(tiny_config(data_dir), workdir)
    assert results['step'] == 6 and os.listdir(tmp_path) == []
    names = {p.name for p in epath.Path(workdir).iterdir()}
    assert {'checkpoints', 'config.json', 'results.json', 'history.json', 'curves.png'} <= names
    assert any(n.startswith('events.out.tfevents.') for n in names)
    assert json_in(f'{workdir}/results.json')['step'] == 6
    assert train.train_and_evaluate(tiny_config(data_dir, num_train_steps=7), workdir)['step'] == 7
    loaded = resnet_jax.load(workdir)
    assert loaded.step == 7 and loaded.variables['params']['fc']['kernel'].shape == (64, 10)
    # A new run started from the bucket's weights, its own workdir local.
    config = tiny_config(data_dir, num_train_steps=1, init_from=workdir)
    train.train_and_evaluate(config, str(tmp_path / 'local'))
    assert json_in(tmp_path / 'local' / 'results.json')['step'] == 1


def test_bad_urls_are_refused_before_anything_is_written(gcs, data_dir, tmp_path):
    os.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r'^workdir gs://no-such-bucket/run is not writable'):
        train.train_and_evaluate(tiny_config(data_dir), 'gs://no-such-bucket/run')
    with pytest.raises(ConfigError, match=r'^ftp://host/run: cannot open ftp:// paths'):
        train.train_and_evaluate(tiny_config(data_dir), 'ftp://host/run')
    with pytest.raises(ConfigError, match='init_from gs://.*/nothing holds no checkpoints'):
        train.train_and_evaluate(
            tiny_config(data_dir, init_from=f'{gcs()}/nothing'), str(tmp_path / 'run')
        )
    assert os.listdir(tmp_path) == []  # no folder named gs: or ftp:, no run


def test_a_missing_file_system_names_its_extra(monkeypatch):
    monkeypatch.setitem(paths.BUCKETS, 'gs', ('no_such_gcsfs', 'gcs'))
    with pytest.raises(ConfigError, match=r'gs:// paths need no_such_gcsfs: pip install'):
        paths.resolve('gs://bucket/run')
