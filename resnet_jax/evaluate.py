"""The paper's test protocols (sec. 3.4, 4.2), over the complete eval split.

    python -m resnet_jax.evaluate --workdir=<dir> --protocol=center|ten_crop|multiscale

* ``center``: shorter side 256, the centre 224 crop (CIFAR-style data: the 32x32 image).
* ``ten_crop``: the 4 corners and the centre at 224 and their flips, softmax averaged
  (Tables 2 and 3).
* ``multiscale``: the whole image, fully convolutionally, with shorter side in
  {224, 256, 384, 480, 640} and its flip, softmax averaged over the 10 views (Table 4).

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
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax import augment, input_pipeline, parallel, prepare

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


def _padded(x: np.ndarray, multiple: int) -> np.ndarray:
    extra = -len(x) % multiple
    return np.concatenate([x, np.zeros((extra,) + x.shape[1:], x.dtype)]) if extra else x


def average_scores(predict: Callable[[np.ndarray], np.ndarray],
                   views_of: Callable[[np.ndarray], list[np.ndarray]], images,
                   num_classes: int) -> np.ndarray:
    """Each image's class probabilities averaged over all its views: (len(images), K).

    Views of the same shape (from any image) go through ``predict`` together.
    """
    groups: dict[tuple, list] = collections.defaultdict(list)  # shape -> [(image, views)]
    for k, image in enumerate(images):
        for views in views_of(image):
            groups[views.shape].append((k, views))
    scores = np.zeros((len(images), num_classes), np.float64)
    counts = np.zeros(len(images))
    for items in groups.values():
        owners = np.concatenate([[k] * len(v) for k, v in items])
        probs = predict(np.concatenate([v for _, v in items]))
        np.add.at(scores, owners, probs)
        np.add.at(counts, owners, 1)
    return scores / counts[:, None]


def evaluate_protocol(model, variables: Any, pipeline: input_pipeline.Pipeline, protocol: str,
                      batch_size: int = 64, mesh: Mesh | None = None) -> dict[str, float]:
    """Top-1/top-5 error of ``protocol`` over every image of the eval split, and images/s.

    Views of the same shape from ``batch_size`` images at a time are run together, the
    batch split over ``mesh`` (default: all local devices) and padded to fit it.
    """
    mesh = mesh or Mesh(np.asarray(jax.local_devices()), ('data',))
    split = NamedSharding(mesh, P('data'))
    variables = jax.device_put(variables, NamedSharding(mesh, P()))
    forward = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x, train=False)),
                      in_shardings=(None, split),
                      compiler_options=parallel.cpu_compiler_options() or None)
    views_of = protocol_views(pipeline, protocol)
    predict = lambda x: np.asarray(forward(variables, _padded(x, mesh.size)))[:len(x)]
    n = len(pipeline.eval)
    top1 = top5 = 0
    start = time.perf_counter()
    # Each image's views are computed where it is decoded (worker processes for encoded
    # images, at the reduced scale its largest view allows).
    items = pipeline.eval_images(range(n), views_of,
                                 shorter_side=max(protocol_sizes(pipeline, protocol)))
    for chunk_start in range(0, n, batch_size):
        views, labels = zip(*itertools.islice(items, min(batch_size, n - chunk_start)))
        scores = average_scores(predict, lambda v: v, views, model.num_classes)
        top = np.argsort(-scores, axis=1)[:, :5]
        labels = np.asarray(labels)
        top1 += int((top[:, 0] == labels).sum())
        top5 += int((top == labels[:, None]).any(1).sum())
    items.close()
    seconds = time.perf_counter() - start
    return {'top1_error': 1 - top1 / n, 'top5_error': 1 - top5 / n, 'num_images': n,
            'images_per_sec': n / seconds, 'seconds': seconds}


def load_run(workdir: str | os.PathLike, config: ml_collections.ConfigDict | None = None,
             step: int | None = None):
    """(config, model, variables, step) of the latest (or given) checkpoint in ``workdir``."""
    from resnet_jax import checkpointing, steps
    from resnet_jax.config import ConfigError, from_dict

    workdir = pathlib.Path(workdir)
    if config is None:
        if not (workdir / 'config.json').exists():
            raise ConfigError(f'{workdir} has no config.json: not a resnet_jax run; pass '
                              '--config')
        config = from_dict(json.loads((workdir / 'config.json').read_text()))
    variables, step = checkpointing.load_variables(workdir, step)
    num_classes = int(np.shape(variables['params']['fc']['bias'])[0])
    return config, steps.create_model(config, num_classes), variables, step


def main(argv: list[str] | None = None) -> int:
    import argparse

    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
    from absl import logging

    from resnet_jax.config import ConfigError
    logging.set_verbosity(logging.WARNING)

    parser = argparse.ArgumentParser(description='Evaluate a run with one of the paper\'s '
                                     'test protocols.')
    parser.add_argument('--workdir', required=True)
    parser.add_argument('--protocol', default='center', choices=PROTOCOLS)
    parser.add_argument('--config', default=None,
                        help='a config file (configs/x.py[:arg]); default: the run\'s own')
    parser.add_argument('--data_dir', default=None, help='override dataset.data_dir')
    parser.add_argument('--batch_size', type=int, default=64, help='images per batch')
    parser.add_argument('--step', type=int, default=None, help='checkpoint step (latest)')
    args = parser.parse_args(argv)
    try:
        config = None
        if args.config:
            from ml_collections import config_flags
            path, _, arg = args.config.partition(':')
            module = config_flags.config_flags._LoadConfigModule('eval_config', path)
            config = module.get_config(arg) if arg else module.get_config()
        config, model, variables, step = load_run(args.workdir, config, args.step)
        if args.data_dir:
            config.dataset.data_dir = args.data_dir
        input_pipeline.check_config(config.dataset, prepare.print_progress(
            f'preparing {config.dataset.name}'))
        pipeline = input_pipeline.Pipeline(config.dataset, config.seed)
    except (ConfigError, ValueError, OSError) as e:
        print(f'error: {str(e).splitlines()[0]}', file=sys.stderr)
        return 2
    result = evaluate_protocol(model, variables, pipeline, args.protocol, args.batch_size)
    print(f'{config.model.name} step {step}, {args.protocol}: top-1 error '
          f'{100 * result["top1_error"]:.2f}%, top-5 error {100 * result["top5_error"]:.2f}% '
          f'on {result["num_images"]} images ({result["images_per_sec"]:.1f} images/s)')
    record = {'protocol': args.protocol, 'step': step, **result}
    if jax.process_index() == 0:  # kept with the run, for reports
        (pathlib.Path(args.workdir) / f'eval_{args.protocol}.json').write_text(
            json.dumps(record, indent=2))
    print(json.dumps(record))
    return 0


if __name__ == '__main__':
    sys.exit(main())
