"""The embedded default dataset: scikit-learn's 1,797 handwritten 8x8 digits (nothing to
download) as a tfds dataset, scaled to 0..255, resized bilinearly to 32x32 and repeated over
three channels, so they flow through the CIFAR pipeline and nets unchanged. The split is
fixed: a permutation drawn with seed 0, the first 1,437 ``train``, the last 360 ``test``.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NUM_TEST = 360
SIZE = 32


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 images (N, 32, 32, 3) and int labels, in sklearn's order."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    big = np.stack(
        [np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.BILINEAR)) for im in small]
    )
    return np.repeat(big[..., None], 3, axis=-1), digits.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's handwritten digits, upsampled to 32x32x3, with a fixed train/test split."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    'image': tfds.features.Image(shape=(SIZE, SIZE, 3)),
                    'label': tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=('image', 'label'),
            homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: scikit-learn ships the data
        images, labels = digits_arrays()
        order = np.random.default_rng(0).permutation(len(labels))
        test, train = order[-NUM_TEST:], order[:-NUM_TEST]
        return {
            'train': self._generate_examples(images[train], labels[train], train),
            'test': self._generate_examples(images[test], labels[test], test),
        }

    def _generate_examples(self, images, labels, ids):
        for image, label, i in zip(images, labels, ids):
            yield int(i), {'image': image, 'label': int(label)}
