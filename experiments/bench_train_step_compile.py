"""Where the CPU plan's train-step compile time goes, and what XLA:CPU options trade for it.

    python experiments/bench_train_step_compile.py [--model cifar_resnet1202] [--steps 0]
        [--batch-size 128] [--rounds 2] [--options '' OPTION[,OPTION...] ...] [--json]

Each variant is one fresh process (no compilation cache) that builds the model's train
state and train step with ``resnet_jax.benchmark.setup`` (the plan of the CPU backend;
CIFAR nets at 32x32, ImageNet nets at 224x224), and times ``lower()``, ``compile()`` and,
with ``--steps N``, the median of N steps after the first. A variant is a comma-separated
list of XLA:CPU backend options (``--xla_backend_extra_options``; '' is XLA's defaults).
The variants alternate within each round, so that a shared machine's drift falls on all
of them; the figures printed are each variant's medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def measure(model_name: str, steps: int, batch_size: int) -> dict:
    """lower / compile / step seconds of ``model_name``'s train step in this process."""
    import jax

    from resnet_jax import benchmark

    s = benchmark.setup(model_name, batch_size)
    state, batch, train_fn = s['state'], s['batch'], s['train_fn']
    start = time.perf_counter()
    lowered = train_fn.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    result = {'lower_seconds': lowered_at - start,
              'compile_seconds': time.perf_counter() - lowered_at}
    times = []
    for _ in range(steps + 1 if steps else 0):
        start = time.perf_counter()
        state, _ = compiled(state, batch)
        jax.block_until_ready(state.params)
        times.append(time.perf_counter() - start)
    if times:
        result['step_seconds'] = statistics.median(times[1:])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='cifar_resnet1202')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--steps', type=int, default=0, help='steps timed after the first')
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--options', nargs='+', default=[
        '', 'xla_cpu_disable_loop_unrolling,xla_cpu_disable_slp_vectorizer',
        'xla_cpu_use_multi_output_fusion'])
    parser.add_argument('--json', action='store_true')
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.steps, args.batch_size)))
        return 0
    runs = {o: [] for o in args.options}
    for _ in range(args.rounds):
        for options in args.options:
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
            env.pop('JAX_COMPILATION_CACHE_DIR', None)
            if options:
                env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                                    f' --xla_backend_extra_options={options}').strip()
            proc = subprocess.run(
                [sys.executable, __file__, '--child', f'--model={args.model}',
                 f'--steps={args.steps}', f'--batch-size={args.batch_size}'],
                env=env, capture_output=True, text=True)
            if proc.returncode:
                print(f'{options or "defaults"}: failed\n{proc.stderr[-2000:]}',
                      file=sys.stderr)
                return 1
            runs[options].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f'{options or "defaults"}: {runs[options][-1]}', flush=True)
    summary = {o or 'defaults': {k: round(statistics.median(r[k] for r in rs), 3)
                                 for k in rs[0]} for o, rs in runs.items()}
    for name, figures in summary.items():
        print(f'{args.model} {name:<34} ' + '  '.join(
            f'{k.replace("_seconds", "")} {v:.2f} s' for k, v in figures.items()))
    if args.json:
        print(json.dumps({'model': args.model, 'rounds': args.rounds, 'median': summary}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
