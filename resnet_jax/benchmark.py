"""Training and evaluation throughput on synthetic data.

    python -m resnet_jax.benchmark --model cifar_resnet56 --batch-size 128 [--image-size 32]
        [--steps 10] [--dtype bfloat16] [--json]

Prints train and eval images/s (medians over steps after compilation), the train step's
compile time, peak host memory, and the achieved FLOP/s (6 x the forward multiply-adds
per step) beside this machine's measured matmul rate. With ``--json`` the last line is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Callable


def matmul_flops_per_sec(dtype: str = 'float32', n: int | None = None,
                         repeats: int = 5) -> float:
    """The device's matmul rate in ``dtype`` (median of a few n x n products on random
    data; n = 2048 on CPU, 8192 on accelerators, large enough to fill them)."""
    import jax

    n = n or (2048 if jax.default_backend() == 'cpu' else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def setup(model_name: str, batch_size: int, image_size: int | None = None,
          dtype: str = 'float32', execution: str = 'auto',
          compiler_options: dict | None = None, step_cache_dir: str | None = None) -> dict:
    """The paper's recipe for ``model_name`` on every device, ready to time: its model,
    mesh, execution plan (with ``compiler_options`` added to its own), config, train
    state, a synthetic batch (fixed seed) and the jitted train and eval steps (not yet
    compiled; kept in ``step_cache_dir`` if given)."""
    import dataclasses

    import jax
    import numpy as np

    from resnet_jax import optim, parallel
    from resnet_jax import execution as execution_plans
    from resnet_jax import steps as train_steps
    from resnet_jax.config import base_config

    config = base_config()
    config.model.name = model_name
    config.model.dtype = dtype
    config.execution = execution
    config.model.bn_group_size = 0
    config.batch_size = batch_size
    model = train_steps.create_model(config, 10 if model_name.startswith('cifar') else 1000)
    size = image_size or (32 if model.stem == 'cifar' else 224)
    mesh = parallel.create_mesh()
    plan = execution_plans.plan_for_mesh(mesh, execution)
    if compiler_options:
        plan = dataclasses.replace(plan, compiler_options={**plan.compiler_options,
                                                           **compiler_options})
    lr_fn = optim.create_learning_rate_fn(config)
    tx = optim.create_optimizer(config, lr_fn)
    state = train_steps.init_train_state(model, tx, jax.random.key(0), (size, size, 3), mesh,
                                         plan)
    rng = np.random.default_rng(0)
    batch = parallel.shard_batch(mesh, {
        'image': rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
        'label': rng.integers(0, model.num_classes, batch_size).astype(np.int32),
        'mask': np.ones(batch_size, bool)})
    train_fn, eval_fn = train_steps.compile_steps(model, tx, lr_fn, config, mesh, plan,
                                                  cache_dir=step_cache_dir)
    return {'model': model, 'mesh': mesh, 'plan': plan, 'config': config, 'size': size,
            'state': state, 'batch': batch, 'train_fn': train_fn, 'eval_fn': eval_fn}


def run(model_name: str, batch_size: int, image_size: int | None = None, steps: int = 10,
        dtype: str = 'float32', warmup: int = 2, execution: str = 'auto', rounds: int = 1,
        between_rounds: Callable[[], None] | None = None,
        step_cache_dir: str | None = None) -> dict:
    """Compiles the model's train and eval steps once and times them on synthetic data.

    The model runs by the execution plan ``execution`` of the devices' platform. The
    train step is timed in ``rounds`` rounds of ``steps`` steps, ``between_rounds``
    called after each (e.g. another framework's timing, so both see the same drift of a
    shared machine); its figures are the median round's, each round the median step.
    """
    import jax

    from resnet_jax import complexity
    from resnet_jax import execution as execution_plans

    s = setup(model_name, batch_size, image_size, dtype, execution,
              step_cache_dir=step_cache_dir)
    model, plan, size, state, batch = s['model'], s['plan'], s['size'], s['state'], s['batch']
    train_fn, eval_fn = s['train_fn'], s['eval_fn']

    start = time.perf_counter()  # a cached step is loaded, or compiled and stored
    compiled = (train_fn.compile(state, batch) if step_cache_dir
                else train_fn.lower(state, batch).compile())
    compile_seconds = time.perf_counter() - start
    # Forward multiply-adds x 2 FLOPs x 3 (forward, input and weight gradients); XLA's own
    # cost analysis counts a loop body once, which undercounts the scanned blocks.
    step_flops = 6.0 * complexity.count_macs(model, (batch_size, size, size, 3))

    def timed(fn, n):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            out = fn()
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t)
        return times

    def train_once():
        nonlocal state
        state, m = compiled(state, batch)
        return state.params
    timed(train_once, warmup)
    round_steps = []
    for _ in range(rounds):
        round_steps.append(statistics.median(timed(train_once, steps)))
        if between_rounds is not None:
            between_rounds()
    train_step = statistics.median(round_steps)
    eval_fn(state, batch)  # compile
    eval_times = timed(lambda: eval_fn(state, batch), steps)
    machine = matmul_flops_per_sec(dtype)
    return {
        'model': model_name, 'batch_size': batch_size, 'image_size': size, 'dtype': dtype,
        'execution': plan.name, 'scanned_blocks': sum(map(len, plan.scan_groups(model))),
        'process_options': execution_plans.process_options(),
        'backend': jax.default_backend(), 'devices': jax.device_count(),
        'device_kind': jax.devices()[0].device_kind,
        'train_images_per_sec': batch_size / train_step,
        'eval_images_per_sec': batch_size / statistics.median(eval_times),
        'train_step_seconds': train_step,
        'compile_seconds': compile_seconds,
        'step_loaded_from_cache': bool(step_cache_dir) and train_fn.loaded,
        'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        'train_flops_per_sec': step_flops / train_step,
        'matmul_flops_per_sec': machine,
        'fraction_of_matmul_rate': step_flops / train_step / machine,
    }


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='cifar_resnet20')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--image-size', type=int, default=None)
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    parser.add_argument('--execution', choices=['auto', 'xla', 'cpu'], default='auto',
                        help='the execution plan (resnet_jax.execution; auto: the XLA:CPU '
                             'plan on CPU)')
    parser.add_argument('--compilation-cache-dir', default='',
                        help="JAX's persistent compilation cache and the compiled steps "
                             "(run twice: the second launch's compile_seconds is a load)")
    parser.add_argument('--json', action='store_true', help='end with one JSON line')
    args = parser.parse_args(argv)
    from resnet_jax import execution, models
    try:
        model = models.create_model(args.model)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    execution.configure_process(model, args.execution)  # before JAX starts its backends
    step_cache_dir = None
    if args.compilation_cache_dir:
        from resnet_jax import parallel
        parallel.enable_compilation_cache(args.compilation_cache_dir)
        step_cache_dir = parallel.step_cache_dir(args.compilation_cache_dir)
    r = run(args.model, args.batch_size, args.image_size, args.steps, args.dtype,
            execution=args.execution, step_cache_dir=step_cache_dir)
    print(f"{r['model']} batch {r['batch_size']} at {r['image_size']}px, {r['dtype']}, "
          f"{r['devices']} x {r['device_kind']} ({r['backend']}), "
          f"execution plan {r['execution']!r} ({r['scanned_blocks']} blocks scanned"
          f"{', ' + ', '.join(r['process_options']) if r['process_options'] else ''})")
    print(f"  train: {r['train_images_per_sec']:.1f} images/s "
          f"({r['train_step_seconds'] * 1e3:.0f} ms/step), eval: "
          f"{r['eval_images_per_sec']:.1f} images/s")
    print(f"  compile {r['compile_seconds']:.1f} s"
          f"{' (loaded from the step cache)' if r['step_loaded_from_cache'] else ''}, "
          f"peak RSS {r['peak_rss_mb']:.0f} MB, "
          f"{r['train_flops_per_sec'] / 1e9:.1f} GFLOP/s = "
          f"{100 * r['fraction_of_matmul_rate']:.0f}% of the matmul rate "
          f"({r['matmul_flops_per_sec'] / 1e9:.0f} GFLOP/s)")
    if args.json:
        print(json.dumps(r))
    return 0


if __name__ == '__main__':
    sys.exit(main())
