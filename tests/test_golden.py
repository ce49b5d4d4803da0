"""What a user gets, pinned: the models' values, short training traces, the batches and the
checkpoints' layout, compared with expected values kept in tests/expected/.

A change to any of them fails here with the difference. After an intended change, rewrite
them with ``pytest tests/test_golden.py --update-golden -n 0`` and commit the diff.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import photos
import pytest
from conftest import load_config
from photos import photos_config

from resnet_jax import models
from resnet_jax.data import pipeline as input_pipeline
from resnet_jax.data import prepare
from resnet_jax.training import loop, runs

# Within RTOL of an array's largest magnitude: on two stacks (jax 0.10 and 0.12) float32
# sums in another order differ in the last bits, which a few SGD steps carry to ~1e-5, and
# BatchNorm's training statistics of a narrow net (4 channels) to ~3e-4.
RTOL = 2e-4
MODEL_RTOL = 1e-3


@pytest.mark.parametrize(
    'name, fields, size',
    [
        ('cifar_resnet8', {}, 16),  # option A, CIFAR stem
        ('cifar_plain8', {}, 16),
        ('resnet18', {'width': 8}, 64),  # option B, basic blocks
        ('resnet50', {'width': 4, 'shortcut': 'C'}, 64),  # bottleneck (v1), option C
        ('resnet50', {'width': 4, 'stride_in_1x1': False}, 64),  # v1.5, torchvision's
    ],
)
def test_model_values(golden, name, fields, size):
    model = models.create_model(name, num_classes=5, **fields)
    # 4 images, 2x2 at the last stage: BatchNorm's training statistics over 16 values a
    # channel (over 2, last bits of the input would swing its output by 10%)
    images = jax.random.normal(jax.random.key(1), (4, size, size, 3))
    variables = model.init(jax.random.key(0), images, train=False)
    logits = model.apply(variables, images, train=False)
    trained, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
    golden.check(
        {
            'eval_logits': logits,
            'train_logits': trained,
            'updated_batch_stats': [
                float(jnp.abs(x).sum()) for x in jax.tree_util.tree_leaves(updates)
            ],
            'parameters': int(sum(x.size for x in jax.tree_util.tree_leaves(variables['params']))),
        },
        rtol=MODEL_RTOL,
    )


def _trace_config(data_dir, **fields):
    config = load_config('default')  # the quickstart's recipe, cut to a few steps
    config.model.name = 'cifar_resnet8'
    config.dataset.data_dir = data_dir
    config.batch_size = 32
    config.model.bn_group_size = 8  # 4 devices, 2 micro-batches: whole groups
    config.eval_batch_size = 360
    config.num_train_steps = 6
    config.lr_boundaries = (4,)
    config.log_every_steps = 1
    config.eval_every_steps = 6
    config.checkpoint_every_steps = 6
    config.update(fields)
    return config


@pytest.mark.parametrize(
    'variant, fields',
    [
        ('sgd', {}),
        # LARS's lr is global: a kernel's step is lr * 0.001 * |w|, |w| / |g| 4-35 here, so 2
        # is about SGD's step (the default run with it: 3.33% test error, AVX2 host)
        ('lars', {'optimizer': 'lars', 'learning_rate': 2.0}),
        ('ema_accum', {'ema_decay': 0.5, 'grad_accum_steps': 2}),
    ],
)
def test_training_trace(golden, data_dir, tmp_path, variant, fields):
    """The recipe's loss step by step, the evaluation, and the checkpoint's layout."""
    config = _trace_config(data_dir, **fields)
    results = loop.train_and_evaluate(config, str(tmp_path))
    history = json.loads((tmp_path / 'history.json').read_text())
    variables, _ = runs.load_variables(str(tmp_path))
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    golden.check(
        {
            'train_loss': [r['train_loss'] for r in history['train']],
            'train_top1_error': [r['train_top1_error'] for r in history['train']],
            'eval': {k: v for k, v in results.items() if k.startswith('eval_')},
            'checkpoint_steps': sorted(
                int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()
            ),
            'checkpoint_leaves': [
                [jax.tree_util.keystr(p), list(v.shape), str(v.dtype)] for p, v in leaves
            ],
            'checkpoint_abs_sum': float(
                sum(np.abs(np.asarray(v, np.float64)).sum() for _, v in leaves)
            ),
        },
        rtol=RTOL,
    )


def _summary(batch: dict) -> dict:
    images = np.asarray(batch['image'], np.float64)
    return {
        'labels': np.asarray(batch['label']).tolist(),
        'shape': list(images.shape),
        'per_image_sum': images.reshape(len(images), -1).sum(1),
        'pixels': images.reshape(-1)[::9973],
    }


def test_batches(golden, data_dir, tmp_path):
    """Global batches of the in-memory digits (vectorised augmentation) and of JPEG photos
    (decoded and augmented in worker processes, less their mean image as ``resnet-jax
    prepare`` stores it): the same examples, crops and pixels."""
    config = load_config('default').dataset
    config.data_dir = data_dir
    digits = input_pipeline.Pipeline(config, seed=0)
    photos_dir = photos.build(str(tmp_path))  # its own: other tests leave another mean
    prepare.compute_mean('photos', photos_dir, num_workers=2)
    photos_pipeline = input_pipeline.Pipeline(photos_config(photos_dir), seed=0)
    batches = input_pipeline.train_iterator(photos_pipeline, 5, 4, 0, 1)
    try:
        from_workers = [next(batches) for _ in range(2)]
    finally:
        batches.close()
    golden.check(
        {
            'digits_train': [_summary(digits.train_batch(step, 32)) for step in (0, 1, 200)],
            'digits_eval': _summary(next(digits.eval_batches(100))),
            'photos_train': [_summary(b) for b in from_workers],
            'photos_eval': _summary(next(photos_pipeline.eval_batches(4))),
        },
        rtol=RTOL,
    )
