"""What keeping the train state in the model's own tree costs a CPU train step.

    python experiments/bench_state_layout.py --old /path/to/checkout/at/an/older/commit \
        [--nets cifar_resnet56:128 cifar_resnet110:128 resnet50:16] [--rounds 3]

Since the loop, the checkpoints and evaluation all see the model's own tree, the CPU
plan's compiled train step stacks the scanned blocks' variables on entry and unstacks them
on exit (``backends.plans.compile_steps``); before, the loop kept the state stacked. This
times both: each net's ``resnet-jax benchmark`` in this checkout and
``python -m resnet_jax.benchmark`` in ``--old`` (a checkout of the earlier layout), one
fresh process each, alternating, ``--rounds`` times, and prints each side's median train
step and compile time with their ranges.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def measure(tree: pathlib.Path, new: bool, net: str, batch: int, steps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), TF_CPP_MIN_LOG_LEVEL='2')
    env.pop('JAX_COMPILATION_CACHE_DIR', None)
    args = (['-m', 'resnet_jax', 'benchmark', f'--model={net}', f'--batch_size={batch}',
             f'--steps={steps}', '--json'] if new else
            ['-m', 'resnet_jax.benchmark', '--model', net, '--batch-size', str(batch),
             '--steps', str(steps), '--json'])
    proc = subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--old', required=True, type=pathlib.Path)
    parser.add_argument('--nets', nargs='+',
                        default=['cifar_resnet56:128', 'cifar_resnet110:128', 'resnet50:16'])
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--steps', type=int, default=5)
    args = parser.parse_args()
    print(f'| net, batch | stacked in the loop: step s | model\'s tree, stacked in the step: '
          f'step s | ratio | compile s (loop / step) |')
    print('|---|---|---|---|---|')
    for spec in args.nets:
        net, batch = spec.split(':')
        runs = {'old': [], 'new': []}
        for _ in range(args.rounds):
            for side in ('old', 'new'):
                tree = args.old if side == 'old' else REPO
                runs[side].append(measure(tree, side == 'new', net, int(batch), args.steps))
        step = {s: [r['train_step_seconds'] for r in rs] for s, rs in runs.items()}
        comp = {s: statistics.median(r['compile_seconds'] for r in rs) for s, rs in runs.items()}
        med = {s: statistics.median(v) for s, v in step.items()}
        print(f'| {net}, {batch} | {med["old"]:.3f} ({min(step["old"]):.3f}-'
              f'{max(step["old"]):.3f}) | {med["new"]:.3f} ({min(step["new"]):.3f}-'
              f'{max(step["new"]):.3f}) | {med["new"] / med["old"]:.3f} | '
              f'{comp["old"]:.1f} / {comp["new"]:.1f} |', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
