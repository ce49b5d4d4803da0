"""Workdirs in a Cloud Storage bucket, as on a pod, against a real GCS server on localhost
(conftest's ``gcs``): training, resuming, loading and starting from it, and the bad URLs
refused before anything is written. Killed in a bucket: test_faults."""

import json
import os
import pathlib
import sys

import forked
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from photos import make_photo_folder
from test_train import tiny_config

import resnet_jax
from resnet_jax import models, paths
from resnet_jax.config import ConfigError
from resnet_jax.data.folder_listing import list_folder
from resnet_jax.tools import convert
from resnet_jax.training import loop as train


def json_in(path):
    return json.loads(epath.Path(path).read_text())


def test_a_run_in_a_bucket_trains_resumes_and_loads_from_it(gcs, data_dir, tmp_path, capsys):
    """In-process: the run's files land in the bucket, none on the local disk; a second
    call resumes from the bucket's checkpoints; ``load`` and ``init_from`` read them (the
    latter into a network that computes another function, with a warning naming why)."""
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
    # its inputs as its pipeline made them: the mean image it kept ('mean' preprocessing)
    from resnet_jax.data.pipeline import Pipeline

    mean = Pipeline(loaded.config.dataset, 0).mean
    images = np.random.default_rng(0).integers(0, 256, (2, *mean.shape), np.uint8)
    np.testing.assert_allclose(
        resnet_jax.preprocess(images, workdir), images / 255.0 - mean, rtol=1e-5, atol=1e-6
    )
    # A new run started from the bucket's weights, its own workdir local.
    config = tiny_config(data_dir, num_train_steps=1, init_from=workdir)
    config.model.bn_epsilon = 1.001e-5  # (Keras' value: the same shapes, another function)
    capsys.readouterr()
    train.train_and_evaluate(config, str(tmp_path / 'local'))
    assert json_in(tmp_path / 'local' / 'results.json')['step'] == 1
    assert (
        f'warning: init_from {workdir} was trained as another network: model.bn_epsilon '
        '1e-05 (this config: 1.001e-05); its weights are used where their shapes agree\n'
    ) in capsys.readouterr().out


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


def upload(local, url):
    """A local tree copied into a bucket, as ``gcloud storage cp -r`` leaves it."""
    for path in sorted(pathlib.Path(local).rglob('*')):
        if path.is_file():
            epath.Path(url, str(path.relative_to(local))).write_bytes(path.read_bytes())
    return url


def test_datasets_in_a_bucket_train(gcs, data_dir, tmp_path_factory, tmp_path, monkeypatch):
    """A tfds data_dir (ArrayRecord read from the bucket) and a folder of images, each in a
        bucket; the folder is listed as its local copy is, its index kept in the bucket (and
    copied into the local cache, where the input workers map it)."""
    os.chdir(tmp_path)
    monkeypatch.setenv('HOME', str(tmp_path_factory.mktemp('home')))
    bucket = gcs()
    tfds_dir = upload(data_dir, f'{bucket}/tfds')
    steps = {'num_train_steps': 2, 'eval_every_steps': 2, 'checkpoint_every_steps': 2}
    results = train.train_and_evaluate(tiny_config(tfds_dir, **steps), f'{bucket}/runs/tfds')
    assert results['step'] == 2

    photos = make_photo_folder(tmp_path_factory.mktemp('photos'), layout='train/val')
    url = upload(photos, f'{bucket}/photos')
    local, remote = list_folder(str(photos)), list_folder(url)
    assert remote['files'] == local['files'] and remote['classes'] == local['classes']
    np.testing.assert_array_equal(remote['splits'], local['splits'])
    config = tiny_config(None, **steps)
    config.dataset.update(name=f'folder:{url}', image_size=32, num_workers=1)
    config.batch_size, config.eval_batch_size = 8, 4  # 12 training images
    results = train.train_and_evaluate(config, f'{bucket}/runs/folder')
    assert results['step'] == 2 and results['corrupt_records_skipped'] > 0
    store = epath.Path(url, '.resnet_jax')
    assert json.loads((store / 'info.json').read_text())['num_val'] == 3
    assert os.listdir(tmp_path) == []


def test_bad_data_dirs_in_a_bucket_are_refused(gcs, tmp_path):
    os.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r'^dataset.data_dir gs://no-such-bucket/t does not'):
        train.train_and_evaluate(tiny_config('gs://no-such-bucket/t'), f'{gcs()}/run')
    bucket = gcs()
    epath.Path(bucket, 'tfds', 'README').write_text('datasets here')
    config = tiny_config(f'{bucket}/tfds')
    config.dataset.name = 'imagenet2012'
    with pytest.raises(ConfigError, match=rf'^imagenet2012 is not prepared in {bucket}/tfds;'):
        train.train_and_evaluate(config, f'{bucket}/run')
    assert not epath.Path(bucket, 'run').exists() and os.listdir(tmp_path) == []


def test_weights_in_and_out_of_a_bucket(gcs, tmp_path):
    """Converted weights written into a bucket, ``convert --to=torchvision`` reading that
    workdir and writing its file there, and the file read back: the same variables."""
    os.chdir(tmp_path)
    bucket = gcs()
    model = models.create_model('resnet18', num_classes=10)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
        jnp.zeros((1, 32, 32, 3))
    )
    workdir = convert.save_converted(model, variables, None, 'torchvision', f'{bucket}/r18')
    assert str(workdir) == f'{bucket}/r18'
    proc = forked.run(
        [sys.executable, '-m', 'resnet_jax', 'convert', '--to=torchvision']
        + [f'--workdir={workdir}', f'--output={bucket}/r18.safetensors'],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, back, kind = convert.load_weights(f'{bucket}/r18.safetensors')
    assert kind == 'torchvision'
    jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(variables))
    jax.tree.map(np.testing.assert_array_equal, resnet_jax.load(workdir).variables, back)
    assert os.listdir(tmp_path) == []
