"""A tiny image-classification dataset of real photographs (scikit-learn's two, each also
flipped and rotated) as a tfds dataset, for the data and evaluation tests; the
``photos_dir`` fixture (conftest) builds it once per session; and a folder of real
photographs for ``folder:DIR`` datasets (``make_photo_folder``)."""

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from skimage import data as skdata
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


# --- a folder of photographs (folder:DIR datasets) ---


def _jpeg(array, quality=90, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, 'JPEG', quality=quality, **kwargs)
    return buf.getvalue()


def _small(array, short=160):
    """A real photograph scaled to shorter side ``short`` (keeps the tests fast)."""
    image = Image.fromarray(array)
    w, h = image.size
    return np.asarray(
        image.resize((round(w * short / min(w, h)), round(h * short / min(w, h))), Image.BILINEAR)
    )


def make_photo_folder(root, layout='classes'):
    """Three classes of real photographs (scikit-learn's and scikit-image's), cropped and
    re-encoded, with a grayscale JPEG, a CMYK JPEG, a PNG with alpha, a large JPEG, a
    corrupt JPEG and a text file among them."""
    china, flower = load_sample_images().images
    cat, coffee, rocket = skdata.chelsea(), skdata.coffee(), skdata.rocket()
    files = {
        'cat': {
            'chelsea.jpg': _jpeg(_small(cat)),
            'chelsea_flip.jpg': _jpeg(_small(cat[:, ::-1])),
            'chelsea_crop.jpg': _jpeg(_small(cat[40:260, 60:400])),
            'nested/chelsea_low.jpg': _jpeg(_small(cat, 120)),
        },
        'coffee': {
            'coffee.jpg': _jpeg(_small(coffee)),
            'coffee_crop.jpg': _jpeg(_small(coffee[50:350, 100:500])),
            'flower.jpg': _jpeg(_small(flower)),
            'coffee_cmyk.jpg': _cmyk_jpeg(_small(coffee)),
            'broken.jpg': _jpeg(_small(coffee))[:400],
        },
        'space': {
            'rocket.jpg': _jpeg(_small(rocket)),
            'china.jpg': _jpeg(_small(china)),
            'camera_gray.jpg': _gray_jpeg(skdata.camera()),
            'rocket_alpha.png': _png(_with_alpha(_small(rocket))),
            'retina_large.jpg': _jpeg(skdata.retina()),
            'notes.txt': b'these are rocket photos\n',
        },
    }
    for cls, members in files.items():
        for name, payload in members.items():
            if layout == 'train/val':
                split = (
                    'val' if name.startswith(('chelsea_flip', 'coffee_crop', 'china')) else 'train'
                )
                path = root / split / cls / name
            else:
                path = root / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(payload)
    return root


def _cmyk_jpeg(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert('CMYK').save(buf, 'JPEG', quality=90)
    return buf.getvalue()


def _gray_jpeg(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, 'JPEG', quality=90)
    return buf.getvalue()


def _with_alpha(photo):
    """RGBA: fully transparent on the left, opaque on the right, a ramp between."""
    alpha = np.clip(np.linspace(-64, 320, photo.shape[1]), 0, 255).astype(np.uint8)
    return np.dstack([photo, np.broadcast_to(alpha, photo.shape[:2])])


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, 'PNG')
    return buf.getvalue()
