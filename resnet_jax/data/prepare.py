"""Which datasets can be read, and preparing them once (in-memory datasets, mean images, a
folder's index): ``resnet-jax prepare --dataset=imagenet2012|folder:/path``."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from resnet_jax import paths
from resnet_jax.config import ConfigError
from resnet_jax.data import augment, folder, sources, workers
from resnet_jax.data import digits as _registered_datasets  # noqa: F401  (registers 'digits')
from resnet_jax.data.sources import ArraySource, TfdsSource

# Small datasets read into memory: name -> (train, test) and the held-out-validation splits.
IN_MEMORY_DATASETS = {
    'digits': (('train', 'test'), ('train[:90%]', 'train[90%:]')),
    'cifar10': (('train', 'test'), ('train[:45000]', 'train[45000:]')),  # sec. 4.2's 45k/5k
}
MANUAL_DATASETS = {'imagenet2012'}
EMBEDDED_DATASETS = {'digits'}  # built from data shipped with scikit-learn: no download


def _prepare_hint(name: str, data_dir: str | None) -> str:
    where = data_dir or '~/tensorflow_datasets'
    manual = (
        f'put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
        f'{where}/downloads/manual, then '
        if name in MANUAL_DATASETS
        else ''
    )
    return (
        f'{manual}run: tfds build {name} --data_dir={where} --file_format=array_record '
        f'&& resnet-jax prepare --dataset={name} '
        f'--data_dir={where}'
    )


def check_dataset(
    name: str,
    data_dir: str | None,
    *,
    image_size: int = 224,
    num_workers: int = 0,
    validation_split: bool = False,
    progress: Callable[[int, int], None] | None = None,
    download: bool = True,
) -> None:
    """Raises ConfigError unless ``name`` can be read: in memory, prepared ArrayRecord, or a
    folder of images (``folder:PATH``, prepared here on first use, reported by ``progress``);
    ``download=False`` (evaluation) refuses an in-memory dataset not downloaded yet."""
    if folder.is_folder(name):
        if validation_split:
            raise ConfigError(
                "dataset.validation_split is for tfds datasets; a folder's "
                'evaluation split is its val/ subfolder or a held-out '
                f'{folder.HELD_OUT_FRACTION:.0%} of each class'
            )
        folder.prepare(name, image_size, num_workers or workers.default_num_workers(), progress)
        return
    if data_dir is not None and not paths.resolve(data_dir).is_dir():
        raise ConfigError(f'dataset.data_dir {data_dir} does not exist')
    if name in IN_MEMORY_DATASETS:
        # built (digits) or downloaded (CIFAR-10) by tfds on first use
        if (
            not download
            and name not in EMBEDDED_DATASETS
            and not tfds.builder(name, data_dir=data_dir).is_prepared()
        ):
            where = data_dir or '~/tensorflow_datasets'
            raise ConfigError(
                f'{name} is not prepared in {where} (evaluation does not '
                f'download it): train on it once, or run: tfds build {name} '
                f'--data_dir={where} --file_format=array_record'
            )
        return
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception:  # tfds raises DatasetNotFoundError and friends
        raise ConfigError(
            f'unknown dataset {name!r}; allowed: digits, cifar10, imagenet2012, '
            'folder:/path/to/images or any tfds image classification '
            'dataset'
        ) from None
    if not builder.is_prepared():
        raise ConfigError(
            f'{name} is not prepared in {data_dir or "~/tensorflow_datasets"}; '
            + _prepare_hint(name, data_dir)
        )
    if builder.info.file_format.value != 'array_record':
        raise ConfigError(
            f'{name} in {builder.data_dir} is stored as '
            f'{builder.info.file_format.value}; random access needs ArrayRecord: '
            + _prepare_hint(name, data_dir)
        )


def check_config(
    dataset, progress: Callable[[int, int], None] | None = None, download: bool = True
) -> None:
    """``check_dataset`` for the ``config.dataset`` fields."""
    check_dataset(
        dataset.name,
        dataset.data_dir,
        image_size=dataset.image_size,
        num_workers=dataset.num_workers,
        validation_split=dataset.validation_split,
        progress=progress,
        download=download,
    )


def load_arrays(name: str, split: str, data_dir: str | None) -> tuple[ArraySource, int]:
    """A whole split in memory and its number of classes, built (or downloaded) as
    ArrayRecord on first use and read without TensorFlow, whose import costs a launch
    seconds; a TFRecord copy (``tfds build``'s default) is read through ``tf.data``."""
    builder = tfds.builder(name, data_dir=data_dir)
    with contextlib.ExitStack() as quiet:
        if name in EMBEDDED_DATASETS:
            # A second's local work: tfds's bars would only push an error line off stderr's
            # end, and its "Downloading and preparing dataset" lines claim a download.
            tfds.display_progress_bar(False)
            quiet.callback(tfds.display_progress_bar, True)
            quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
        builder.download_and_prepare(file_format='array_record')  # kept as is if prepared
    num_classes = builder.info.features['label'].num_classes
    if builder.info.file_format.value != 'array_record':
        images, labels = tfds.as_numpy(
            builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
        )
        return (
            ArraySource(np.asarray(images, np.uint8), np.asarray(labels, np.int32)),
            num_classes,
        )
    source = builder.as_data_source(split=split, decoders={'image': tfds.decode.SkipDecoding()})
    shape = builder.info.features['image'].shape  # RGB: decode_array's output
    images = np.empty((len(source), *shape), np.uint8)
    labels = np.empty(len(source), np.int32)
    for start in range(0, len(source), 4096):  # CIFAR-10: the encoded images a chunk at a time
        for i, r in enumerate(
            source.__getitems__(range(start, min(start + 4096, len(source)))), start
        ):
            images[i], labels[i] = sources.decode_array(r['image']), r['label']
    return ArraySource(images, labels), num_classes


def mean_path(dataset_dir, size: int) -> epath.Path:
    return paths.resolve(dataset_dir) / f'mean_image_{size}.npy'


def stored_mean(dataset_dir, size: int) -> np.ndarray:
    """The training set's mean image stored beside the data, else ImageNet's channel mean."""
    path = mean_path(dataset_dir, size)
    if path.exists():
        with path.open('rb') as f:
            return np.load(f).astype(np.float32)
    logging.warning(
        'no mean image at %s (compute it with `resnet-jax prepare`); subtracting '
        'the per-channel mean instead',
        path,
    )
    return augment.IMAGENET_CHANNEL_MEAN


def compute_mean(
    name: str,
    data_dir: str | None,
    size: int = 224,
    max_images: int | None = None,
    num_workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Averages the centre views of the training images and stores the mean image."""
    source = TfdsSource(name, 'train', data_dir)
    n = len(source) if max_images is None else min(max_images, len(source))
    scan = sources.scan(
        source, np.arange(n), size, num_workers or workers.default_num_workers(), progress
    )
    sources.log_scan(scan, f'{name} train', lambda i: f'record {i}')
    mean = (scan.total / max(1, scan.count) / 255.0).astype(np.float32)
    path = mean_path(tfds.builder(name, data_dir=data_dir).data_dir, size)
    with path.open('wb') as f:  # a local file or an object in a bucket
        np.save(f, mean)
    return str(path)


def print_progress(label: str, stream=None) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` drawing ``label: done/total images`` on one line of
    ``stream`` (default stderr)."""

    def progress(done: int, total: int) -> None:
        end = '\n' if done >= total else ''
        print(
            f'\r{label}: {done}/{total} images ({100 * done // max(1, total)}%)',
            end=end,
            file=stream or sys.stderr,
            flush=True,
        )

    return progress
