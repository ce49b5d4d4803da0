"""Training and evaluation throughput on synthetic data (``resnet-jax benchmark``): images/s
(medians after compilation), compile time, peak host memory, and the achieved FLOP/s beside
this machine's measured matmul rate."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable


def matmul_flops_per_sec(dtype: str = 'float32', n: int | None = None, repeats: int = 5) -> float:
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


def setup(
    config,
    batch_size: int | None = None,
    image_size: int | None = None,
    compiler_options: dict | None = None,
) -> dict:
    """The recipe of ``config`` on every device, ready to time: model, mesh, config (BatchNorm
    over the whole batch), train state, a synthetic batch and the jitted, uncompiled steps
    (plan ``config.execution``, ``compiler_options`` added)."""
    import jax
    import numpy as np

    from resnet_jax import config as config_lib
    from resnet_jax import parallel
    from resnet_jax.backends import plans
    from resnet_jax.training import optim, steps

    config = config_lib.from_dict(config.to_dict())  # a copy, unlocked
    config.model.bn_group_size = 0
    config.batch_size = batch_size or config.batch_size
    name = config.model.name
    model = config_lib.model_from_config(config, 10 if name.startswith('cifar') else 1000)
    size = image_size or (32 if model.stem == 'cifar' else 224)
    mesh = parallel.create_mesh()
    lr_fn = optim.create_learning_rate_fn(config)
    tx = optim.create_optimizer(config, lr_fn)
    state = steps.init_train_state(model, tx, jax.random.key(0), (size, size, 3), mesh)
    rng = np.random.default_rng(0)
    batch = parallel.shard_batch(
        mesh,
        {
            'image': rng.normal(size=(config.batch_size, size, size, 3)).astype(np.float32),
            'label': rng.integers(0, model.num_classes, config.batch_size).astype(np.int32),
            'mask': np.ones(config.batch_size, bool),
        },
    )
    train_fn, eval_fn, layout = steps.compile_steps(
        model, tx, lr_fn, config, mesh, compiler_options=compiler_options
    )
    state = layout.from_model(state)  # as the steps hold it
    return {
        'model': model,
        'mesh': mesh,
        'plan': plans.plan_for_mesh(mesh, config.execution),
        'config': config,
        'size': size,
        'state': state,
        'batch': batch,
        'train_fn': train_fn,
        'eval_fn': eval_fn,
    }


def run(
    config,
    batch_size: int | None = None,
    image_size: int | None = None,
    steps: int = 10,
    warmup: int = 2,
    rounds: int = 1,
    between_rounds: Callable[[], None] | None = None,
) -> dict:
    """Compiles ``config``'s train and eval steps once and times them on synthetic data; the
    train step in ``rounds`` of ``steps`` steps, ``between_rounds`` called after each (e.g.
    another framework's timing, under the same drift): the median round's median step."""
    import jax

    from resnet_jax.backends import xla_options
    from resnet_jax.models import complexity
    from resnet_jax.training import memory

    s = setup(config, batch_size, image_size)
    model, plan, size, state, batch = s['model'], s['plan'], s['size'], s['state'], s['batch']
    train_fn, eval_fn, config = s['train_fn'], s['eval_fn'], s['config']
    batch_size = config.batch_size

    first = {}

    def compile_at(size: int):
        """The train step compiled (or loaded from JAX's cache) for a batch of ``size``."""
        start = time.perf_counter()
        shaped = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((size, *x.shape[1:]), x.dtype, sharding=x.sharding),
            batch,
        )
        compiled = train_fn.lower(state, shaped).compile()
        if size == batch_size:
            first.update(compiled=compiled, seconds=time.perf_counter() - start)
        return compiled

    # A batch the device cannot hold: ConfigError naming the largest the estimate allows.
    unit = s['mesh'].size * config.grad_accum_steps * max(config.model.bn_group_size, 1)
    memory.check_fits(compile_at, batch_size, unit, jax.local_devices()[0])
    compiled, compile_seconds = first['compiled'], first['seconds']
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
    dtype = config.model.dtype
    machine = matmul_flops_per_sec(dtype)
    return {
        'model': config.model.name,
        'batch_size': batch_size,
        'image_size': size,
        'dtype': dtype,
        'execution': plan.name,
        'scanned_blocks': sum(map(len, plan.scan_groups(model))),
        'process_options': xla_options.process_options(),
        'backend': jax.default_backend(),
        'devices': jax.device_count(),
        'device_kind': jax.devices()[0].device_kind,
        'train_images_per_sec': batch_size / train_step,
        'eval_images_per_sec': batch_size / statistics.median(eval_times),
        'train_step_seconds': train_step,
        'compile_seconds': compile_seconds,
        'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        'peak_device_mb': (memory.peak_bytes(jax.local_devices()[0]) or 0) / 2**20 or None,
        'train_flops_per_sec': step_flops / train_step,
        'matmul_flops_per_sec': machine,
        'fraction_of_matmul_rate': step_flops / train_step / machine,
    }


def report(r: dict) -> str:
    """``run``'s figures as the lines the command prints."""
    return '\n'.join(
        [
            f'{r["model"]} batch {r["batch_size"]} at {r["image_size"]}px, {r["dtype"]}, '
            f'{r["devices"]} x {r["device_kind"]} ({r["backend"]}), '
            f'execution plan {r["execution"]!r} ({r["scanned_blocks"]} blocks scanned'
            f'{", " + ", ".join(r["process_options"]) if r["process_options"] else ""})',
            f'  train: {r["train_images_per_sec"]:.1f} images/s '
            f'({r["train_step_seconds"] * 1e3:.0f} ms/step), eval: '
            f'{r["eval_images_per_sec"]:.1f} images/s',
            f'  compile {r["compile_seconds"]:.1f} s, peak RSS {r["peak_rss_mb"]:.0f} MB'
            + (f', device {r["peak_device_mb"]:.0f} MB' if r['peak_device_mb'] else '')
            + ', '
            f'{r["train_flops_per_sec"] / 1e9:.1f} GFLOP/s = '
            f'{100 * r["fraction_of_matmul_rate"]:.0f}% of the matmul rate '
            f'({r["matmul_flops_per_sec"] / 1e9:.0f} GFLOP/s)',
        ]
    )
