"""The paper's test protocols (sec. 3.4, 4.2), over the complete eval split.

    python -m resnet_jax.evaluate --workdir=<dir> --protocol=center|ten_crop|multiscale \
        [--weights=raw|ema]

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
import json
import os
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax import augment, execution, input_pipeline

PROTOCOLS = ('center', 'ten_crop', 'multiscale')


def protocol_views(pipeline: input_pipeline.Pipeline,
                   protocol: str) -> Callable[[np.ndarray], list[np.ndarray]]:
    """image -> the protocol's views, as a list of (V, H, W, C) float arrays (one per shape)."""
    size, resize_size = pipeline.image_size, pipeline.resize_size
    if protocol == 'center':
        return lambda image: [pipeline.center_view(image)[None]]
    if protocol == 'ten_crop':
        return lambda image: [pipeline.normalize(
            augment.ten_crop_views(image, resize_size, size))]
    if protocol == 'multiscale':
        scales = [round(s * size / 224) for s in augment.MULTISCALE_SIZES]
        multiple = max(1, round(32 * size / 224))
        return lambda image: [pipeline.normalize(augment.multiscale_view(image, s, multiple),
                                                 channel_mean=True) for s in scales]
    raise ValueError(f'unknown protocol {protocol!r}; allowed: {", ".join(PROTOCOLS)}')


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
                      batch_size: int = 64, mesh: Mesh | None = None,
                      execution_plan: str = 'auto') -> dict[str, float]:
    """Top-1/top-5 error of ``protocol`` over every image of the eval split, and images/s.

    Views of the same shape from ``batch_size`` images at a time are run together, the
    batch split over ``mesh`` (default: all local devices) and padded to fit it, the model
    run by the execution plan ``execution_plan`` of the mesh's platform.
    """
    mesh = mesh or Mesh(np.asarray(jax.local_devices()), ('data',))
    plan = execution.plan_for_mesh(mesh, execution_plan)
    model = plan.apply_to(model)
    split = NamedSharding(mesh, P('data'))
    variables = jax.device_put(variables, NamedSharding(mesh, P()))
    forward = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x, train=False)),
                      in_shardings=(None, split),
                      compiler_options=dict(plan.compiler_options) or None)
    views_of = protocol_views(pipeline, protocol)
    predict = lambda x: np.asarray(forward(variables, _padded(x, mesh.size)))[:len(x)]
    n = len(pipeline.eval)
    top1 = top5 = 0
    start = time.perf_counter()
    for chunk_start in range(0, n, batch_size):
        images, labels = zip(*pipeline.eval_images(range(chunk_start,
                                                         min(n, chunk_start + batch_size))))
        scores = average_scores(predict, views_of, images, model.num_classes)
        top = np.argsort(-scores, axis=1)[:, :5]
        labels = np.asarray(labels)
        top1 += int((top[:, 0] == labels).sum())
        top5 += int((top == labels[:, None]).any(1).sum())
    seconds = time.perf_counter() - start
    return {'top1_error': 1 - top1 / n, 'top5_error': 1 - top5 / n, 'num_images': n,
            'images_per_sec': n / seconds, 'seconds': seconds}


def main(argv: list[str] | None = None) -> int:
    import argparse

    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
    from absl import logging

    from resnet_jax import checkpointing
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
    parser.add_argument('--weights', default='raw', choices=checkpointing.WEIGHTS,
                        help='the trained weights, or their moving average (ema_decay > 0)')
    args = parser.parse_args(argv)
    try:
        config = None
        if args.config:
            from ml_collections import config_flags
            path, _, arg = args.config.partition(':')
            module = config_flags.config_flags._LoadConfigModule('eval_config', path)
            config = module.get_config(arg) if arg else module.get_config()
        model, variables, config, step = checkpointing.load(args.workdir, args.step, config,
                                                            args.weights)
        if args.data_dir:
            config.dataset.data_dir = args.data_dir
        input_pipeline.check_dataset(config.dataset.name, config.dataset.data_dir)
        pipeline = input_pipeline.Pipeline(config.dataset, config.seed)
    except (ConfigError, ValueError, OSError) as e:
        print(f'error: {str(e).splitlines()[0]}', file=sys.stderr)
        return 2
    result = evaluate_protocol(model, variables, pipeline, args.protocol, args.batch_size,
                               execution_plan=config.execution)
    print(f'{config.model.name} step {step}, {args.protocol}: top-1 error '
          f'{100 * result["top1_error"]:.2f}%, top-5 error {100 * result["top5_error"]:.2f}% '
          f'on {result["num_images"]} images ({result["images_per_sec"]:.1f} images/s)')
    record = {'protocol': args.protocol, 'step': step, 'weights': args.weights, **result}
    suffix = '_ema' if args.weights == 'ema' else ''
    if jax.process_index() == 0:  # kept with the run, for reports
        (pathlib.Path(args.workdir) / f'eval_{args.protocol}{suffix}.json').write_text(
            json.dumps(record, indent=2))
    print(json.dumps(record))
    return 0


if __name__ == '__main__':
    sys.exit(main())
