"""The paper's test protocols over the complete eval split (``resnet-jax evaluate``):

* ``center``: shorter side 256, the centre 224 crop;
* ``ten_crop``: the 4 corners and the centre and their flips, softmax averaged (Tables 2-3);
* ``multiscale``: the whole image, fully convolutionally, at shorter sides 224..640 and
  flipped, softmax averaged (Table 4; minus the channel mean, not the mean image).

Smaller images (CIFAR-style) scale every size by ``image_size / 224``.
"""

from __future__ import annotations

import collections
import functools
import itertools
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import parallel, paths
from resnet_jax.backends import plans
from resnet_jax.data import augment, prepare
from resnet_jax.data import pipeline as input_pipeline

PROTOCOLS = ('center', 'ten_crop', 'multiscale')


def protocol_views(
    pipeline: input_pipeline.Pipeline, protocol: str
) -> Callable[[np.ndarray], list[np.ndarray]]:
    """image -> the protocol's views, as a list of (V, H, W, C) float arrays (one per shape)."""
    if protocol == 'center':
        return functools.partial(_center_views, pipeline)
    if protocol == 'ten_crop':
        return functools.partial(_ten_crop_views, pipeline)
    if protocol == 'multiscale':
        return functools.partial(
            _multiscale_views,
            pipeline,
            tuple(protocol_sizes(pipeline, protocol)),
            max(1, round(32 * pipeline.image_size / 224)),
        )
    raise ValueError(f'unknown protocol {protocol!r}; allowed: {", ".join(PROTOCOLS)}')


def protocol_sizes(pipeline: input_pipeline.Pipeline, protocol: str) -> list[int]:
    """The shorter sides the protocol resizes each image to."""
    if protocol == 'multiscale':
        return [round(s * pipeline.image_size / 224) for s in augment.MULTISCALE_SIZES]
    return [pipeline.resize_size]


def _center_views(pipeline, image):
    return [pipeline.center_view(image)[None]]


def _ten_crop_views(pipeline, image):
    return [
        pipeline.normalize(augment.ten_crop_views(image, pipeline.resize_size, pipeline.image_size))
    ]


def _multiscale_views(pipeline, scales, multiple, image):
    return [
        pipeline.normalize(augment.multiscale_view(image, s, multiple), channel_mean=True)
        for s in scales
    ]


def average_scores(
    predict: Callable[..., np.ndarray],
    views_of: Callable[[np.ndarray], list[np.ndarray]],
    images,
    num_classes: int,
    agree: Callable[[dict], list[tuple[tuple, int]]] | None = None,
) -> np.ndarray:
    """Each image's class probabilities averaged over its views: (len(images), K). Views of
    one shape go through ``predict`` together; with ``agree`` (several processes),
    ``agree({shape: views})`` gives the ``[(shape, rows)]`` every process runs in one order
    (the same compiled programs) and ``predict(views, rows)`` pads to ``rows``."""
    groups: dict[tuple, list] = collections.defaultdict(list)  # shape -> [(image, views)]
    for k, image in enumerate(images):
        for views in views_of(image):
            groups[views.shape[1:]].append((k, views))
    scores = np.zeros((len(images), num_classes), np.float64)
    counts = np.zeros(len(images))
    if agree is None:
        order = [(shape, None) for shape in groups]
    else:
        order = agree({shape: sum(len(v) for _, v in items) for shape, items in groups.items()})
    for shape, rows in order:
        items = groups.get(shape, [])
        views = (
            np.concatenate([v for _, v in items]) if items else np.zeros((0, *shape), np.float32)
        )
        probs = predict(views) if rows is None else predict(views, rows)
        if items:
            owners = np.concatenate([[k] * len(v) for k, v in items])
            np.add.at(scores, owners, probs)
            np.add.at(counts, owners, 1)
    return scores / np.maximum(counts, 1)[:, None]


def agree_on_shapes(local: dict[tuple, int], multiple: int) -> list[tuple[tuple, int]]:
    """The view shapes of every process and the rows each process runs per shape (the
    largest count, rounded up to ``multiple``), in one order; two small all-gathers when
    there are several processes."""
    rows = dict(local)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        most = int(np.max(multihost_utils.process_allgather(np.int32(len(local)))))
        table = np.zeros((max(most, 1), 4), np.int64)  # height, width, channels, views
        for i, (shape, count) in enumerate(sorted(local.items())):
            table[i] = (*shape, count)
        rows = {}
        for *shape, count in multihost_utils.process_allgather(table).reshape(-1, 4):
            key = tuple(int(d) for d in shape)
            if count:
                rows[key] = max(rows.get(key, 0), int(count))
    return [(shape, -(-count // multiple) * multiple) for shape, count in sorted(rows.items())]


def evaluate_protocol(
    model,
    variables: Any,
    pipeline: input_pipeline.Pipeline,
    protocol: str,
    batch_size: int = 64,
    mesh: Mesh | None = None,
    execution_plan: str = 'auto',
) -> dict[str, float]:
    """Top-1/top-5 error of ``protocol`` over the whole eval split, and images/s: each
    process transforms its share, views of one shape run together over ``mesh`` (default:
    every device) by the plan ``execution_plan``; every process returns the whole split's."""
    mesh = mesh or parallel.create_mesh()
    plan = plans.plan_for_mesh(mesh, execution_plan)
    model = plan.apply_to(model)
    split = NamedSharding(mesh, P('data'))
    variables = jax.tree_util.tree_map(lambda x: parallel.replicate(mesh, np.asarray(x)), variables)
    forward = plan.jit(
        lambda v, x: jax.nn.softmax(model.apply(v, x, train=False)),
        in_shardings=(None, split),
        out_shardings=split,
    )
    local_devices = len(mesh.local_devices)

    def predict(views: np.ndarray, rows: int) -> np.ndarray:
        padded = np.zeros((rows, *views.shape[1:]), np.float32)
        padded[: len(views)] = views
        out = forward(variables, jax.make_array_from_process_local_data(split, padded))
        mine = sorted(out.addressable_shards, key=lambda shard: shard.index[0].start or 0)
        return np.concatenate([np.asarray(shard.data) for shard in mine])[: len(views)]

    views_of = protocol_views(pipeline, protocol)
    agree = functools.partial(agree_on_shapes, multiple=local_devices)
    n, processes = len(pipeline.eval), jax.process_count()
    per_process = -(-batch_size // processes)
    hits = np.zeros(2, np.int64)  # top-1, top-5
    start = time.perf_counter()
    # One stream of this process's shares: views are made where each image is decoded.
    step = per_process * processes
    mine = input_pipeline.host_slice(step, jax.process_index(), processes)
    chunks = [range(c + mine.start, min(n, c + mine.stop)) for c in range(0, n, step)]
    items = pipeline.eval_images(
        [i for chunk in chunks for i in chunk],
        views_of,
        shorter_side=max(protocol_sizes(pipeline, protocol)),
    )
    try:
        for chunk in chunks:
            views, labels = zip(*itertools.islice(items, len(chunk))) if len(chunk) else ((), ())
            scores = average_scores(predict, lambda v: v, views, model.num_classes, agree)
            top = np.argsort(-scores, axis=1)[:, :5]
            labels = np.asarray(labels, np.int64)
            hits += [int((top[:, 0] == labels).sum()), int((top == labels[:, None]).any(1).sum())]
    finally:
        items.close()
    if processes > 1:
        from jax.experimental import multihost_utils

        hits = np.asarray(multihost_utils.process_allgather(hits)).sum(0)
    seconds = time.perf_counter() - start
    # (misses / n, as the train loop's mean of per-example errors: 1 - hits / n differs
    # from it in the last bit for 147 of the 361 counts out of 360)
    return {
        'top1_error': float((n - hits[0]) / n),
        'top5_error': float((n - hits[1]) / n),
        'num_images': n,
        'images_per_sec': n / seconds,
        'seconds': seconds,
    }


def prepare_run(
    workdir,
    config=None,
    step: int | None = None,
    weights: str = 'raw',
    data_dir: str | None = None,
    progress=None,
):
    """``(model, variables, config, step, pipeline)`` of a run to evaluate, checked cheapest
    first: the workdir, the network against ``config`` (default: the run's), the prepared
    dataset (nothing is downloaded), then the weights. ConfigError for anything unusable."""
    from resnet_jax.config import ConfigError
    from resnet_jax.training import runs

    workdir = paths.resolve(workdir)
    if not workdir.is_dir():
        raise ConfigError(
            f'workdir {workdir} does not exist'
            if not workdir.exists()
            else f'workdir {workdir} is not a directory'
        )
    config = config or runs.run_config(workdir)
    runs.check_run_model(workdir, config, step)
    if data_dir:
        config.dataset.data_dir = data_dir
    prepare.check_config(config.dataset, progress, download=False)
    model, variables, config, step = runs.load(workdir, step, config, weights)
    return model, variables, config, step, input_pipeline.Pipeline(config.dataset, config.seed)
