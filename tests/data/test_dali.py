"""The DALI input backend (``dataset.decoder='dali'``) against the PIL path, on DALI's CPU
operators (the real library; the ``dali`` extra): the same examples, crop boxes and flips,
pixels within a stated tolerance, on 4 devices' shards."""

import logging

import jax
import numpy as np
import pytest
from conftest import load_config
from photos import _jpeg, _small, make_photo_folder
from PIL import Image
from skimage import data as skdata

from resnet_jax import parallel
from resnet_jax.config import base_config
from resnet_jax.data import augment, dali, folder, sources
from resnet_jax.data import pipeline as data_pipeline
from resnet_jax.data.workers import InputError
from resnet_jax.training import loop

pytestmark = pytest.mark.dali

BATCH = 8  # two examples on each of the 4 test devices
# DALI's and PIL's bilinear, antialiased resampling of the same box of the same full-size
# decode differ by rounding: at most 1 level of 255 per pixel, 3 where a box shrinks 4x or
# more. The PIL path decodes big JPEGs at 1/2..1/8 scale (draft) and resamples that: up to
# 41 levels at sharp edges, under 2 levels on average per image.
SAME_DECODE_MAX = 4 / 255
PIL_PATH_MAX, PIL_PATH_MEAN = 64 / 255, 3 / 255


def _config(root, **overrides):
    cfg = base_config().dataset
    cfg.name, cfg.num_workers, cfg.decoder = f'folder:{root}', 2, 'dali'
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope='module')
def photo_folder(tmp_path_factory):
    root = make_photo_folder(tmp_path_factory.mktemp('photos'))
    exif = Image.Exif()
    exif[sources.EXIF_ORIENTATION] = 6  # shown turned 90 degrees clockwise
    photo = _small(skdata.coffee())
    (root / 'coffee' / 'coffee_exif.jpg').write_bytes(_jpeg(photo, exif=exif.tobytes()))
    folder.prepare(f'folder:{root}', 224)
    return root


def _batches(pipeline, start, n, platform='cpu'):
    it = dali.train_batches(pipeline, parallel.create_mesh(jax.devices(platform)), start, BATCH)
    try:
        return [jax.tree_util.tree_map(np.asarray, next(it)) for _ in range(n)]
    finally:
        it.close()


def _assert_close(pipeline, step, batch):
    """``batch`` against the PIL path's (the same examples; within its tolerance) and
    against PIL's crop of the same box of the same full-size decode (rounding apart)."""
    pil = pipeline.train_batch(step, BATCH)
    np.testing.assert_array_equal(batch['label'], pil['label'])
    assert batch['image'].shape == pil['image'].shape and batch['image'].dtype == np.float32
    diff = np.abs(batch['image'] - pil['image'])
    assert diff.max() <= PIL_PATH_MAX and diff.mean(axis=(1, 2, 3)).max() <= PIL_PATH_MEAN
    idx, params = pipeline.train_draws(step, BATCH)
    crops = []
    for k, i in enumerate(idx):
        image, _, _ = pipeline.first_readable(pipeline.train, i, sources.decode_array)
        if pipeline.cfg.augment:
            p = augment.params_at(params, k)
            crops.append(augment.train_crop(image, p, crop_style=pipeline.cfg.crop))
        else:
            crops.append(augment.center_view(image, pipeline.resize_size))
    reference = augment.train_batch(np.stack(crops), params, pipeline.mean)
    if not pipeline.cfg.augment:
        reference = pipeline.normalize(np.stack(crops))
    same = np.abs(batch['image'] - reference).max(axis=(1, 2, 3))
    worst = int(same.argmax())
    assert same[worst] <= SAME_DECODE_MAX + 1e-6, (step, pipeline.train.path(idx[worst]), same)


@pytest.mark.parametrize('crop', ['scale', 'inception'])
def test_dali_batches_are_the_pil_paths_examples_boxes_and_flips(photo_folder, crop):
    pipeline = data_pipeline.Pipeline(_config(photo_folder, crop=crop), seed=3)
    for step, batch in enumerate(_batches(pipeline, 0, 3)):
        _assert_close(pipeline, step, batch)


def test_dali_stream_resumes_exactly_and_evaluation_is_pil(photo_folder):
    pipeline = data_pipeline.Pipeline(_config(photo_folder, augment=False), seed=5)
    whole = _batches(pipeline, 0, 3)
    resumed = _batches(pipeline, 2, 1)[0]
    for key in ('image', 'label'):
        np.testing.assert_array_equal(resumed[key], whole[2][key])
    _assert_close(pipeline, 2, resumed)  # augment=False: the centre views


def test_a_jpeg_dali_cannot_decode_is_skipped_as_the_pil_path_skips_it(tmp_path, caplog):
    good = _jpeg(_small(skdata.coffee()))
    bad = good[:600] + bytes(range(256)) * 8  # the header reads; the scan data is noise
    for cls in ('a', 'b'):
        (tmp_path / cls).mkdir()
        for n in range(4):
            (tmp_path / cls / f'{n}.jpg').write_bytes(good)
    (tmp_path / 'a' / 'noise.jpg').write_bytes(bad)
    folder.prepare(f'folder:{tmp_path}', 64)
    pipeline = data_pipeline.Pipeline(_config(tmp_path, image_size=64), seed=0)
    with caplog.at_level(logging.WARNING):
        batches = _batches(pipeline, 0, 2)
    for step, batch in enumerate(batches):
        np.testing.assert_array_equal(batch['label'], pipeline.train_batch(step, BATCH)['label'])
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith('DALI could not decode the batch of step') for m in messages)
    assert any('noise.jpg' in m and 'skipped corrupt record' in m for m in messages)


def test_training_on_dali_batches_follows_the_cpu_paths_run(photo_folder, tmp_path):
    """The train loop on DALI's batches (in its prefetch thread, sharded on 4 devices)
    takes the steps the PIL path's batches take, pixels' rounding apart."""
    losses = {}
    for decoder in ('dali', 'cpu'):
        config = load_config('default')
        config.model.name, config.model.bn_group_size = 'cifar_resnet8', 2
        config.dataset = _config(photo_folder, decoder=decoder, image_size=32)
        config.dataset.min_scale, config.dataset.max_scale = 36, 64
        config.batch_size, config.eval_batch_size = BATCH, 8
        config.num_train_steps = config.log_every_steps = config.eval_every_steps = 3
        config.checkpoint_every_steps = 3
        results = loop.train_and_evaluate(config, str(tmp_path / decoder))
        assert results['step'] == 3
        losses[decoder] = results['train_loss']
    assert losses['dali'] == pytest.approx(losses['cpu'], rel=1e-3)


def test_a_dali_failure_that_persists_ends_the_run_in_one_line(photo_folder, monkeypatch):
    """(A CUDA or nvJPEG error that every batch meets: not fallen back from forever.)"""

    class Broken:
        def feed_input(self, name, values):
            pass

        def schedule_run(self):
            pass

        def outputs(self):
            raise RuntimeError('Critical error\nencountered:\n\nCUDA error: out of memory\n')

    monkeypatch.setattr(dali, '_build', lambda *args: Broken())
    pipeline = data_pipeline.Pipeline(_config(photo_folder), seed=0)
    it = dali.train_batches(pipeline, parallel.create_mesh(jax.devices('cpu')), 0, BATCH)
    for step in range(dali.MAX_FAILURES_IN_A_ROW - 1):  # the PIL path's batches meanwhile
        batch, pil = jax.tree_util.tree_map(np.asarray, next(it)), pipeline.train_batch(step, BATCH)
        np.testing.assert_array_equal(batch['label'], pil['label'])
        np.testing.assert_allclose(batch['image'], pil['image'], atol=1e-5)
    with pytest.raises(
        InputError,
        match=r'^DALI failed on 4 batches in a row \(CUDA error: '
        r'out of memory\); --config.dataset.decoder=cpu decodes on the host$',
    ):
        next(it)
    it.close()


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU (nvJPEG)')
def test_on_a_gpu_dali_decodes_the_same_examples_boxes_and_flips(photo_folder):
    """The 'mixed' decoder (nvJPEG; its IDCT rounds differently) within the PIL path's
    tolerance, the same examples and labels; the crops leave DALI for JAX by DLPack."""
    pipeline = data_pipeline.Pipeline(_config(photo_folder), seed=3)
    for step, batch in enumerate(_batches(pipeline, 0, 3, platform='gpu')):
        pil = pipeline.train_batch(step, BATCH)
        np.testing.assert_array_equal(batch['label'], pil['label'])
        diff = np.abs(batch['image'] - pil['image'])
        assert diff.max() <= PIL_PATH_MAX and diff.mean(axis=(1, 2, 3)).max() <= PIL_PATH_MEAN
