"""The paper's augmentation and test views (sec. 3.4, 4.2), one function per operation, on
HWC uint8 numpy images. Random choices are parameters (``draw_params``), so every function
is deterministic and the pipeline draws a global batch's from ``(seed, step)``."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from resnet_jax.models.preprocessing import (
    CAFFE_BGR_MEAN,
    IMAGENET_CHANNEL_MEAN,
    STYLES,
    TORCHVISION_STD,
)

# AlexNet's PCA lighting: ImageNet's RGB covariance eigen-decomposition, as fb.resnet.torch.
IMAGENET_EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
IMAGENET_EIGVEC = np.array(
    [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]], np.float32
)

MULTISCALE_SIZES = (224, 256, 384, 480, 640)  # Table 4: shorter sides of the test scales


def resize(
    image: np.ndarray | Image.Image,
    height: int,
    width: int,
    box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Bilinear resize of a uint8 image (array or PIL), or of its region ``box`` (left, top,
    right, bottom; PIL's, whose filter still reads pixels outside it)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.resize((width, height), Image.BILINEAR, box=box))
    if box is None and image.shape[:2] == (height, width):
        return image
    pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
    out = np.asarray(pil.resize((width, height), Image.BILINEAR, box=box))
    return out.reshape(height, width, image.shape[-1])


def shorter_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) with the shorter side equal to ``size`` and the aspect ratio kept."""
    if height <= width:
        return size, max(size, round(width * size / height))
    return max(size, round(height * size / width)), size


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    return resize(image, *shorter_side_shape(*image.shape[:2], size))


def crop(image: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    return image[top : top + height, left : left + width]


def crop_offset(u: float, length: int, crop_length: int) -> int:
    """A uniform position ``u`` in [0, 1) mapped to an offset in [0, length - crop_length]."""
    return min(int(u * (length - crop_length + 1)), length - crop_length)


def flip_left_right(image: np.ndarray, flip: bool = True) -> np.ndarray:
    return image[:, ::-1] if flip else image


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    return crop(image, (h - size) // 2, (w - size) // 2, size, size)


PREPROCESSING = STYLES  # models.preprocess: the same arithmetic in jax.numpy


def to_unit(image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return np.multiply(image, np.float32(1 / 255.0), out=out, dtype=np.float32)


def _rows(x: np.ndarray) -> np.ndarray:
    """(..., H, W, C) as (..., H, W*C), so that numpy broadcasts over rows, not pixels."""
    return x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))


def _as_rows(v: np.ndarray, width: int) -> np.ndarray:
    """A per-channel vector (C,) or (N, C), or an image (H, W, C), laid out as ``_rows``."""
    if v.ndim == 3:
        return _rows(v)
    tiled = np.tile(v, width)
    return tiled if v.ndim == 1 else tiled[:, None, :]


def standardize(
    image: np.ndarray, mean: np.ndarray, style: str = 'mean', out: np.ndarray | None = None
) -> np.ndarray:
    """Pixels in [0, 1] (HWC or NHWC) to network inputs, into ``out`` if given (may be
    ``image``): 'mean' minus ``mean`` (an image or channel mean), 'torchvision' minus
    ImageNet's channel mean over its std, 'caffe' BGR 0..255 minus the BGR mean."""
    width, rows = image.shape[-2], _rows(image)
    target = None if out is None else _rows(out)
    if style == 'mean':
        result = np.subtract(rows, _as_rows(mean, width), out=target)
    elif style == 'torchvision':
        result = np.subtract(rows, _as_rows(IMAGENET_CHANNEL_MEAN, width), out=target)
        result /= _as_rows(TORCHVISION_STD, width)
    elif style == 'caffe':
        bgr = _rows(np.ascontiguousarray(image[..., ::-1]))
        result = np.multiply(bgr, np.float32(255.0), out=target)
        result -= _as_rows(CAFFE_BGR_MEAN, width)
    else:
        raise ValueError(f'unknown preprocessing {style!r}; allowed: {", ".join(PREPROCESSING)}')
    return result.reshape(image.shape)


def normalize(
    image: np.ndarray,
    mean: np.ndarray,
    style: str = 'mean',
    lighting_alpha: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 pixels to float32 inputs (``standardize``), each image's PCA lighting shift
    added first if ``lighting_alpha`` (N, 3) is given; into ``out`` with no temporaries."""
    out = to_unit(image, out)
    if lighting_alpha is not None:
        rows = _rows(out)
        rows += _as_rows(lighting_shift(lighting_alpha), image.shape[-2])
    return standardize(out, mean, style, out=out)


def lighting_shift(
    alpha: np.ndarray, eigval: np.ndarray = IMAGENET_EIGVAL, eigvec: np.ndarray = IMAGENET_EIGVEC
) -> np.ndarray:
    """AlexNet's PCA shift ``eigvec @ (alpha * eigval)`` for ``alpha`` (3,) or (N, 3),
    written out elementwise so that an image's shift does not depend on its batch."""
    weights = np.asarray(alpha, np.float32) * eigval
    return sum(weights[..., j, None] * eigvec[:, j] for j in range(3)).astype(np.float32)


def lighting(
    image: np.ndarray,
    alpha: np.ndarray,
    eigval: np.ndarray = IMAGENET_EIGVAL,
    eigvec: np.ndarray = IMAGENET_EIGVEC,
) -> np.ndarray:
    """Adds AlexNet's PCA shift (``alpha`` ~ N(0, 0.1^2) in the recipe) to every pixel."""
    return image + lighting_shift(alpha, eigval, eigvec)


def draw_params(
    rng: np.random.Generator,
    n: int,
    *,
    min_scale: int = 256,
    max_scale: int = 480,
    lighting_std: float = 0.1,
) -> dict[str, np.ndarray]:
    """Random choices for n training images (``train_crop``, ``train_batch``)."""
    return {
        'scale': rng.integers(min_scale, max_scale + 1, size=n),  # shorter side
        'u': rng.random(n),
        'v': rng.random(n),  # crop position
        'flip': rng.random(n) < 0.5,
        'alpha': rng.normal(0.0, lighting_std, size=(n, 3)).astype(np.float32),
        'area': rng.uniform(0.08, 1.0, size=n),  # Inception crop only
        'log_ratio': rng.uniform(math.log(3 / 4), math.log(4 / 3), size=n),
    }


def params_at(params: dict[str, np.ndarray], i: int) -> dict:
    return {k: v[i] for k, v in params.items()}


def _resized_crop_box(
    full_shape: tuple[int, int], shorter: int, size: int, place
) -> tuple[float, float, float, float]:
    """The size x size crop at ``place(h, w)`` -> (top, left) of the image resized to shorter
    side ``shorter``, as a box (left, top, right, bottom) in the full image's pixels."""
    h0, w0 = full_shape
    h, w = shorter_side_shape(h0, w0, shorter)
    top, left = place(h, w)
    sy, sx = h0 / h, w0 / w
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def scale_box(
    full_shape: tuple[int, int], scale: int, u: float, v: float, size: int = 224
) -> tuple[float, float, float, float]:
    """Sec. 3.4's scale augmentation: the crop at (u, v) of the image at shorter side
    ``scale``. Only this box is resampled (3-7x less work than resizing the image, the same
    pixels up to rounding)."""
    return _resized_crop_box(
        full_shape, scale, size, lambda h, w: (crop_offset(v, h, size), crop_offset(u, w, size))
    )


def _resized_box(image: np.ndarray | Image.Image, size: int, box: tuple, flip: bool) -> np.ndarray:
    """``box`` of ``image`` resized to size x size, mirrored by PIL if ``flip`` (faster than
    numpy on the uint8 batch, whose innermost axis is a pixel's 3 channels)."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    left, top, right, bottom = box
    if (
        right - left == size
        and bottom - top == size
        and float(left).is_integer()
        and float(top).is_integer()
    ):
        out = pil.crop((int(left), int(top), int(right), int(bottom)))
    else:
        out = pil.resize((size, size), Image.BILINEAR, box=box)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def scale_crop_shorter_side(full_shape: tuple[int, int], scale: int) -> int:
    """The shorter side the scale crop needs the decoded image to keep (no upsampling)."""
    del full_shape
    return scale


def _shape(image) -> tuple[int, int]:
    return (image.height, image.width) if isinstance(image, Image.Image) else image.shape[:2]


def inception_box(
    full_shape: tuple[int, int], area: float, log_ratio: float, u: float, v: float
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a box of ``area`` and aspect exp(log_ratio) at (u, v)."""
    h, w = full_shape
    ratio = math.exp(log_ratio)
    cw = min(w, max(1, round(math.sqrt(area * h * w * ratio))))
    ch = min(h, max(1, round(math.sqrt(area * h * w / ratio))))
    return crop_offset(v, h, ch), crop_offset(u, w, cw), ch, cw


def _edges(box: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
    """(top, left, height, width) as (left, top, right, bottom), PIL's and DALI's order."""
    top, left, h, w = box
    return left, top, left + w, top + h


def inception_crop_shorter_side(
    full_shape: tuple[int, int], area: float, log_ratio: float, size: int = 224
) -> int:
    _, _, ch, cw = inception_box(full_shape, area, log_ratio, 0.0, 0.0)
    return math.ceil(min(full_shape) * size / min(ch, cw))


def train_box(
    full_shape: tuple[int, int], p: dict, *, size: int = 224, crop_style: str = 'scale'
) -> tuple[float, float, float, float]:
    """The training crop's box (left, top, right, bottom) in the full upright image, for
    parameters ``p`` (``draw_params``): what every decoder resamples to size x size."""
    if crop_style == 'inception':
        return _edges(inception_box(full_shape, p['area'], p['log_ratio'], p['u'], p['v']))
    return scale_box(full_shape, p['scale'], p['u'], p['v'], size)


def train_crop(
    image: np.ndarray | Image.Image,
    p: dict,
    *,
    size: int = 224,
    crop_style: str = 'scale',
    full_shape: tuple[int, int] | None = None,
    factor: float = 1.0,
) -> np.ndarray:
    """The uint8 training crop of one image with parameters ``p`` (``draw_params``), mirrored
    if ``p['flip']``; ``image`` may be a JPEG decoded ``factor`` times smaller than
    ``full_shape`` (``sources.decode``)."""
    box = train_box(full_shape or _shape(image), p, size=size, crop_style=crop_style)
    return _resized_box(image, size, tuple(c / factor for c in box), p['flip'])


def train_crop_shorter_side(
    full_shape: tuple[int, int], p: dict, *, size: int = 224, crop_style: str = 'scale'
) -> int:
    if crop_style == 'inception':
        return inception_crop_shorter_side(full_shape, p['area'], p['log_ratio'], size)
    return scale_crop_shorter_side(full_shape, p['scale'])


def train_batch(
    crops: np.ndarray,
    params: dict[str, np.ndarray],
    mean: np.ndarray,
    *,
    lighting_std: float = 0.1,
    preprocessing: str = 'mean',
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Lighting, then mean subtraction (or another ``preprocessing``), of uint8 crops
    (N, S, S, C) with their parameters: float32 network inputs."""
    alpha = params['alpha'] if lighting_std > 0 else None
    return normalize(crops, mean, preprocessing, lighting_alpha=alpha, out=out)


def center_view(image: np.ndarray, resize_size: int = 256, size: int = 224) -> np.ndarray:
    """Shorter side ``resize_size``, the centre size x size crop."""
    return center_crop(resize_shorter_side(image, resize_size), size)


def center_box(
    full_shape: tuple[int, int], resize_size: int = 256, size: int = 224
) -> tuple[float, float, float, float]:
    """``center_view`` as a box (left, top, right, bottom) in the full image's pixels."""
    return _resized_crop_box(
        full_shape, resize_size, size, lambda h, w: ((h - size) // 2, (w - size) // 2)
    )


def ten_crop_views(image: np.ndarray, resize_size: int = 256, size: int = 224) -> np.ndarray:
    """The 4 corners and the centre (view 4, ``center_view``), and their flips: (10, s, s, C)."""
    image = resize_shorter_side(image, resize_size)
    h, w = image.shape[:2]
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
    views = [crop(image, top, left, size, size) for top, left in corners]
    views.append(center_crop(image, size))
    return np.stack(views + [flip_left_right(v) for v in views])


def multiscale_view(image: np.ndarray, shorter: int, multiple: int = 32) -> np.ndarray:
    """The whole image at shorter side ``shorter`` and its flip, (2, H, W, C); the longer side
    rounds to a ``multiple`` (a <3% stretch that bounds the shapes to compile)."""
    h, w = shorter_side_shape(*image.shape[:2], shorter)
    if h > w:
        h = max(shorter, multiple * round(h / multiple))
    elif w > h:
        w = max(shorter, multiple * round(w / multiple))
    image = resize(image, h, w)
    return np.stack([image, flip_left_right(image)])
