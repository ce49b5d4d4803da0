"""Accelerator readiness: real-JPEG training beside synthetic data, and ResNet-1202 ready to loop.

    python experiments/accelerator_readiness.py [--images 4096] [--log FILE]    # a GPU/TPU host
    python experiments/accelerator_readiness.py --toy                          # CPU-size check

1. Writes ``--images`` ImageNet-sized JPEGs (scikit-learn's and scikit-image's photographs,
   randomly cropped, resized to 350-500 x 350-500 and re-encoded) as a ``folder:`` dataset
   of 10 classes, and trains resnet50 (bfloat16, batch 256, the paper's augmentation)
   through the real input pipeline, decoded on this host's cores and, where DALI is
   installed, by DALI (on the GPU; on its CPU operators without one), beside the same
   compiled step on one synthetic batch held on the device: images/s and their ratio.
2. cifar_resnet1202 and cifar_resnet110 at batch 128: seconds to build the train state,
   compile the step and run its first 3 steps (ready to train), then the median step and
   its cost per layer (ResNet-1202's beside ResNet-110's).

Everything runs the way ``python -m resnet_jax.main`` runs it (its config, execution plan,
pipeline and compiled steps). The last line is one JSON object; ``--log`` also writes the
output to a file (experiments/results/accelerator/ keeps them).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

LINES: list[str] = []


def say(text: str) -> None:
    print(text, flush=True)
    LINES.append(text)


def write_jpegs(
    folder: pathlib.Path, count: int, sides: tuple[int, int], classes: int = 10
) -> None:
    """``count`` JPEGs of real photographs, random crops resized to sides in ``sides``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    try:
        from skimage import data

        photos += [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    except ImportError:  # scikit-image is optional: scikit-learn's two photos suffice
        pass
    rng = np.random.default_rng(0)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = rng.integers(h // 2, h + 1), rng.integers(w // 2, w + 1)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        size = tuple(int(s) for s in rng.integers(sides[0], sides[1] + 1, size=2))
        image = Image.fromarray(photo[top : top + ch, left : left + cw]).resize(size)
        path = folder / f'class_{i % classes}' / f'{i:06d}.jpg'
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)


def _config(model: str, batch: int, dtype: str):
    from resnet_jax.config import base_config

    config = base_config()
    config.model.name, config.model.dtype, config.batch_size = model, dtype, batch
    config.model.bn_group_size = 32 if batch % 32 == 0 else 0
    return config


def _parts(config, num_classes: int, image_shape, mesh):
    """The model, plan, state (and the seconds to build it) and train step of ``config``."""
    import jax

    from resnet_jax.backends import plans
    from resnet_jax.config import model_from_config
    from resnet_jax.training import optim, steps

    model = model_from_config(config, num_classes)
    plan = plans.plan_for_mesh(mesh, config.execution)
    lr_fn = optim.create_learning_rate_fn(config)
    tx = optim.create_optimizer(config, lr_fn)
    start = time.perf_counter()
    state = steps.init_train_state(model, tx, jax.random.key(0), image_shape, mesh)
    jax.block_until_ready(state)
    init_seconds = time.perf_counter() - start
    train_fn, _, layout = steps.compile_steps(model, tx, lr_fn, config, mesh)
    state = layout.from_model(state)  # as the steps hold it
    return model, plan, state, train_fn, init_seconds


def _time_steps(train_fn, state, next_batch, steps: int):
    import jax

    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = train_fn(state, next_batch())
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return state, times


def real_jpeg_vs_synthetic(args, mesh) -> dict:
    """Part 1: the real pipeline's training throughput, by each decoder installed, beside
    a synthetic batch's."""
    from resnet_jax import parallel
    from resnet_jax.data import dali
    from resnet_jax.data import pipeline as input_pipeline
    from resnet_jax.training import inputs, loop

    result = {'model': args.model, 'dtype': args.dtype}
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / 'jpegs'
        start = time.perf_counter()
        write_jpegs(folder, args.images, args.sides)
        say(f'wrote {args.images} JPEGs in {time.perf_counter() - start:.0f} s')
        config = _config(args.model, args.batch_size, args.dtype)
        config.dataset.name = f'folder:{folder}'
        config.dataset.image_size = args.image_size
        config.dataset.min_scale = round(256 * args.image_size / 224)
        config.dataset.max_scale = round(480 * args.image_size / 224)
        loop.validate_config(config, mesh.size)  # prepares the folder once
        pipeline = input_pipeline.Pipeline(config.dataset, config.seed)
        model, plan, state, train_fn, _ = _parts(
            config, pipeline.num_classes, pipeline.image_shape(), mesh
        )
        for decoder in ('cpu', 'dali') if dali.installed() else ('cpu',):
            batches = inputs.batches(pipeline, mesh, 0, config.batch_size, decoder)
            following = functools.partial(next, batches)
            state, _ = _time_steps(train_fn, state, following, args.warmup)
            start = time.perf_counter()
            state, _ = _time_steps(train_fn, state, following, args.steps)
            result[decoder] = args.steps * config.batch_size / (time.perf_counter() - start)
            batches.close()
        synthetic_batch = parallel.shard_batch(
            mesh,
            {
                'image': np.random.default_rng(0)
                .normal(size=(config.batch_size, *pipeline.image_shape()))
                .astype(np.float32),
                'label': np.zeros(config.batch_size, np.int32),
            },
        )
        start = time.perf_counter()
        state, _ = _time_steps(train_fn, state, lambda: synthetic_batch, args.steps)
        synthetic = args.steps * config.batch_size / (time.perf_counter() - start)
    result.update(
        batch_size=config.batch_size,
        images=args.images,
        input_workers=pipeline_workers(config),
        synthetic_images_per_sec=synthetic,
        execution=plan.name,
    )
    for decoder in ('cpu', 'dali'):
        if decoder in result:
            real = result.pop(decoder)
            result[decoder] = {'images_per_sec': real, 'over_synthetic': real / synthetic}
            say(
                f'{args.model} {args.dtype} batch {config.batch_size}, {plan.name} plan: real '
                f'JPEGs decoded by {decoder} {real:,.0f} images/s, synthetic {synthetic:,.0f} '
                f'images/s ({100 * real / synthetic:.0f}% of synthetic; '
                f'{result["input_workers"]} input workers)'
            )
    return result


def pipeline_workers(config) -> int:
    return config.dataset.num_workers or len(os.sched_getaffinity(0))


def ready_to_train(args, mesh) -> dict:
    """Part 2: init, compile and first steps of a very deep net, and its cost per layer."""
    import jax

    from resnet_jax import parallel

    out = {}
    for name in args.depth_models:
        config = _config(name, args.depth_batch_size, 'float32')
        shape = (32, 32, 3)
        start = time.perf_counter()
        model, plan, state, train_fn, init_seconds = _parts(config, 10, shape, mesh)
        batch = parallel.shard_batch(
            mesh,
            {
                'image': np.random.default_rng(0)
                .normal(size=(config.batch_size, *shape))
                .astype(np.float32),
                'label': np.zeros(config.batch_size, np.int32),
            },
        )
        compile_start = time.perf_counter()
        compiled = train_fn.lower(state, batch).compile()
        compile_seconds = time.perf_counter() - compile_start
        state, first = _time_steps(compiled, state, lambda b=batch: b, 3)
        ready = time.perf_counter() - start
        state, times = _time_steps(compiled, state, lambda b=batch: b, args.depth_steps)
        depth = 2 + 2 * sum(model.stage_sizes)
        step = statistics.median(times)
        out[name] = {
            'init_seconds': init_seconds,
            'compile_seconds': compile_seconds,
            'first_3_steps_seconds': sum(first),
            'ready_seconds': ready,
            'step_seconds': step,
            'per_layer_ms': 1e3 * step / depth,
            'scanned_blocks': sum(map(len, plan.scan_groups(model))),
            'execution': plan.name,
        }
        say(
            f'{name} batch {config.batch_size}: ready to train in {ready:.1f} s (init '
            f'{init_seconds:.1f} s, compile {compile_seconds:.1f} s, first 3 steps '
            f'{sum(first):.1f} s); step {1e3 * step:.1f} ms, {1e3 * step / depth:.3f} ms per '
            f'layer; {out[name]["scanned_blocks"]} blocks scanned ({plan.name} plan)'
        )
        del state, compiled
        jax.clear_caches()
    deep, shallow = args.depth_models
    out['per_layer_ratio'] = out[deep]['per_layer_ms'] / out[shallow]['per_layer_ms']
    say(f'per-layer cost: {deep} / {shallow} = {out["per_layer_ratio"]:.2f}')
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--toy',
        action='store_true',
        help='CPU-size: tiny images and nets, to check the script itself',
    )
    parser.add_argument('--images', type=int, default=4096)
    parser.add_argument('--log', type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    if args.toy:
        args.images, args.sides, args.image_size = 48, (80, 120), 32
        args.model, args.dtype, args.batch_size, args.warmup, args.steps = (
            'resnet18',
            'float32',
            8,
            1,
            1,
        )
        args.depth_models, args.depth_batch_size, args.depth_steps = (
            ('cifar_resnet20', 'cifar_resnet8'),
            8,
            2,
        )
    else:
        args.sides, args.image_size = (350, 500), 224
        args.model, args.dtype, args.batch_size, args.warmup, args.steps = (
            'resnet50',
            'bfloat16',
            256,
            5,
            20,
        )
        args.depth_models, args.depth_batch_size, args.depth_steps = (
            ('cifar_resnet1202', 'cifar_resnet110'),
            128,
            10,
        )

    from resnet_jax.backends import xla_options

    xla_options.configure_input('auto')  # before JAX starts: DALI beside XLA:GPU
    import jax

    from resnet_jax import parallel

    mesh = parallel.create_mesh()
    device = jax.devices()[0]
    say(
        f'{jax.device_count()} x {device.device_kind} ({jax.default_backend()}), '
        f'{len(os.sched_getaffinity(0))} CPU cores, jax {jax.__version__}'
    )
    result = {
        'device': device.device_kind,
        'devices': jax.device_count(),
        'cpu_cores': len(os.sched_getaffinity(0)),
        'jax': jax.__version__,
        'real_jpeg': real_jpeg_vs_synthetic(args, mesh),
        'depth': ready_to_train(args, mesh),
    }
    say(json.dumps(result))
    if args.log:
        args.log.parent.mkdir(parents=True, exist_ok=True)
        args.log.write_text('\n'.join(LINES) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
