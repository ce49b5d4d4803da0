"""Random-access sources of labelled images (``len``, ``image(i)``, ``label(i)``; encoded
ones also ``record(i)``), and decoding. Sources are pickled into worker processes, so they
open their files lazily, in the process that reads them."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees


class CorruptImage(ValueError):
    """A record whose image cannot be read or decoded."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as RGB, transparent pixels composited over white."""
    if image.mode == 'RGB':
        image.load()
        return image
    if image.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in image.info:
        rgba = image.convert('RGBA')
        out = Image.new('RGB', rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel('A'))
        return out
    return image.convert('RGB')


def decode(
    data: bytes, min_shorter_side: Callable[[tuple[int, int]], int | None] | int | None = None
) -> tuple[Image.Image, float, tuple[int, int]]:
    """Decodes an encoded image (anything PIL reads) to RGB, upright by its EXIF orientation.

    ``min_shorter_side``: the shorter side the caller needs, or a function of the image's
    (height, width) giving it; a JPEG is then decoded at 1/2, 1/4 or 1/8 scale (PIL's
    ``draft``) where that still covers it. Returns ``(image, factor, (height, width))``: the
    PIL image, how many times smaller than the full image it is, and the full upright size.
    Raises CorruptImage for data PIL cannot decode or refuses (above twice
    ``PIL.Image.MAX_IMAGE_PIXELS``). PIL's ``DecompressionBombWarning`` is not shown:
    preparing a folder counts such images once (``Scan.oversized``).
    """
    # Scoped to this call: a process-wide filter would hide the warning from the caller's
    # own PIL (catch_warnings is not thread-safe before 3.14; decoding is one at a time).
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        return _decode(data, min_shorter_side)


def _open(data: bytes) -> tuple[Image.Image, int, tuple[int, int]]:
    """The image's header read (nothing decoded): (image, EXIF orientation, upright shape)."""
    image = Image.open(io.BytesIO(data))
    orientation = image.getexif().get(EXIF_ORIENTATION, 1) if 'exif' in image.info else 1
    w, h = image.size
    return image, orientation, ((w, h) if orientation in _SWAPS_SIDES else (h, w))


def header(data: bytes) -> tuple[str, str, tuple[int, int]]:
    """(format, PIL mode, upright (height, width)) of an encoded image, from its header;
    CorruptImage where PIL cannot read one."""
    with _reading():
        image, _, shape = _open(data)
    return image.format, image.mode, shape


@contextlib.contextmanager
def _reading():
    """PIL's errors on bad data (of many types) as CorruptImage."""
    try:
        yield
    except Image.UnidentifiedImageError:
        raise CorruptImage('not an image PIL can read') from None
    except Exception as e:
        raise CorruptImage(str(e) or type(e).__name__) from None


def _decode(data: bytes, min_shorter_side) -> tuple[Image.Image, float, tuple[int, int]]:
    with _reading():
        image, orientation, shape = _open(data)
        w, h = image.size
        need = min_shorter_side(shape) if callable(min_shorter_side) else min_shorter_side
        factor = 1.0
        if need and image.format == 'JPEG' and min(w, h) >= 2 * need:
            ratio = need / min(w, h)
            drafted = image.draft(image.mode, (math.ceil(w * ratio), math.ceil(h * ratio)))
            if drafted is not None:
                factor = w / drafted[1][2]
        image = _to_rgb(image)
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
    return image, factor, shape


def over_pixel_limit(shape: tuple[int, int]) -> bool:
    """Whether an image of ``shape`` (height, width) is above PIL's decompression-bomb
    limit in this process (``decode`` reads it without PIL's warning)."""
    limit = Image.MAX_IMAGE_PIXELS
    return limit is not None and max(1, shape[0]) * max(1, shape[1]) > limit


def decode_array(data: bytes, min_shorter_side: int | None = None) -> np.ndarray:
    """The decoded RGB image as a uint8 (H, W, 3) array (see ``decode``)."""
    return np.asarray(decode(data, min_shorter_side)[0])


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """Decoded images (N, H, W, C) uint8 and labels (N,) in host memory."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        return self.images[i]

    def label(self, i: int) -> int:
        return int(self.labels[i])


class TfdsSource:
    """Encoded images from ``tfds.data_source`` (ArrayRecord), decoded on access."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        self.name, self.split, self.data_dir = name, split, data_dir
        self._source = None
        self._len = len(self.source)

    @property
    def source(self):
        if self._source is None:  # opened in each process that reads
            import tensorflow_datasets as tfds

            self._source = tfds.data_source(
                self.name,
                split=self.split,
                data_dir=self.data_dir,
                download=False,
                decoders={'image': tfds.decode.SkipDecoding()},
            )
        return self._source

    def __getstate__(self):
        return {**self.__dict__, '_source': None}

    def __len__(self) -> int:
        return self._len

    def record(self, i: int) -> dict:
        return self.source[int(i)]

    def image(self, i: int) -> np.ndarray:
        try:
            return decode_array(self.record(i)['image'])
        except CorruptImage as e:
            raise CorruptImage(f'record {i}: {e}') from None

    def label(self, i: int) -> int:
        return int(self.record(i)['label'])


@dataclasses.dataclass
class Scan:
    """One pass over records: the sum and count of the readable ones' centre views, the
    unreadable ones, those above PIL's pixel limit (``oversized``), and that limit in the
    worker processes (which import PIL afresh, with its default)."""

    total: np.ndarray
    count: int = 0
    unreadable: list = dataclasses.field(default_factory=list)
    oversized: list = dataclasses.field(default_factory=list)
    pixel_limit: int | None = None

    def merge(self, other: Scan) -> Scan:
        return Scan(
            self.total + other.total,
            self.count + other.count,
            self.unreadable + other.unreadable,
            self.oversized + other.oversized,
            self.pixel_limit if self.pixel_limit is not None else other.pixel_limit,
        )


def log_scan(scan: Scan, where: str, name: Callable[[int], str] = str) -> None:
    """One warning line each for the unreadable records of ``scan`` and those above PIL's
    pixel limit (counted in the workers, where PIL's warnings are not shown), naming the
    first ten by ``name(index)``."""
    if scan.unreadable:
        logging.warning(
            '%d files in %s are not readable images; training skips them '
            'and counts them as corrupt records: %s',
            len(scan.unreadable),
            where,
            ', '.join(name(i) for i in scan.unreadable[:10]),
        )
    if scan.oversized:
        one = len(scan.oversized) == 1
        logging.warning(
            "%d %s in %s %s larger than PIL's decompression-bomb limit "
            '(PIL.Image.MAX_IMAGE_PIXELS, %s pixels); read anyway: %s',
            len(scan.oversized),
            'image' if one else 'images',
            where,
            'is' if one else 'are',
            scan.pixel_limit,
            ', '.join(name(i) for i in scan.oversized[:10]),
        )


def _scan_chunk(
    source, indices: np.ndarray, summed: np.ndarray, size: int, resize_size: int
) -> Scan:
    from resnet_jax.data import augment

    scan = Scan(np.zeros((size, size, 3), np.float64), pixel_limit=Image.MAX_IMAGE_PIXELS)
    for i, add in zip(indices, summed):
        try:
            image, _, shape = decode(source.record(int(i))['image'], resize_size)
        except CorruptImage:
            scan.unreadable.append(int(i))
            continue
        image = np.asarray(image)
        if over_pixel_limit(shape):
            scan.oversized.append(int(i))
        if add:
            scan.total += augment.center_view(image, resize_size, size)
            scan.count += 1
    return scan


def scan(
    source,
    indices: np.ndarray,
    size: int,
    num_workers: int,
    progress: Callable[[int, int], None] | None = None,
    summed: np.ndarray | None = None,
    chunk: int = 64,
) -> Scan:
    """Decodes records ``indices`` of ``source`` in worker processes into a ``Scan``, summing
    the readable ones' centre views where ``summed`` (default: all); ``progress(done, total)``."""
    import functools

    from resnet_jax.data import workers

    indices = np.asarray(indices, np.int64)
    summed = np.ones(len(indices), bool) if summed is None else np.asarray(summed, bool)
    starts = range(0, len(indices), chunk)
    result = Scan(np.zeros((size, size, 3), np.float64))
    if not len(indices):
        return result
    tasks = workers.map_in_workers(
        functools.partial(
            _scan_chunk_at, source, indices, summed, chunk, size, round(size * 256 / 224)
        ),
        starts,
        num_workers,
    )
    try:
        described = workers.reported(tasks, lambda n: f'records {indices[n * chunk]}...')
        for start, part in zip(starts, described):
            result = result.merge(dataclasses.replace(part, total=np.array(part.total)))
            if progress is not None:
                progress(min(len(indices), start + chunk), len(indices))
    finally:
        tasks.close()
    return result


def _scan_chunk_at(source, indices, summed, chunk, size, resize_size, start):
    return _scan_chunk(
        source, indices[start : start + chunk], summed[start : start + chunk], size, resize_size
    )
