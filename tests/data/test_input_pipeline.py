"""Input pipelines and the paper's augmentation, on real photos."""

import dataclasses
import logging

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from photos import PHOTOS, photos_config

from resnet_jax.config import ConfigError
from resnet_jax.data import augment, dali, prepare, sources
from resnet_jax.data import pipeline as input_pipeline


def test_in_memory_dataset_is_built_as_array_record_and_read_as_tfrecord_too(tmp_path, capfd):
    """A first run builds the digits as ArrayRecord (read without TensorFlow), writing
    nothing (a refusal's one line stays stderr's only line; nothing claims a download); a
    copy prepared in tfds's default format, TFRecord, reads as the same arrays through
    tf.data."""
    built, tfrecord = tmp_path / 'built', tmp_path / 'tfrecord'
    built.mkdir()
    capfd.readouterr()
    prepare.load_arrays('digits', 'test', str(built))
    assert capfd.readouterr() == ('', '')
    tfds.builder('digits', data_dir=str(tfrecord)).download_and_prepare()
    for split, size in (('test', 360), ('train[90%:]', 144)):
        arrays, classes = prepare.load_arrays('digits', split, str(built))
        assert arrays.images.shape == (size, 32, 32, 3) and arrays.images.dtype == np.uint8
        assert classes == 10 and len(np.unique(arrays.labels)) == 10
        same, _ = prepare.load_arrays('digits', split, str(tfrecord))
        np.testing.assert_array_equal(same.images, arrays.images)
        np.testing.assert_array_equal(same.labels, arrays.labels)
    for path, fmt in ((built, 'array_record'), (tfrecord, 'tfrecord')):
        assert tfds.builder('digits', data_dir=str(path)).info.file_format.value == fmt


# --- the ImageNet training augmentation --------------------------------------------------


def test_scale_augmentation_draws_cover_256_to_480_and_crop_comes_from_that_scale():
    params = augment.draw_params(np.random.default_rng(0), 5000)
    assert params['scale'].min() == 256 and params['scale'].max() == 480
    assert len(np.unique(params['scale'])) == 225
    photo = PHOTOS[0]
    for i in range(5):
        p = augment.params_at(params, i)
        out = augment.train_crop(photo, {**p, 'flip': False})
        assert out.shape == (224, 224, 3)
        resized = augment.resize_shorter_side(photo, p['scale'])
        assert min(resized.shape[:2]) == p['scale']
        top = augment.crop_offset(p['v'], resized.shape[0], 224)
        left = augment.crop_offset(p['u'], resized.shape[1], 224)
        # Only the crop is resampled: resize-then-crop's pixels up to coefficient rounding.
        diff = np.abs(out.astype(int) - resized[top : top + 224, left : left + 224])
        assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_pipeline_train_crops_come_from_scales_in_range(photos_dir):
    pipeline = input_pipeline.Pipeline(photos_config(photos_dir, lighting_std=0.0), seed=3)
    batch = pipeline.train_batch(0, 4)
    assert batch['image'].shape == (4, 224, 224, 3) and batch['image'].dtype == np.float32
    # Reconstruct each crop from its drawn scale: it matches one of the source images.
    params = augment.draw_params(np.random.default_rng([3, 1 << 20, 0]), 4, lighting_std=0.0)
    idx = input_pipeline.batch_indices(3, 0, 4, len(pipeline.train))
    for i in range(4):
        p = augment.params_at(params, i)
        assert 256 <= p['scale'] <= 480
        raw = pipeline.train.image(idx[i])
        expected = augment.normalize(augment.train_crop(raw, p), pipeline.mean)
        np.testing.assert_allclose(batch['image'][i], expected, atol=1e-6)


def test_flips_happen_about_half_the_time_and_mirror_the_crop():
    flips = augment.draw_params(np.random.default_rng(1), 4000)['flip']
    assert 0.47 < flips.mean() < 0.53
    p = {'scale': 300, 'u': 0.3, 'v': 0.6}
    a = augment.train_crop(PHOTOS[1], {**p, 'flip': False})
    b = augment.train_crop(PHOTOS[1], {**p, 'flip': True})
    np.testing.assert_array_equal(b, a[:, ::-1])


def test_lighting_noise_has_the_configured_std():
    alpha = augment.draw_params(np.random.default_rng(2), 20000, lighting_std=0.1)['alpha']
    assert alpha.std() == pytest.approx(0.1, rel=0.03)
    image = np.zeros((4, 4, 3), np.float32)
    shifts = np.stack([augment.lighting(image, a)[0, 0] for a in alpha[:5000]])
    # Every pixel moves by the same RGB shift, eigvec @ (alpha * eigval).
    expected_std = 0.1 * np.sqrt((augment.IMAGENET_EIGVEC**2) @ augment.IMAGENET_EIGVAL**2)
    np.testing.assert_allclose(shifts.std(0), expected_std, rtol=0.05)
    out = augment.lighting(image, alpha[0])
    np.testing.assert_allclose(out, np.broadcast_to(out[0, 0], out.shape))


def test_inception_crop_option():
    p = {'area': 0.3, 'log_ratio': 0.1, 'u': 0.5, 'v': 0.5, 'flip': True}
    out = augment.train_crop(PHOTOS[0], p, crop_style='inception')
    assert out.shape == (224, 224, 3)


def test_mean_subtraction_uses_the_stored_mean(photos_dir):
    before = input_pipeline.Pipeline(photos_config(photos_dir), seed=0)
    np.testing.assert_array_equal(before.mean, augment.IMAGENET_CHANNEL_MEAN)  # fallback
    path = prepare.compute_mean('photos', photos_dir)
    stored = np.load(path)
    assert stored.shape == (224, 224, 3)
    pipeline = input_pipeline.Pipeline(photos_config(photos_dir), seed=0)
    np.testing.assert_array_equal(pipeline.mean, stored)
    raw = pipeline.eval.image(0)
    view = pipeline.center_view(raw)
    np.testing.assert_allclose(view + stored, augment.center_view(raw) / 255.0, atol=1e-6)
    expected = np.mean(
        [augment.center_view(pipeline.train.image(i)) / 255.0 for i in range(len(pipeline.train))],
        axis=0,
    )
    np.testing.assert_allclose(stored, expected, atol=1e-5)


def test_the_mean_image_names_the_records_it_could_not_read_or_that_are_oversized(
    photos_dir, monkeypatch, caplog
):
    """As preparing a folder does: one line each, naming the records (here two of the
    scan's findings stood in, on the real scan of the photos dataset)."""
    real = sources.scan

    def scan(*args, **kwargs):
        found = real(*args, **kwargs)
        return dataclasses.replace(found, unreadable=[3], oversized=[1, 2], pixel_limit=100)

    monkeypatch.setattr(sources, 'scan', scan)
    caplog.set_level(logging.WARNING)
    prepare.compute_mean('photos', photos_dir)
    assert [r.getMessage() for r in caplog.records] == [
        '1 files in photos train are not readable images; training skips them and counts '
        'them as corrupt records: record 3',
        "2 images in photos train are larger than PIL's decompression-bomb limit "
        '(PIL.Image.MAX_IMAGE_PIXELS, 100 pixels); read anyway: record 1, record 2',
    ]


def test_cifar_augmentation_pads_crops_and_flips():
    images = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)
    out = input_pipeline.pad_crop_flip(images, np.array([[4, 4], [0, 8]]), np.array([False, True]))
    np.testing.assert_array_equal(out[0], images[0])  # offset 4 = the original view
    # Rows from offset 0: 4 rows of padding, then original rows 0..27. Columns from
    # offset 8, flipped: output column j is original column 35 - j (32..35 are padding).
    assert (out[1, :4] == 0).all() and (out[1, :, :4] == 0).all()
    np.testing.assert_array_equal(out[1, 4:, 4:], images[1, :28, 4:][:, ::-1])


# --- determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize('dataset', ['digits', 'photos'])
def test_global_batches_are_a_function_of_seed_and_step(dataset, data_dir, photos_dir):
    cfg = photos_config(photos_dir) if dataset == 'photos' else photos_config(data_dir)
    if dataset == 'digits':
        cfg.name = 'digits'
    one = input_pipeline.Pipeline(cfg, seed=7)
    batch_size = 4
    for step in (0, 1, 5):
        whole = one.train_batch(step, batch_size)
        halves = [one.train_batch(step, batch_size, p, 2) for p in range(2)]
        for key in ('image', 'label'):
            np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))
    restarted = input_pipeline.Pipeline(cfg, seed=7)  # a new process resuming at step 5
    np.testing.assert_array_equal(
        restarted.train_batch(5, batch_size)['image'], one.train_batch(5, batch_size)['image']
    )
    other_seed = input_pipeline.Pipeline(cfg, seed=8).train_batch(5, batch_size)['image']
    assert not np.array_equal(other_seed, one.train_batch(5, batch_size)['image'])


def test_every_example_is_seen_once_per_epoch():
    n, batch = 10, 4
    seen = np.concatenate([input_pipeline.batch_indices(0, k, batch, n) for k in range(5)])
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))


def test_corrupt_records_are_skipped_and_counted(photos_dir, monkeypatch):
    pipeline = input_pipeline.Pipeline(photos_config(photos_dir), seed=0)
    original = pipeline.train.record
    monkeypatch.setattr(
        pipeline.train,
        'record',
        lambda i: {'image': b'not a jpeg', 'label': 0} if int(i) == 2 else original(i),
    )
    with pytest.raises(input_pipeline.CorruptImage):
        pipeline.train.image(2)
    image, label = pipeline._read(pipeline.train, 2)
    np.testing.assert_array_equal(image, pipeline.train.image(3))
    assert pipeline.corrupt_records == 1
    for step in range(3):  # whole batches still come out; 3 epochs read record 2 thrice
        assert pipeline.train_batch(step, 6)['image'].shape[0] == 6
    assert pipeline.corrupt_records == 4


def test_missing_or_unprepared_data_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match='does not exist'):
        prepare.check_dataset('imagenet2012', str(tmp_path / 'nope'))
    with pytest.raises(ConfigError, match='downloads/manual.*tfds build imagenet2012'):
        prepare.check_dataset('imagenet2012', str(tmp_path))
    with pytest.raises(ConfigError, match='unknown dataset'):
        prepare.check_dataset('no_such_dataset', str(tmp_path))


# --- the test protocols --------------------------------------------------------------------


def test_decoder_dali_needs_its_extra_and_an_encoded_dataset(monkeypatch):
    with pytest.raises(ConfigError, match='held in memory'):
        dali.choose('dali', 'cifar10', in_memory=True)
    assert dali.choose('auto', 'cifar10', in_memory=True) == 'cpu'
    assert dali.choose('auto', 'folder:x', in_memory=False) == 'cpu'  # no GPU here
    # 'auto' on GPUs: NVIDIA's only (JAX names ROCm's 'gpu' too, but has no 'cuda' backend)
    monkeypatch.setattr(dali, 'installed', lambda: True)
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    for platforms, expected in ((['cuda'], 'dali'), (['rocm'], 'cpu')):

        def devices(backend=None, platforms=platforms):
            if backend not in platforms:
                raise RuntimeError(f'Unknown backend {backend}')
            return ['a device']

        monkeypatch.setattr(jax, 'devices', devices)
        assert dali.choose('auto', 'folder:x', in_memory=False) == expected
    monkeypatch.undo()
    monkeypatch.setattr(dali, 'installed', lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'resnet_jax\[gpu\]'"):
        dali.choose('dali', 'imagenet2012', in_memory=False)
