"""A tiny image-classification dataset of real photographs (scikit-learn's two, each also
flipped and rotated) as a tfds dataset, for the data and evaluation tests; the
``photos_dir`` fixture (conftest) builds it once per session."""

import numpy as np
import tensorflow_datasets as tfds
from sklearn.datasets import load_sample_images

from resnet_jax.config import base_config

PHOTOS = load_sample_images().images  # two real 427x640 photographs


class Photos(tfds.core.GeneratorBasedBuilder):
    """A tiny image-classification dataset of real JPEGs (the two scikit-learn photos,
    each also flipped and rotated, so the splits hold 6 images of 2 classes)."""

    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    'image': tfds.features.Image(encoding_format='jpeg'),
                    'label': tfds.features.ClassLabel(num_classes=2),
                }
            ),
            supervised_keys=('image', 'label'),
        )

    def _split_generators(self, dl_manager):
        return {'train': self._generate_examples(), 'validation': self._generate_examples()}

    def _generate_examples(self):
        for i, photo in enumerate(PHOTOS):
            for j, view in enumerate([photo, photo[:, ::-1], np.rot90(photo)]):
                yield f'{i}-{j}', {'image': np.ascontiguousarray(view), 'label': i}


def build(data_dir: str) -> str:
    Photos(data_dir=data_dir, file_format='array_record').download_and_prepare()
    return data_dir


def photos_config(data_dir, **overrides):
    config = base_config().dataset
    config.name, config.data_dir, config.num_workers = 'photos', data_dir, 2
    config.update(overrides)
    return config
