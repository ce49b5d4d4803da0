"""Where the CPU plan's train-step compile time goes, and what XLA:CPU options trade for it.

    python experiments/bench_train_step_compile.py [--model cifar_resnet1202] [--steps 0]
        [--batch_size 128] [--rounds 2] [--options '' OPTION[,OPTION...] ...] [--relaunch]
        [--json]

Each variant is one fresh process (no compilation cache) that builds the model's train
state and train step with ``resnet_jax.tools.benchmark.setup`` (the plan of the CPU backend;
CIFAR nets at 32x32, ImageNet nets at 224x224), and times ``lower()``, ``compile()`` and,
with ``--steps N``, the median of N steps after the first. A variant is a comma-separated
list of XLA:CPU backend options (``--xla_backend_extra_options``, a process's) and
``KEY=VALUE`` options of the program (``jax.jit``'s ``compiler_options``, which an
execution plan carries); '' is the plan's own.
With ``--relaunch``, each variant is launched twice on a fresh cache and the second
launch is timed: ``lower()`` (tracing and lowering, which no cache saves) and a compile
that JAX's compilation cache answers, as a relaunch of a run. The variants alternate
within each round, so that a shared machine's drift falls on all of them; the figures
printed are each variant's medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def program_options(variant: str) -> dict:
    """The ``KEY=VALUE`` items of a variant: options of the program (``jax.jit``'s
    ``compiler_options``), with values read as booleans or integers where they are."""
    options = {}
    for item in variant.split(','):
        if '=' in item:
            key, value = item.split('=', 1)
            options[key] = {'true': True, 'false': False}.get(
                value.lower(), int(value) if value.lstrip('-').isdigit() else value
            )
    return options


def backend_options(variant: str) -> list[str]:
    """The other items of a variant: XLA:CPU backend options."""
    return [item for item in variant.split(',') if item and '=' not in item]


def measure(
    model_name: str, steps: int, batch_size: int, variant: str = '', cache_dir: str = ''
) -> dict:
    """lower / compile / step seconds of ``model_name``'s train step in this process, with
    the variant's program options added to the plan's; with ``cache_dir``, JAX's
    compilation cache there."""
    import jax

    from resnet_jax import parallel
    from resnet_jax.config import base_config
    from resnet_jax.tools import benchmark

    if cache_dir:
        parallel.enable_compilation_cache(cache_dir)
    config = base_config()
    config.model.name = model_name
    s = benchmark.setup(config, batch_size, compiler_options=program_options(variant))
    state, batch, train_fn = s['state'], s['batch'], s['train_fn']
    start = time.perf_counter()
    lowered = train_fn.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    result = {
        'lower_seconds': lowered_at - start,
        'compile_seconds': time.perf_counter() - lowered_at,
    }
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
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--steps', type=int, default=0, help='steps timed after the first')
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument(
        '--options',
        nargs='+',
        default=[
            '',
            'xla_cpu_disable_loop_unrolling,xla_cpu_disable_slp_vectorizer',
            'xla_cpu_use_multi_output_fusion',
        ],
    )
    parser.add_argument('--json', action='store_true')
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--variant', default='', help=argparse.SUPPRESS)
    parser.add_argument('--cache_dir', default='', help=argparse.SUPPRESS)
    parser.add_argument(
        '--relaunch',
        action='store_true',
        help="time each variant's relaunch on JAX's compilation cache its first launch filled",
    )
    args = parser.parse_args()
    from resnet_jax.backends import xla_options

    if args.child:
        print(
            json.dumps(
                measure(args.model, args.steps, args.batch_size, args.variant, args.cache_dir)
            )
        )
        return 0

    def child(options: str, *flags: str) -> dict | None:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
        env.pop('JAX_COMPILATION_CACHE_DIR', None)
        env['XLA_FLAGS'] = xla_options.xla_flags_with(
            backend_options(options), env.get('XLA_FLAGS', '')
        )
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                '--child',
                f'--model={args.model}',
                f'--steps={args.steps}',
                f'--batch_size={args.batch_size}',
                f'--variant={options}',
                *flags,
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            print(f'{options or "defaults"}: failed\n{proc.stderr[-2000:]}', file=sys.stderr)
            return None
        return json.loads(proc.stdout.strip().splitlines()[-1])

    # (name, options, relaunched on JAX's compilation cache)
    variants = [
        (f'{o or "defaults"} relaunch' if args.relaunch else o, o, args.relaunch)
        for o in args.options
    ]
    runs = {name: [] for name, _, _ in variants}
    for _ in range(args.rounds):
        for name, options, relaunch in variants:
            if relaunch:  # a first launch fills a fresh cache; the relaunch is timed
                with tempfile.TemporaryDirectory() as cache:
                    result = child(options, f'--cache_dir={cache}') and child(
                        options, f'--cache_dir={cache}'
                    )
            else:
                result = child(options)
            if result is None:
                return 1
            runs[name].append(result)
            print(f'{name or "defaults"}: {result}', flush=True)
    summary = {
        o or 'defaults': {
            k: round(statistics.median(r[k] for r in rs), 3)
            for k in rs[0]
            if k.endswith('_seconds')
        }
        for o, rs in runs.items()
    }
    for name, figures in summary.items():
        print(
            f'{args.model} {name:<34} '
            + '  '.join(f'{k.replace("_seconds", "")} {v:.2f} s' for k, v in figures.items())
        )
    if args.json:
        print(json.dumps({'model': args.model, 'rounds': args.rounds, 'median': summary}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
