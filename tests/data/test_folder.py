"""Training on a folder of your own images (``folder:DIR``), on real photographs, and the
input pipeline's worker processes."""

import io
import json
import os
import shutil
import subprocess
import sys
import warnings

import forked
import numpy as np
import pytest
from conftest import REPO, run_main
from photos import _jpeg, _small, _with_alpha, make_photo_folder
from PIL import Image
from skimage import data as skdata
from sklearn.datasets import load_sample_images

from resnet_jax.config import ConfigError, base_config
from resnet_jax.data import augment, folder, prepare, sources
from resnet_jax.data import pipeline as input_pipeline


@pytest.fixture(scope='module')
def photo_folder(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp('photos'))


def folder_config(path, **overrides):
    config = base_config().dataset
    config.name, config.image_size, config.num_workers = f'folder:{path}', 64, 2
    config.update(overrides)
    return config


# --- decoding -------------------------------------------------------------------------------


def test_grayscale_cmyk_and_transparent_images_decode_as_rgb(photo_folder):
    for name in ('space/camera_gray.jpg', 'coffee/coffee_cmyk.jpg', 'space/rocket_alpha.png'):
        image = sources.decode_array((photo_folder / name).read_bytes())
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
    gray = sources.decode_array((photo_folder / 'space/camera_gray.jpg').read_bytes())
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    cmyk = sources.decode_array((photo_folder / 'coffee/coffee_cmyk.jpg').read_bytes())
    rgb = sources.decode_array((photo_folder / 'coffee/coffee.jpg').read_bytes())
    assert np.abs(cmyk.astype(int) - rgb).mean() < 12  # the same photo, through CMYK
    rgba = _with_alpha(_small(skdata.rocket()))
    png = sources.decode_array((photo_folder / 'space/rocket_alpha.png').read_bytes())
    alpha = rgba[..., 3:] / 255.0
    assert (alpha == 0).any() and (alpha == 1).any()
    expected = rgba[..., :3] * alpha + 255 * (1 - alpha)  # composited over white
    assert np.abs(png - expected).max() <= 1
    with pytest.raises(sources.CorruptImage):
        sources.decode((photo_folder / 'coffee/broken.jpg').read_bytes())
    with pytest.raises(sources.CorruptImage):
        sources.decode((photo_folder / 'space/notes.txt').read_bytes())


def test_exif_orientation_is_applied():
    photo = _small(skdata.coffee())
    exif = Image.Exif()
    exif[sources.EXIF_ORIENTATION] = 6  # stored rotated: shown turned 90 degrees clockwise
    image, factor, shape = sources.decode(_jpeg(photo, exif=exif.tobytes()))
    assert shape == (photo.shape[1], photo.shape[0]) == (image.height, image.width)
    np.testing.assert_array_equal(
        np.asarray(image), np.rot90(sources.decode_array(_jpeg(photo)), -1)
    )


def test_jpeg_draft_decodes_at_reduced_scale_only_when_the_crop_allows_it():
    retina = skdata.retina()  # 1411 x 1411
    data = _jpeg(retina)
    full, factor, shape = sources.decode(data, 800)
    assert factor == 1 and shape == (1411, 1411) and full.size == (1411, 1411)
    for need, expected in ((700, 2), (300, 4), (150, 8)):
        image, factor, shape = sources.decode(data, need)
        assert factor == pytest.approx(expected, rel=0.01) and shape == (1411, 1411)
        assert min(image.size) >= need
    # The crop from a 1/4-scale decode shows the same region as from the full decode.
    p = {'scale': 300, 'u': 0.3, 'v': 0.7, 'flip': False}
    small, factor, shape = sources.decode(data, p['scale'])
    a = augment.train_crop(small, p, full_shape=shape, factor=factor)
    b = augment.train_crop(np.asarray(full), p)
    assert a.shape == b.shape == (224, 224, 3)
    assert np.abs(a.astype(int) - b).mean() < 4


# --- the folder dataset ------------------------------------------------------------------------


def test_folder_classes_splits_index_and_mean(tmp_path):
    root = make_photo_folder(tmp_path / 'flat')
    store = folder.prepare(f'folder:{root}', image_size=64, num_workers=2)
    assert store == str(root / '.resnet_jax')
    assert sorted(os.listdir(store)) == [
        'info.json',
        'labels.npy',
        'mean_image_64.npy',
        'offsets.npy',
        'paths.npy',
        'splits.npy',
    ]
    info = json.loads((root / '.resnet_jax' / 'info.json').read_text())
    assert info['classes'] == ['cat', 'coffee', 'space']
    assert info['num_files'] == 15 and info['num_val'] == 3  # one held out per class
    assert sorted(info['unreadable']) == ['coffee/broken.jpg', 'space/notes.txt']
    train = folder.FolderSource(str(root), store, folder.TRAIN)
    val = folder.FolderSource(str(root), store, folder.VAL)
    assert len(train) == 12 and len(val) == 3
    assert sorted(val.label(i) for i in range(3)) == [0, 1, 2]
    assert train.path(0).endswith('cat/chelsea.jpg') and train.label(0) == 0
    # The mean image: the mean of the readable training images' centre views, as for
    # ImageNet (decoded as evaluation decodes them: at 1/2 scale where that keeps 73 px).
    views = []
    for i in range(len(train)):
        try:
            image = sources.decode_array(train.record(i)['image'], 73)
            views.append(augment.center_view(image, 73, 64))
        except sources.CorruptImage:
            pass
    assert len(views) == 10
    mean = np.load(root / '.resnet_jax' / 'mean_image_64.npy')
    np.testing.assert_allclose(mean, np.mean(views, axis=0) / 255.0, atol=1e-6)
    # Prepared once: reused as is; rebuilt when a file is added.
    stamp = os.stat(root / '.resnet_jax' / 'info.json').st_mtime_ns
    folder.prepare(f'folder:{root}', image_size=64, num_workers=2)
    assert os.stat(root / '.resnet_jax' / 'info.json').st_mtime_ns == stamp
    shutil.copy(root / 'cat' / 'chelsea.jpg', root / 'cat' / 'chelsea_again.jpg')
    folder.prepare(f'folder:{root}', image_size=64, num_workers=2)
    assert json.loads((root / '.resnet_jax' / 'info.json').read_text())['num_files'] == 16

    split = make_photo_folder(tmp_path / 'split', layout='train/val')
    store = folder.prepare(f'folder:{split}', image_size=64, num_workers=1)
    val = folder.FolderSource(str(split), store, folder.VAL)
    assert sorted(os.path.basename(val.path(i)) for i in range(len(val))) == [
        'chelsea_flip.jpg',
        'china.jpg',
        'coffee_crop.jpg',
    ]


def test_read_only_folder_keeps_its_index_in_the_cache(tmp_path, monkeypatch):
    root = make_photo_folder(tmp_path / 'ro')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    monkeypatch.setattr(os, 'access', lambda path, mode: False)
    store = folder.prepare(f'folder:{root}', image_size=64, num_workers=1)
    assert store.startswith(str(tmp_path / 'home' / '.cache' / 'resnet_jax' / 'folders'))
    assert not (root / '.resnet_jax').exists()


@pytest.mark.parametrize(
    'make, message',
    [
        (lambda root: None, 'does not exist'),
        (lambda root: root.mkdir(), 'has no class subfolders'),
        (
            lambda root: (root / 'a').mkdir(parents=True) or (root / 'b').mkdir(),
            "class 'a' .* has no images",
        ),
        (
            lambda root: [
                (root / c).mkdir(parents=True) or (root / c / 'x.txt').write_text('no')
                for c in 'ab'
            ],
            "class 'a' .* has no images",
        ),
        (
            lambda root: [
                (root / c).mkdir(parents=True, exist_ok=True)
                or (root / c / f'{k}.jpg').write_text('no')
                for c in 'ab'
                for k in range(2)
            ],
            "class 'a' .* has no readable image for training",
        ),
    ],
)
def test_unusable_folders_are_config_errors_and_write_nothing(tmp_path, make, message):
    root = tmp_path / 'data'
    make(root)
    with pytest.raises(ConfigError, match=message):
        prepare.check_dataset(f'folder:{root}', None, num_workers=1)
    assert not (root / '.resnet_jax').exists()


# --- symlinks: each real folder entered once, each real file indexed once ----------------------


def _tiny_photos(n, short=20):
    """``n`` different tiny JPEGs: crops of real photographs (fast to prepare)."""
    photos = [skdata.coffee(), skdata.chelsea(), skdata.rocket(), skdata.astronaut()]
    out = []
    for k in range(n):
        top, left = 10 * (k // 4 % 10), 15 * (k // 4 % 10)  # within all four photos
        out.append(_jpeg(_small(photos[k % 4][top : top + 200, left : left + 260], short)))
    return out


def _write(root, names):
    for name, payload in zip(names, _tiny_photos(len(names))):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(payload)
    return root


def _split_paths(root, store):
    return [
        [
            folder.FolderSource(str(root), store, split).path(i)
            for i in range(len(folder.FolderSource(str(root), store, split)))
        ]
        for split in (folder.TRAIN, folder.VAL)
    ]


def _assert_each_real_file_once(root, store, real_files):
    """The stored index holds each of ``real_files`` once, in one split only."""
    train, val = _split_paths(root, store)
    real = [os.path.realpath(p) for p in train + val]
    assert len(set(real)) == len(real)
    assert sorted(real) == sorted(os.path.realpath(root / f) for f in real_files)
    assert not {os.path.realpath(p) for p in train} & {os.path.realpath(p) for p in val}
    return train, val


def _skipped_lines(caplog):
    return [
        r.getMessage() for r in caplog.records if 'indexes each real file once' in r.getMessage()
    ]


def test_symlink_loops_are_entered_once_in_bounded_time(tmp_path, caplog):
    """One loop (dog/loop -> .) and two (cat/x/a -> .., cat/x/b -> ..): listed in a
    process of its own with a timeout (an unbounded walk fails the test rather than hangs
    it), each real file once; then prepared, with no file in both splits."""
    one = _write(
        tmp_path / 'one',
        [f'{c}/{k}.jpg' for c in ('cat', 'dog') for k in range(8)] + ['dog/nested/n.jpg'],
    )
    (one / 'dog' / 'loop').symlink_to('.')
    two = _write(
        tmp_path / 'two',
        [f'{c}/{k}.jpg' for c in ('cat', 'dog') for k in range(8)] + ['cat/x/x.jpg'],
    )
    (two / 'cat' / 'x' / 'a').symlink_to('..')
    (two / 'cat' / 'x' / 'b').symlink_to('..')
    (two / 'dog' / 'up').symlink_to('..')  # the dataset folder itself
    script = (
        'import json, sys\nfrom resnet_jax.data import folder\n'
        'print(json.dumps([folder.list_folder(r)["files"] for r in sys.argv[1:]]))'
    )
    try:
        proc = subprocess.run(
            [sys.executable, '-c', script, str(one), str(two)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail('listing folders with symlink loops did not end in 120 s')
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = json.loads(proc.stdout)
    assert listed == [
        [f'cat/{k}.jpg' for k in range(8)]
        + [f'dog/{k}.jpg' for k in range(8)]
        + ['dog/nested/n.jpg'],
        [f'cat/{k}.jpg' for k in range(8)] + ['cat/x/x.jpg'] + [f'dog/{k}.jpg' for k in range(8)],
    ]
    # One loop, as the index stores it (prepare writes these arrays): the case,
    # where the loop's copies of the held-out images were in the training split too.
    listing = folder.list_folder(str(one))
    assert listing['revisited'] == ['dog/loop'] and not listing['duplicates']
    assert folder.skipped_message(listing).endswith(
        'skipped 1 folder reached again through symlinks (not entered again): dog/loop'
    )
    train, val = (
        folder.FolderSource(str(one), split=split, arrays=folder.encode(listing))
        for split in (folder.TRAIN, folder.VAL)
    )
    real = [os.path.realpath(s.path(i)) for s in (train, val) for i in range(len(s))]
    assert len(val) == 2 and len(real) == len(set(real)) == 17
    # Two loops, prepared: the stored index, and the one line saying what was skipped.
    store = folder.prepare(f'folder:{two}', image_size=32, num_workers=1)
    assert json.loads((two / '.resnet_jax' / 'info.json').read_text())['num_files'] == 17
    _, val = _assert_each_real_file_once(two, store, listed[1])
    assert len(val) == 2  # one held out per class
    lines = _skipped_lines(caplog)
    assert len(lines) == 1 and lines[0].endswith(
        'skipped 3 folders reached again through symlinks (not entered again): cat/x/a, '
        'cat/x/b, dog/up'
    ), lines


def test_linked_folder_and_file_into_another_class_and_outside_are_indexed_once(tmp_path, caplog):
    """cat/more_dogs -> ../dog/puppies, a file symlink cat/alias.jpg -> ../dog/d0.jpg, and
    a folder outside the dataset linked from both classes: each followed once, its files
    under the first path in sorted walk order (so in cat), each real file once."""
    root = _write(
        tmp_path / 'data',
        [
            'cat/c0.jpg',
            'cat/c1.jpg',
            'cat/c2.jpg',
            'dog/d0.jpg',
            'dog/d1.jpg',
            'dog/d2.jpg',
            'dog/puppies/p0.jpg',
            'dog/puppies/p1.jpg',
        ],
    )
    outside = _write(tmp_path / 'elsewhere', ['e0.jpg', 'e1.jpg'])
    (root / 'cat' / 'more_dogs').symlink_to('../dog/puppies')
    (root / 'cat' / 'alias.jpg').symlink_to('../dog/d0.jpg')
    (root / 'cat' / 'ext').symlink_to(outside)
    (root / 'dog' / 'ext').symlink_to(outside)
    (root / 'dog' / 'again').symlink_to('puppies')
    (root / 'dog' / 'cats').symlink_to('../cat')  # a class folder: never entered twice
    listing = folder.list_folder(str(root))
    assert listing['files'] == [
        'cat/alias.jpg',
        'cat/c0.jpg',
        'cat/c1.jpg',
        'cat/c2.jpg',
        'cat/ext/e0.jpg',
        'cat/ext/e1.jpg',
        'cat/more_dogs/p0.jpg',
        'cat/more_dogs/p1.jpg',
        'dog/d1.jpg',
        'dog/d2.jpg',
    ]
    assert listing['labels'].tolist() == [0] * 8 + [1] * 2
    assert listing['duplicates'] == ['dog/d0.jpg']
    assert listing['revisited'] == ['dog/again', 'dog/cats', 'dog/ext', 'dog/puppies']
    store = folder.prepare(f'folder:{root}', image_size=32, num_workers=1)
    _assert_each_real_file_once(
        root,
        store,
        [
            'dog/d0.jpg',
            'cat/c0.jpg',
            'cat/c1.jpg',
            'cat/c2.jpg',
            '../elsewhere/e0.jpg',
            '../elsewhere/e1.jpg',
            'dog/puppies/p0.jpg',
            'dog/puppies/p1.jpg',
            'dog/d1.jpg',
            'dog/d2.jpg',
        ],
    )
    lines = _skipped_lines(caplog)
    assert len(lines) == 1, lines
    assert (
        'skipped 1 path to a file indexed under another path (the first in sorted order '
        'is kept), 4 folders reached again through symlinks (not entered again): '
        'dog/d0.jpg, dog/again, dog/cats, dog/ext, dog/puppies'
    ) in lines[0]
    caplog.clear()
    folder.prepare(f'folder:{root}', image_size=32, num_workers=1)  # reused: said once
    assert not _skipped_lines(caplog)


def test_files_shared_by_train_and_val_are_evaluated_on_not_trained_on(tmp_path, caplog):
    root = _write(
        tmp_path / 'data',
        [f'train/cat/c{k}.jpg' for k in range(4)]
        + [f'train/dog/d{k}.jpg' for k in range(3)]
        + ['train/dog/sub/s0.jpg', 'train/dog/sub/s1.jpg', 'val/cat/v0.jpg', 'val/dog/v1.jpg'],
    )
    (root / 'val' / 'cat' / 'c0.jpg').symlink_to('../../train/cat/c0.jpg')
    (root / 'val' / 'dog' / 'sub').symlink_to('../../train/dog/sub')
    (root / 'train' / 'dog' / 'val_cats').symlink_to('../../val/cat')
    store = folder.prepare(f'folder:{root}', image_size=32, num_workers=1)
    train, val = _assert_each_real_file_once(
        root,
        store,
        [f'train/cat/c{k}.jpg' for k in range(4)]
        + [f'train/dog/d{k}.jpg' for k in range(3)]
        + ['train/dog/sub/s0.jpg', 'train/dog/sub/s1.jpg', 'val/cat/v0.jpg', 'val/dog/v1.jpg'],
    )
    assert [os.path.relpath(p, root) for p in val] == [
        'val/cat/c0.jpg',
        'val/cat/v0.jpg',
        'val/dog/v1.jpg',
        'val/dog/sub/s0.jpg',
        'val/dog/sub/s1.jpg',
    ]
    assert len(train) == 6
    lines = _skipped_lines(caplog)
    assert (
        len(lines) == 1
        and (
            'skipped 3 train/ paths to files that val/ holds (evaluated '
            'on, not trained on), 1 folder reached again'
        )
        in lines[0]
    )
    # A class whose every training file is in val/ too has nothing to train on.
    shutil.rmtree(root / 'val' / 'cat')
    (root / 'val' / 'cat').symlink_to('../train/cat')
    with pytest.raises(
        ConfigError,
        match="class 'cat' .* has no images of its own: its 4 "
        'files are indexed under other paths .* or held '
        'by val/',
    ):
        folder.list_folder(str(root))


# --- images above PIL's decompression-bomb limit --------------------------------------------


class _EncodedImages:
    def __init__(self, images):
        self.images = images

    def record(self, i):
        return {'image': self.images[i], 'label': 0}


def test_images_over_the_pixel_limit_are_read_without_warning_and_counted(monkeypatch):
    """In this process, with PIL's limit lowered: an image above it decodes with no warning
    and is counted by the scan; above twice the limit it is unreadable."""
    small, medium, large = (_jpeg(_small(skdata.coffee(), s)) for s in (16, 24, 40))
    pixels = Image.open(io.BytesIO(medium)).size
    pixels = pixels[0] * pixels[1]
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', pixels - 1)
    with pytest.warns(Image.DecompressionBombWarning):  # what PIL does, and decode must not
        Image.open(io.BytesIO(medium))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # any warning fails the test
        image, _, shape = sources.decode(medium)
        assert sources.over_pixel_limit(shape) and not sources.over_pixel_limit((1, pixels - 1))
        with pytest.raises(sources.CorruptImage, match='decompression bomb'):
            sources.decode(large)  # 4x the pixels of medium
    assert image.size[0] * image.size[1] == pixels
    scan = sources._scan_chunk(
        _EncodedImages([small, medium, large, small]), np.arange(4), np.ones(4, bool), 16, 18
    )
    assert scan.oversized == [1] and scan.unreadable == [2] and scan.count == 3
    assert scan.pixel_limit == pixels - 1
    merged = scan.merge(scan)
    assert merged.oversized == [1, 1] and merged.pixel_limit == pixels - 1


@pytest.fixture(scope='module')
def huge_jpegs():
    """A photograph just above PIL's default limit (89.7 Mpx: read) and one above twice it
    (179.6 Mpx: refused), as grayscale JPEGs of 2 MB (decoded at 1/8 scale when read)."""
    assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's default, which the workers use
    camera = Image.fromarray(skdata.camera())
    out = []
    for side in (9472, 13400):
        buf = io.BytesIO()
        camera.resize((side, side), Image.NEAREST).save(buf, 'JPEG', quality=50)
        out.append(buf.getvalue())
    return out


def test_folder_with_images_over_the_pixel_limit_says_so_once(tmp_path, huge_jpegs, caplog, capfd):
    """The real thing: worker processes (PIL's default limit) prepare the folder and
    evaluate on it; PIL's warning is printed by none of them, one line counts the image."""
    root = _write(
        tmp_path / 'data',
        [f'train/{c}/{k}.jpg' for c in ('cat', 'dog') for k in range(2)]
        + ['val/cat/v.jpg', 'val/dog/v.jpg'],
    )
    (root / 'val' / 'cat' / 'big.jpg').write_bytes(huge_jpegs[0])
    (root / 'train' / 'dog' / 'bomb.jpg').write_bytes(huge_jpegs[1])
    prepare.check_dataset(f'folder:{root}', None, image_size=32, num_workers=1)
    info = json.loads((root / '.resnet_jax' / 'info.json').read_text())
    assert info['oversized'] == ['val/cat/big.jpg']
    assert info['unreadable'] == ['train/dog/bomb.jpg']
    lines = [r.getMessage() for r in caplog.records if 'decompression-bomb' in r.getMessage()]
    assert lines == [
        f"1 image in {root} is larger than PIL's decompression-bomb limit "
        '(PIL.Image.MAX_IMAGE_PIXELS, 89478485 pixels); read anyway: '
        'val/cat/big.jpg'
    ]
    pipeline = input_pipeline.Pipeline(folder_config(root, image_size=32, num_workers=1), seed=0)
    batches = list(pipeline.eval_batches(2))
    assert sum(int(b['mask'].sum()) for b in batches) == 3
    del batches
    err = capfd.readouterr().err
    assert 'DecompressionBombWarning' not in err and 'decompression bomb' not in err, err


# --- worker processes ------------------------------------------------------------------------


@pytest.mark.slow
def test_worker_batches_equal_in_process_batches_for_any_worker_count(photo_folder, monkeypatch):
    """Batch k is the same for 1 or 2 worker processes, in one task or split in several,
    per host slice; corrupt records are counted in the workers and reported here."""
    prepare.check_dataset(f'folder:{photo_folder}', None, image_size=64, num_workers=2)
    monkeypatch.setattr(input_pipeline, 'IMAGES_PER_TASK', 3)  # 6 per host: 2 tasks
    reference = input_pipeline.Pipeline(folder_config(photo_folder), seed=5)
    expected = {
        (p, step): reference.train_batch(step, 12, p, 2) for p in range(2) for step in range(2, 6)
    }
    assert reference.corrupt_records > 0
    for workers in (1, 2):
        pipeline = input_pipeline.Pipeline(folder_config(photo_folder, num_workers=workers), seed=5)
        for p in range(2):
            batches = input_pipeline.train_iterator(pipeline, 2, 12, p, 2)
            for step, batch in zip(range(2, 6), batches):
                for key in ('image', 'label'):
                    np.testing.assert_array_equal(batch[key], expected[p, step][key])
            batches.close()
        assert pipeline.corrupt_records == reference.corrupt_records
        del batch


@pytest.mark.slow
def test_eval_batches_in_workers_pad_and_mask_the_tail(photo_folder):
    prepare.check_dataset(f'folder:{photo_folder}', None, image_size=64, num_workers=2)
    pipeline = input_pipeline.Pipeline(folder_config(photo_folder), seed=0)
    batches = list(pipeline.eval_batches(2))
    assert len(pipeline.eval) == 3 and [b['mask'].tolist() for b in batches] == [
        [True, True],
        [True, False],
    ]
    images = np.concatenate([b['image'] for b in batches])[:3]
    expected = [
        pipeline.center_view(
            sources.decode_array(pipeline.eval.record(i)['image'], pipeline.resize_size)
        )
        for i in range(3)
    ]
    np.testing.assert_allclose(images, expected, atol=1e-6)
    views = list(pipeline.eval_images(range(3), shorter_side=pipeline.resize_size))
    assert [label for _, label in views] == [pipeline.eval.label(i) for i in range(3)]
    del batches


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    'make, message',
    [
        (lambda root: None, 'dataset folder .* does not exist'),
        (
            lambda root: (
                (root / 'loose.jpg').parent.mkdir()
                or (root / 'loose.jpg').write_bytes(_jpeg(load_sample_images().images[0]))
            ),
            'has no class subfolders',
        ),
        (
            lambda root: [
                (root / c).mkdir(parents=True) or (root / c / 'x.txt').write_text('no')
                for c in 'ab'
            ],
            "class 'a' .* has no images",
        ),
    ],
)
def test_unusable_folder_exits_2_with_one_line_and_no_checkpoint(tmp_path, make, message):
    import re

    root = tmp_path / 'data'
    make(root)
    workdir = tmp_path / 'work'
    proc = run_main(
        f'--workdir={workdir}',
        '--config=configs/imagenet.py:resnet18',
        f'--config.dataset.name=folder:{root}',
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and re.search(message, lines[0])
    assert not workdir.exists()


def test_unknown_folder_error_mentions_folder_datasets(tmp_path):
    with pytest.raises(ConfigError, match='folder:/path/to/images'):
        prepare.check_dataset('no_such_dataset', str(tmp_path))
    with pytest.raises(ConfigError, match='validation_split is for tfds datasets'):
        prepare.check_dataset('folder:/x', None, validation_split=True)


@pytest.mark.slow
def test_folder_trains_evaluates_and_resumes_to_exactly_the_uninterrupted_result(tmp_path):
    """The ImageNet recipe on a folder, end to end through worker processes: 4 steps and the
    10-crop evaluation of the run; and exact resume, 2 steps, then a relaunch to 4, ending
    with the results and history of the 4 uninterrupted steps."""
    photos = make_photo_folder(tmp_path / 'photos')
    common = [
        '--config=configs/imagenet.py:resnet18',
        f'--config.dataset.name=folder:{photos}',
        '--config.dataset.image_size=32',
        '--config.dataset.num_workers=2',
        '--config.batch_size=8',
        '--config.eval_batch_size=4',
        '--config.model.bn_group_size=4',
        '--config.log_every_steps=1',
        '--config.eval_every_steps=2',
        '--config.checkpoint_every_steps=2',
    ]
    full = run_main(f'--workdir={tmp_path / "full"}', *common, '--config.num_train_steps=4')
    assert full.returncode == 0, full.stderr[-3000:]
    assert 'preparing folder:' in full.stderr and '15/15 images' in full.stderr
    assert 'Traceback' not in full.stderr and 'leaked' not in full.stderr
    proc = forked.run(
        [sys.executable, '-m', 'resnet_jax', 'evaluate', f'--workdir={tmp_path / "full"}']
        + ['--protocol=ten_crop'],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line['num_images'] == 3 and line['protocol'] == 'ten_crop'

    first = run_main(f'--workdir={tmp_path / "resumed"}', *common, '--config.num_train_steps=2')
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_main(f'--workdir={tmp_path / "resumed"}', *common, '--config.num_train_steps=4')
    assert again.returncode == 0 and 'resumed from step 2' in again.stdout, again.stderr[-3000:]
    for name in ('results.json', 'history.json'):
        a = json.loads((tmp_path / 'full' / name).read_text())
        b = json.loads((tmp_path / 'resumed' / name).read_text())
        if name == 'results.json':  # the corrupt-record count is the last process's
            a.pop('wall_seconds'), b.pop('wall_seconds')
            assert a['step'] == 4 and 0 <= a['eval_top1_error'] <= 1
            assert a.pop('corrupt_records_skipped') > 0  # the corrupt JPEG and the text file
            b.pop('corrupt_records_skipped')
        else:  # the resumed run logged the first run's end (step 2) once more
            b['train'] = [r for r in b['train'] if r['step'] != 2] + [
                r for r in a['train'] if r['step'] == 2
            ]
            b['train'].sort(key=lambda r: r['step'])
        assert a == b, name
