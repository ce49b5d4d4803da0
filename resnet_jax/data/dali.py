"""Training batches decoded by NVIDIA DALI (``--config.dataset.decoder=dali``, the ``[gpu]``
extra): on a GPU host the JPEGs are decoded on the GPU (nvJPEG, only the crop's region),
which a host's cores cannot keep up with (4.1-4.7 ms per ImageNet image per core: 16 cores
feed ~3,700 images/s, an H100 trains ResNet-50 at 5,700).

What a batch is does not change: the host draws every random choice (``train_draws``),
reads the records, and computes each crop's box from the image's header as the CPU path
does (``augment.train_box``). DALI decodes the box's region, resamples it to size x size
(bilinear, antialiased, as PIL) and mirrors it; the lighting and the mean run in JAX on the
device, on uint8 crops (a quarter of float32's copy). On a CPU host the same graph runs on
DALI's CPU operators. One DALI pipeline per local device builds that device's shard.

Records DALI is not given (not a JPEG, or CMYK: PIL composites and converts them its own
way) are cropped by PIL on the host into their slot. A batch DALI fails on (a JPEG whose
header reads but whose data does not) is built by PIL instead, the corrupt record skipped
as there, and that device's DALI pipeline built anew (DALI's is unusable after an error).
Evaluation decodes on the CPU. A process running DALI beside XLA:GPU needs
``xla_options.configure_input`` before JAX starts (``resnet-jax train`` calls it).
"""

from __future__ import annotations

import concurrent.futures
import functools
import io
import logging
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from resnet_jax.backends.xla_options import dali_installed as installed
from resnet_jax.config import ConfigError
from resnet_jax.data import augment, sources
from resnet_jax.data.workers import InputError
from resnet_jax.models.preprocessing import preprocess

INPUTS = ('encoded', 'anchor', 'extent', 'roi_start', 'roi_end', 'flip')
_DALI_MODES = ('RGB', 'L')  # JPEGs whose pixels DALI's RGB output gives as PIL's do
_PLACEHOLDER = (8, 8)  # a tiny JPEG in the slots PIL fills
MAX_FAILURES_IN_A_ROW = 4  # then DALI's failure is not one bad record's: raised


def choose(decoder: str, dataset_name: str, in_memory: bool) -> str:
    """'cpu' or 'dali' for ``dataset.decoder``; ConfigError where 'dali' cannot run."""
    if decoder == 'cpu' or (decoder == 'auto' and in_memory):
        return 'cpu'
    if in_memory:
        raise ConfigError(
            f"dataset.decoder='dali' decodes encoded images; {dataset_name} is held in memory "
            "as pixels: use 'cpu' or 'auto'"
        )
    if decoder == 'auto':
        return 'dali' if installed() and _nvidia_gpus() else 'cpu'
    if not installed():
        raise ConfigError(
            "dataset.decoder='dali' needs NVIDIA DALI: pip install 'resnet_jax[gpu]' "
            "(or 'resnet_jax[dali]' beside a JAX of your own)"
        )
    return 'dali'


def _nvidia_gpus() -> bool:
    """Whether JAX runs on NVIDIA GPUs, the only ones DALI decodes on (ROCm's are 'gpu' too)."""
    try:
        return jax.default_backend() == 'gpu' and bool(jax.devices('cuda'))
    except RuntimeError:  # no CUDA backend
        return False


def region(box: tuple, shape: tuple[int, int], size: int) -> tuple[np.ndarray, ...]:
    """What DALI decodes for ``box`` (left, top, right, bottom) of an image of ``shape``:
    the whole pixels under it and under the resampling filter beside it (anchor, extent,
    x then y), and the box within that region (roi start, end: y then x, HWC's order)."""
    left, top, right, bottom = box
    h, w = shape
    margin = math.ceil(max(right - left, bottom - top) / size) + 1  # the filter's reach
    x0, y0 = max(0, math.floor(left) - margin), max(0, math.floor(top) - margin)
    x1, y1 = min(w, math.ceil(right) + margin), min(h, math.ceil(bottom) + margin)
    f32 = functools.partial(np.array, dtype=np.float32)
    return (
        f32([x0, y0]),
        f32([x1 - x0, y1 - y0]),
        f32([top - y0, left - x0]),
        f32([bottom - y0, right - x0]),
    )


def _graph(size: int, gpu: bool):
    from nvidia.dali import fn, types

    encoded, anchor, extent, roi_start, roi_end, flip = (
        fn.external_source(name=name, dtype=dtype)
        for name, dtype in zip(INPUTS, (types.UINT8, *[types.FLOAT] * 4, types.INT32))
    )
    images = fn.decoders.image_slice(
        encoded,
        anchor,
        extent,
        axis_names='WH',
        normalized_anchor=False,
        normalized_shape=False,
        output_type=types.RGB,
        jpeg_fancy_upsampling=True,  # chroma as libjpeg-turbo (PIL, DALI's CPU) upsamples it
        device='mixed' if gpu else 'cpu',
    )
    images = fn.resize(
        images,
        size=[size, size],
        roi_start=roi_start,
        roi_end=roi_end,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    return fn.flip(images, horizontal=flip)


def _build(size: int, examples: int, device: jax.Device, threads: int):
    from nvidia.dali import pipeline_def

    gpu = device.platform == 'gpu'
    pipe = pipeline_def(_graph)(
        size,
        gpu,
        batch_size=examples,
        num_threads=threads,
        device_id=device.local_hardware_id if gpu else None,
        prefetch_queue_depth=1,
        exec_dynamic=True,  # each run's outputs in fresh memory, alive while JAX holds them
    )
    pipe.build()
    return pipe


def _normalize(images, shift, mean, style: str):
    """uint8 crops to network inputs as ``augment.normalize``: lighting, then the mean."""
    x = images.astype(jnp.float32) * np.float32(1 / 255.0) + shift[:, None, None, :]
    return preprocess(x, style, mean)


@functools.cache
def _placeholder() -> bytes:
    buffer = io.BytesIO()
    Image.new('RGB', _PLACEHOLDER).save(buffer, 'JPEG')
    return buffer.getvalue()


def _reason(message: str) -> str:
    """The line of a DALI error that says what went wrong (it also holds a traceback)."""
    lines = [line.strip() for line in message.splitlines()]
    if 'encountered:' in lines:
        lines = lines[lines.index('encountered:') + 1 :]
    return next((line for line in lines if line), 'no reason given')


def _probe(data: bytes) -> tuple[bytes, tuple]:
    return data, sources.header(data)


class _Shard:
    """The DALI pipeline of one device and the global batch positions ``lo:hi`` it builds:
    ``prepare`` reads a step's records (host work, done while DALI decodes the step
    before), ``start`` sets DALI running on them, ``finish`` takes its crops."""

    def __init__(self, pipeline, device: jax.Device, lo: int, hi: int, threads: int):
        self.pipeline, self.device, self.lo, self.hi = pipeline, device, lo, hi
        self.threads = threads
        self.dali = self._new_dali()
        self.failures = 0  # batches in a row DALI failed on

    def _new_dali(self):
        return _build(self.pipeline.image_size, self.hi - self.lo, self.device, self.threads)

    def prepare(self, step: int, batch_size: int, draws: tuple, pool) -> dict:
        """The feeds of this shard of ``step`` (``draws``: its ``train_draws``)."""
        p = self.pipeline
        cfg, size = p.cfg, p.image_size
        idx, params = draws
        idx, params = idx[self.lo : self.hi], {k: v[self.lo : self.hi] for k, v in params.items()}
        read = functools.partial(p.first_readable, p.train, fn=_probe)
        todo = {'step': step, 'batch_size': batch_size, 'params': params, 'by_pil': {}}
        todo['feeds'] = {name: [] for name in INPUTS}
        todo['labels'] = np.empty(len(idx), np.int32)
        todo['skipped'] = []
        for k, ((data, (kind, mode, shape)), label, skipped) in enumerate(pool.map(read, idx)):
            todo['skipped'] += skipped
            todo['labels'][k] = label
            pk = augment.params_at(params, k)
            if kind == 'JPEG' and mode in _DALI_MODES:
                if cfg.augment:
                    box = augment.train_box(shape, pk, size=size, crop_style=cfg.crop)
                else:
                    box = augment.center_box(shape, p.resize_size, size)
                encoded, flip = np.frombuffer(data, np.uint8), cfg.augment and pk['flip']
            else:
                todo['by_pil'][k] = p.train_crop(pk, data) if cfg.augment else p.center_crop(data)
                encoded, flip = np.frombuffer(_placeholder(), np.uint8), False
                box, shape = (0, 0, *_PLACEHOLDER), _PLACEHOLDER
            for name, value in zip(
                INPUTS, (encoded, *region(box, shape, size), np.array(flip, np.int32))
            ):
                todo['feeds'][name].append(value)
        return todo

    def start(self, todo: dict) -> dict:
        try:
            for name, values in todo.pop('feeds').items():
                self.dali.feed_input(name, values)
            self.dali.schedule_run()
        except RuntimeError as e:
            todo['error'] = e
        return todo

    def finish(self, todo: dict) -> tuple[jax.Array, np.ndarray, np.ndarray]:
        """(uint8 crops on the device, labels, lighting shifts) of this shard of a step."""
        p, by_pil = self.pipeline, todo['by_pil']
        try:
            if 'error' in todo:
                raise todo['error']
            (out,) = self.dali.outputs()
        except RuntimeError as e:
            return self._by_pil_instead(todo, _reason(str(e)))
        self.failures = 0
        p.count_skipped(todo['skipped'])
        if self.device.platform == 'gpu':
            images = jax.dlpack.from_dlpack(out.as_tensor())
            if by_pil:
                where = np.fromiter(by_pil, np.int32)
                images = images.at[where].set(np.stack(list(by_pil.values())))
        else:
            images = out.as_array()  # a copy of its own
            for k, crop in by_pil.items():
                images[k] = crop
            images = jax.device_put(images, self.device)
        return images, todo['labels'], self._shift(todo['params'])

    def _by_pil_instead(self, todo: dict, reason: str):
        """The shard built by PIL (the corrupt record skipped as there), the DALI pipeline
        built anew (an error leaves it unusable); an error that persists is raised."""
        self.failures += 1
        if self.failures >= MAX_FAILURES_IN_A_ROW:
            raise InputError(
                f'DALI failed on {self.failures} batches in a row ({reason}); '
                '--config.dataset.decoder=cpu decodes on the host'
            )
        logging.warning(
            'DALI could not decode the batch of step %d (%s): built by PIL on the host',
            todo['step'],
            reason,
        )
        p = self.pipeline
        self.dali = self._new_dali()
        crops, labels, params, skipped = p.train_crops(
            todo['step'], todo['batch_size'], self.lo, self.hi
        )
        p.count_skipped(skipped)
        return jax.device_put(crops, self.device), labels, self._shift(params)

    def _shift(self, params: dict) -> np.ndarray:
        cfg = self.pipeline.cfg
        if cfg.augment and cfg.lighting_std > 0:
            return augment.lighting_shift(params['alpha'])
        return np.zeros((len(params['alpha']), 3), np.float32)


def train_batches(
    pipeline, mesh: Mesh, start_step: int, batch_size: int
) -> Iterator[dict[str, jax.Array]]:
    """This host's shards of global batches ``start_step``, ... as arrays on the mesh
    (``image`` float32 network inputs, ``label``), decoded by DALI; closing it stops it."""
    sharding = NamedSharding(mesh, PartitionSpec('data'))
    size = pipeline.image_size
    shape = (batch_size, size, size, 3)
    where = sharding.addressable_devices_indices_map(shape)
    threads = max(1, pipeline.num_workers // len(where))
    shards = [
        _Shard(pipeline, device, index[0].start or 0, index[0].stop or batch_size, threads)
        for device, index in where.items()
    ]
    normalize = jax.jit(
        functools.partial(_normalize, style=pipeline.cfg.preprocessing), out_shardings=sharding
    )
    mean = jax.device_put(pipeline.mean, NamedSharding(mesh, PartitionSpec()))
    pool = concurrent.futures.ThreadPoolExecutor(pipeline.num_workers)  # reads, headers
    ahead = concurrent.futures.ThreadPoolExecutor(1)  # the next step's records, read

    def on_mesh(parts: list, shape: tuple) -> jax.Array:  # one part per shard's device
        placed = [jax.device_put(x, shard.device) for x, shard in zip(parts, shards)]
        return jax.make_array_from_single_device_arrays(shape, sharding, placed)

    def prepared(step: int):  # the step's choices drawn once, for every shard
        def read():
            draws = pipeline.train_draws(step, batch_size)
            return [s.prepare(step, batch_size, draws, pool) for s in shards]

        return ahead.submit(read)

    try:
        following = prepared(start_step)
        for step in range(start_step, 1 << 62):
            started = [s.start(todo) for s, todo in zip(shards, following.result())]
            following = prepared(step + 1)
            images, labels, shifts = zip(*(s.finish(todo) for s, todo in zip(shards, started)))
            batch = {
                'image': normalize(on_mesh(images, shape), on_mesh(shifts, (batch_size, 3)), mean),
                'label': on_mesh(labels, (batch_size,)),
            }
            # DALI frees the crops' memory once JAX lets go of them: normalised first
            batch['image'].block_until_ready()
            yield batch
    finally:
        ahead.shutdown(wait=False, cancel_futures=True)
        pool.shutdown(wait=False, cancel_futures=True)
        for shard in shards:
            shard.dali = None  # its device memory and threads, now
