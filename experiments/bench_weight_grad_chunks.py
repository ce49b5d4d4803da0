"""How many examples a chunk of the CPU plan's weight gradient should hold, on this host.

    python experiments/bench_weight_grad_chunks.py [--batch 128] [--rounds 5] [--scan] [--json]

``cpu_ops.canonical_conv`` computes a 3x3 convolution's weight gradient as a sum over
chunks of the batch, one convolution each (``cpu_ops.weight_grad_chunk``). Each chunk is
one more convolution in the compiled program, so fewer, larger chunks compile faster; this
times the weight gradient alone (jitted, the chunks summed as the plan sums them) for the
CIFAR nets' 3x3 convolutions at each chunk size that divides the batch, alternating the
sizes within each round, and prints each one's median milliseconds (``--json``: and the
compile time of each). ``--scan`` adds the plan's chunk size with the chunks summed in a
``lax.scan`` ('scan'): one chunk convolution compiled instead of one per chunk.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.backends import cpu_ops

# (height, in channels, out channels, stride) of the CIFAR nets' 3x3 convolutions.
CIFAR_SHAPES = [
    (32, 3, 16, 1),
    (32, 16, 16, 1),
    (32, 16, 32, 2),
    (16, 32, 32, 1),
    (16, 32, 64, 2),
    (8, 64, 64, 1),
]


def weight_grad(x, g, stride: int, chunk: int):
    """The plan's weight gradient of a 3x3 convolution, padding 1, in chunks of ``chunk``."""
    return cpu_ops.weight_grad(x, g, (3, 3), stride, ((1, 1), (1, 1)), None, chunk)


def weight_grad_scanned(x, g, stride: int, chunk: int):
    """``weight_grad`` with the chunks summed in a ``lax.scan`` (the same sums, in order)."""

    def add(total, chunk_xg):
        return total + weight_grad(*chunk_xg, stride, chunk), None

    xs = x.reshape(-1, chunk, *x.shape[1:])
    gs = g.reshape(-1, chunk, *g.shape[1:])
    zeros = jnp.zeros((x.shape[3], 3, 3, g.shape[3]), x.dtype)
    return lax.scan(add, zeros, (xs, gs))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--repeats', type=int, default=5, help='calls timed per round')
    parser.add_argument(
        '--scan',
        action='store_true',
        help="also the plan's chunk size with the chunks in a lax.scan",
    )
    parser.add_argument('--json', action='store_true')
    args = parser.parse_args()
    chunks = [c for c in (8, 16, 32, 64, 128, 256) if c <= args.batch and args.batch % c == 0]
    plan_chunk = cpu_ops.weight_grad_chunk((args.batch,))
    variants = {c: functools.partial(weight_grad, chunk=c) for c in chunks}
    if args.scan and args.batch % plan_chunk:
        parser.error(
            f"--scan needs a batch that is a multiple of the plan's chunk "
            f'({plan_chunk}); got {args.batch}'
        )
    if args.scan:
        variants['scan'] = functools.partial(weight_grad_scanned, chunk=plan_chunk)
    rows = []
    for height, cin, cout, stride in CIFAR_SHAPES:
        out = height // stride
        kx, kg = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, (args.batch, height, height, cin), jnp.float32)
        g = jax.random.normal(kg, (args.batch, out, out, cout), jnp.float32)
        fns, compile_s = {}, {}
        for c, fn in variants.items():
            start = time.perf_counter()
            fns[c] = jax.jit(functools.partial(fn, stride=stride)).lower(x, g).compile()
            compile_s[c] = time.perf_counter() - start
            fns[c](x, g).block_until_ready()
        times = {c: [] for c in variants}
        for _ in range(args.rounds):
            for c in variants:
                start = time.perf_counter()
                for _ in range(args.repeats):
                    fns[c](x, g).block_until_ready()
                times[c].append((time.perf_counter() - start) / args.repeats * 1e3)
        row = {
            'shape': f'{args.batch}x{height}x{height}x{cin}->{cout}/s{stride}',
            'ms': {c: round(statistics.median(t), 3) for c, t in times.items()},
            'compile_s': {c: round(s, 3) for c, s in compile_s.items()},
        }
        rows.append(row)
        if not args.json:
            best = min(row['ms'], key=row['ms'].get)
            print(
                f'{row["shape"]:<26} '
                + '  '.join(f'{c}: {row["ms"][c]:7.2f} ms' for c in variants)
                + f'   fastest: {best}',
                flush=True,
            )
    totals = {c: round(sum(r['ms'][c] for r in rows), 2) for c in variants}
    if args.json:
        print(json.dumps({'batch': args.batch, 'rows': rows, 'total_ms': totals}))
    else:
        print('sum over the shapes: ' + '  '.join(f'{c}: {t:.2f} ms' for c, t in totals.items()))


if __name__ == '__main__':
    main()
