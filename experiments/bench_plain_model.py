"""The plain model in research code's own ``jax.jit``: first-call (trace + compile + run)
seconds of ``init``, a train-mode ``apply`` and a ``value_and_grad`` step, and the median of
later steps, each model in a fresh process without JAX's compilation cache.

    python experiments/bench_plain_model.py [--models cifar_resnet1202 resnet50 resnet152]
        [--batch_size 8] [--image_size 224] [--rounds 3] [--steps 3] [--timeout 900]
        [--trees DIR ...] [--configure] [--plan cpu]

``--trees``: checkouts to compare (each imported from its own root, e.g. a ``git worktree``
of main beside the working tree), alternated within each round, so that a shared machine's
drift falls on all of them; medians and ranges per tree and model are printed at the end,
and with one tree a last line of JSON, the medians per model. CIFAR nets run at 32x32,
ImageNet nets at ``--image_size`` (default 224). ``--configure``: each child first calls
``backends.xla_options.configure(model.stage_sizes)``, as the README tells research code on
CPU; ``--plan P``: the model as ``plans.get_plan(P).apply_to`` makes it, jitted by
``plan.jit`` (its compiler options).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if 'model name' in line)
    except (OSError, StopIteration):
        return ''


def measure(name: str, batch_size: int, image_size: int, steps: int, configure: bool, plan: str):
    import resnet_jax
    from resnet_jax.backends import xla_options

    model = resnet_jax.create_model(name)
    if configure:  # before JAX's backend starts, which reads XLA_FLAGS once
        print(json.dumps({'options': xla_options.configure(model.stage_sizes)}), flush=True)

    import jax
    import jax.numpy as jnp

    jit = jax.jit
    if plan:
        from resnet_jax.backends import plans

        chosen = plans.get_plan(plan)
        model, jit = chosen.apply_to(model), chosen.jit
    side = 32 if name.startswith('cifar') else image_size
    x = jax.random.normal(jax.random.key(0), (batch_size, side, side, 3))
    labels = jnp.arange(batch_size) % 10

    def timed(fn, *args, phase=''):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        seconds = time.perf_counter() - start
        if phase:  # as it ends: a child past --timeout still reports its earlier phases
            print(json.dumps({phase: seconds}), flush=True)
        return out, seconds

    variables, _ = timed(jit(model.init), jax.random.key(1), x, phase='init')
    apply = jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
    timed(apply, variables, x, phase='apply')

    def loss(params, stats, x):
        logits, new = model.apply(
            {'params': params, 'batch_stats': stats}, x, train=True, mutable=['batch_stats']
        )
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)
        return -picked.mean(), new

    grad = jit(jax.value_and_grad(loss, has_aux=True))
    args = (variables['params'], variables['batch_stats'], x)
    timed(grad, *args, phase='value_and_grad')
    times = [timed(grad, *args)[1] for _ in range(steps)]
    if times:
        print(json.dumps({'step': statistics.median(times)}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--models', nargs='+', default=['cifar_resnet1202', 'resnet50', 'resnet152']
    )
    parser.add_argument('--batch_size', type=int, default=8)
    parser.add_argument('--image_size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--steps', type=int, default=3, help='steps timed after the first')
    parser.add_argument('--trees', nargs='+', default=[os.getcwd()])
    parser.add_argument('--timeout', type=int, default=900, help='seconds per model and tree')
    parser.add_argument('--configure', action='store_true')
    parser.add_argument('--plan', default='', choices=['', 'auto', 'xla', 'cpu'])
    parser.add_argument('--child', default='', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child, args.batch_size, args.image_size, args.steps, args.configure, args.plan)
        return 0
    print(platform.processor() or platform.machine(), _cpu_model(), f'{os.cpu_count()} cores')

    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for model in args.models:
            for tree in args.trees:
                env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), TF_CPP_MIN_LOG_LEVEL='2')
                for var in ('JAX_COMPILATION_CACHE_DIR', 'JAX_DISABLE_MOST_OPTIMIZATIONS'):
                    env.pop(var, None)
                command = [sys.executable, os.path.abspath(__file__), f'--child={model}']
                command += (
                    [f'--{k}={getattr(args, k)}' for k in ('batch_size', 'image_size', 'steps')]
                    + ['--configure'] * args.configure
                    + [f'--plan={args.plan}'] * bool(args.plan)
                )
                try:
                    proc = subprocess.run(
                        command,
                        env=env,
                        cwd=tree,
                        capture_output=True,
                        text=True,
                        timeout=args.timeout,
                    )
                    out, failed = proc.stdout, proc.returncode and proc.stderr[-3000:]
                except subprocess.TimeoutExpired as e:
                    out, failed = (e.stdout or b'').decode(), ''
                if failed:
                    print(f'{tree} {model}: failed\n{failed}', file=sys.stderr)
                    return 1
                result = {'init': None, 'apply': None, 'value_and_grad': None, 'step': None}
                for line in out.splitlines():
                    if line.startswith('{'):
                        result.update(json.loads(line))
                options = result.pop('options', None)
                runs.setdefault((tree, model), []).append(result)
                shown = {k: v if v is None else round(v, 3) for k, v in result.items()}
                print(tree, model, shown, *(['options', options] if options else []), flush=True)
    print(f'\nseconds, median [min-max] of {args.rounds} rounds, batch {args.batch_size}:')
    medians = {}
    for (tree, model), results in runs.items():
        cells = []
        for key in results[0]:
            values = [r[key] for r in results if r[key] is not None]
            if len(values) < len(results):  # a child ran past --timeout in this phase
                cells.append(f'{key} >{args.timeout} s in {len(results) - len(values)} rounds')
            else:
                cells.append(
                    f'{key} {statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]'
                )
            medians.setdefault(model, {})[key] = statistics.median(values) if values else None
        print(f'{os.path.basename(os.path.abspath(tree))} {model}: ' + '  '.join(cells))
    print(json.dumps(medians if len(args.trees) == 1 else {}))  # the last line, for scripts
    return 0


if __name__ == '__main__':
    sys.exit(main())
