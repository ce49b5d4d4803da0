"""The paper's test protocols (sec. 3.4, 4.2), over the complete eval split.

    python -m resnet_jax.evaluate --workdir=<dir> --protocol=center|ten_crop|multiscale
        [--weights=raw|ema]  # the moving average of a run trained with ema_decay > 0
    # several hosts: the flags of resnet_jax.main (clusters are detected without them)
    ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I

* ``center``: shorter side 256, the centre 224 crop (CIFAR-style data: the 32x32 image).
* ``ten_crop``: the 4 corners and the centre at 224 and their flips, softmax averaged
  (Tables 2 and 3).
* ``multiscale``: the whole image, fully convolutionally, with shorter side in
  {224, 256, 384, 480, 640} and its flip, softmax averaged over the 10 views (Table 4).

Every device of every process runs every protocol: each process reads and transforms its
share of the images, and the errors are over the complete split.

For images smaller than ImageNet's (CIFAR-style 32x32 data) every size is scaled by
``image_size / 224``. Fixed-size views subtract the per-pixel mean image; the whole-image
views of ``multiscale`` subtract its per-channel mean.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import os
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax import augment, execution, input_pipeline, parallel, prepare

PROTOCOLS = ('center', 'ten_crop', 'multiscale')


def protocol_views(pipeline: input_pipeline.Pipeline,
                   protocol: str) -> Callable[[np.ndarray], list[np.ndarray]]:
    """image -> the protocol's views, as a list of (V, H, W, C) float arrays (one per shape)."""
    if protocol == 'center':
        return functools.partial(_center_views, pipeline)
    if protocol == 'ten_crop':
        return functools.partial(_ten_crop_views, pipeline)
    if protocol == 'multiscale':
        return functools.partial(_multiscale_views, pipeline, tuple(protocol_sizes(
            pipeline, protocol)), max(1, round(32 * pipeline.image_size / 224)))
    raise ValueError(f'unknown protocol {protocol!r}; allowed: {", ".join(PROTOCOLS)}')


def protocol_sizes(pipeline: input_pipeline.Pipeline, protocol: str) -> list[int]:
    """The shorter sides the protocol resizes each image to."""
    if protocol == 'multiscale':
        return [round(s * pipeline.image_size / 224) for s in augment.MULTISCALE_SIZES]
    return [pipeline.resize_size]


def _center_views(pipeline, image):
    return [pipeline.center_view(image)[None]]


def _ten_crop_views(pipeline, image):
    return [pipeline.normalize(augment.ten_crop_views(image, pipeline.resize_size,
                                                      pipeline.image_size))]


def _multiscale_views(pipeline, scales, multiple, image):
    return [pipeline.normalize(augment.multiscale_view(image, s, multiple), channel_mean=True)
            for s in scales]


def average_scores(predict: Callable[..., np.ndarray],
                   views_of: Callable[[np.ndarray], list[np.ndarray]], images,
                   num_classes: int,
                   agree: Callable[[dict], list[tuple[tuple, int]]] | None = None) -> np.ndarray:
    """Each image's class probabilities averaged over all its views: (len(images), K).

    Views of the same shape (from any image) go through ``predict`` together. With
    ``agree`` (several processes), ``agree({shape: number of views})`` gives the
    ``[(shape, rows)]`` that every process runs in the same order (so every process
    enters the same compiled programs, with or without views of that shape) and
    ``predict(views, rows)`` pads to ``rows``.
    """
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
        views = (np.concatenate([v for _, v in items]) if items
                 else np.zeros((0, *shape), np.float32))
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


def evaluate_protocol(model, variables: Any, pipeline: input_pipeline.Pipeline, protocol: str,
                      batch_size: int = 64, mesh: Mesh | None = None,
                      execution_plan: str = 'auto') -> dict[str, float]:
    """Top-1/top-5 error of ``protocol`` over every image of the eval split, and images/s.

    The split is taken ``batch_size`` images at a time; each process reads and transforms
    its share of them (``input_pipeline.host_slice``), and views of the same shape run
    together over ``mesh`` (default: every device of every process), the model run by
    the execution plan ``execution_plan`` of the mesh's platform. Every process returns
    the errors over the complete split.
    """
    mesh = mesh or parallel.create_mesh()
    plan = execution.plan_for_mesh(mesh, execution_plan)
    model = plan.apply_to(model)
    split = NamedSharding(mesh, P('data'))
    variables = jax.tree_util.tree_map(lambda x: parallel.replicate(mesh, np.asarray(x)),
                                       variables)
    forward = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x, train=False)),
                      in_shardings=(None, split), out_shardings=split,
                      compiler_options=dict(plan.compiler_options) or None)
    local_devices = len(mesh.local_devices)

    def predict(views: np.ndarray, rows: int) -> np.ndarray:
        padded = np.zeros((rows, *views.shape[1:]), np.float32)
        padded[:len(views)] = views
        out = forward(variables, jax.make_array_from_process_local_data(split, padded))
        mine = sorted(out.addressable_shards, key=lambda shard: shard.index[0].start or 0)
        return np.concatenate([np.asarray(shard.data) for shard in mine])[:len(views)]

    views_of = protocol_views(pipeline, protocol)
    agree = functools.partial(agree_on_shapes, multiple=local_devices)
    n, processes = len(pipeline.eval), jax.process_count()
    per_process = -(-batch_size // processes)
    hits = np.zeros(2, np.int64)  # top-1, top-5
    start = time.perf_counter()
    # This process's share of each chunk of the split, read in one stream: each image's
    # views are computed where it is decoded (worker processes for encoded images, at the
    # reduced scale its largest view allows).
    step = per_process * processes
    mine = input_pipeline.host_slice(step, jax.process_index(), processes)
    chunks = [range(c + mine.start, min(n, c + mine.stop)) for c in range(0, n, step)]
    items = pipeline.eval_images([i for chunk in chunks for i in chunk], views_of,
                                 shorter_side=max(protocol_sizes(pipeline, protocol)))
    try:
        for chunk in chunks:
            views, labels = (zip(*itertools.islice(items, len(chunk))) if len(chunk)
                             else ((), ()))
            scores = average_scores(predict, lambda v: v, views, model.num_classes, agree)
            top = np.argsort(-scores, axis=1)[:, :5]
            labels = np.asarray(labels, np.int64)
            hits += [int((top[:, 0] == labels).sum()),
                     int((top == labels[:, None]).any(1).sum())]
    finally:
        items.close()
    if processes > 1:
        from jax.experimental import multihost_utils
        hits = np.asarray(multihost_utils.process_allgather(hits)).sum(0)
    seconds = time.perf_counter() - start
    return {'top1_error': 1 - hits[0] / n, 'top5_error': 1 - hits[1] / n, 'num_images': n,
            'images_per_sec': n / seconds, 'seconds': seconds}


def main(argv: list[str] | None = None) -> int:
    import argparse

    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
    from absl import logging

    from resnet_jax import checkpointing, faults
    from resnet_jax import config as config_lib
    from resnet_jax.config import ConfigError
    logging.set_verbosity(logging.FATAL)  # the libraries' chatter; results are printed
    faults.quiet_closed_loop_callbacks()

    parser = argparse.ArgumentParser(description='Evaluate a run with one of the paper\'s '
                                     'test protocols.')
    parser.add_argument('--workdir', required=True)
    parser.add_argument('--protocol', default='center', choices=PROTOCOLS)
    parser.add_argument('--config', default=None,
                        help='a config file (configs/x.py[:arg]); default: the run\'s own')
    parser.add_argument('--data_dir', default=None, help='override dataset.data_dir')
    parser.add_argument('--batch_size', type=int, default=64, help='images per batch')
    parser.add_argument('--step', type=int, default=None, help='checkpoint step (latest)')
    parser.add_argument('--weights', default='raw', choices=checkpointing.WEIGHTS,
                        help='the trained weights, or their moving average (ema_decay > 0)')
    # A multi-process evaluation, as resnet_jax.main joins one (clusters are detected).
    parser.add_argument('--coordinator_address', default=None,
                        help='host:port of process 0, for a multi-process evaluation')
    parser.add_argument('--num_processes', type=int, default=None)
    parser.add_argument('--process_id', type=int, default=None)
    parser.add_argument('--heartbeat_timeout_seconds', type=int, default=100)
    parser.add_argument('--startup_timeout_seconds', type=int, default=300)
    args = parser.parse_args(argv)
    if args.batch_size <= 0:
        print(f'error: --batch_size must be positive; got {args.batch_size}', file=sys.stderr)
        return 2
    try:
        parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                        args.process_id, args.heartbeat_timeout_seconds,
                                        args.startup_timeout_seconds)
    except Exception as e:  # jax raises RuntimeError / XlaRuntimeError / ValueError
        print(f'error: cannot join the multi-process run: {str(e).splitlines()[0]}',
              file=sys.stderr)
        return 2
    try:
        config = config_lib.load_file(args.config) if args.config else None
        workdir = pathlib.Path(args.workdir)
        if not workdir.is_dir():
            raise ConfigError(f'workdir {workdir} does not exist' if not workdir.exists()
                              else f'workdir {workdir} is not a directory')
        if jax.process_index() == 0:  # where the result goes, before the evaluation
            faults.check_writable(workdir, 'workdir')
        config = config or checkpointing.run_config(workdir)
        checkpointing.check_run_model(workdir, config, args.step)
        if args.data_dir:
            config.dataset.data_dir = args.data_dir
        input_pipeline.check_config(config.dataset, prepare.print_progress(
            f'preparing {config.dataset.name}'), download=False)
        model, variables, config, step = checkpointing.load(args.workdir, args.step, config,
                                                            args.weights)
        pipeline = input_pipeline.Pipeline(config.dataset, config.seed)
    except (ConfigError, ValueError, OSError) as e:
        print(f'error: {str(e).splitlines()[0]}', file=sys.stderr)
        return 2
    result = evaluate_protocol(model, variables, pipeline, args.protocol, args.batch_size,
                               execution_plan=config.execution)
    record = {'protocol': args.protocol, 'step': step, 'weights': args.weights,
              'processes': jax.process_count(), 'devices': jax.device_count(), **result}
    suffix = '_ema' if args.weights == 'ema' else ''
    if jax.process_index() == 0:  # one report, kept with the run
        print(f'{config.model.name} step {step} ({args.weights} weights), {args.protocol}: '
              f'top-1 error {100 * result["top1_error"]:.2f}%, top-5 error '
              f'{100 * result["top5_error"]:.2f}% on {result["num_images"]} images '
              f'({result["images_per_sec"]:.1f} images/s on {jax.device_count()} devices)')
        (pathlib.Path(args.workdir) / f'eval_{args.protocol}{suffix}.json').write_text(
            json.dumps(record, indent=2))
        print(json.dumps(record))
    return 0


if __name__ == '__main__':
    sys.exit(main())
