"""Training throughput of resnet_jax beside the same networks in PyTorch, in one run.

    pip install -e '.[bench]'
    python experiments/benchmark_vs_pytorch.py [--steps 5] [--rounds 3]
        [--nets cifar_resnet20:128 ...] [--dtype bfloat16]

Both sides: the same network (the PyTorch one built by ``torch_nets.torch_net`` from
resnet_jax's model), the same batch on synthetic data, SGD with momentum 0.9 and weight decay 1e-4,
one train step timed after warm-up (median over --steps; the two frameworks alternate
--rounds times and each reports its median round), on the device JAX uses (the
CPU, or the GPU where JAX's backend is one and torch sees CUDA). PyTorch runs with
channels_last, as many CPU threads as this process may use, cuDNN autotuning on a GPU,
and ``torch.autocast`` for bfloat16 (parameters float32, as in resnet_jax). Each network
runs in its own process, set up as ``resnet-jax train`` sets up a launch of it (XLA's
process options, ``backends.xla_options.configure``). Prints a table with the ratio (JAX / PyTorch
images/s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

DEFAULT_NETS = ('cifar_resnet20:128', 'cifar_resnet56:128', 'cifar_resnet110:128', 'resnet50:16')


def torch_images_per_sec(
    name: str, batch: int, steps: int, warmup: int = 3, device: str = 'cpu', dtype: str = 'float32'
) -> float:
    import torch
    import torch_nets

    from resnet_jax import models

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.backends.cudnn.benchmark = True
    model = models.create_model(name)
    size, classes = (32 if model.stem == 'cifar' else 224), model.num_classes
    net = torch_nets.torch_net(model).to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, torch.bfloat16, enabled=dtype == 'bfloat16'):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> int:
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--nets', nargs='+', default=list(DEFAULT_NETS), metavar='NAME:BATCH')
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    parser.add_argument(
        '--rounds',
        type=int,
        default=3,
        help='alternate the two frameworks this many times per network',
    )
    parser.add_argument('--rows-only', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("error: needs torch: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    from resnet_jax import models
    from resnet_jax.backends import xla_options
    from resnet_jax.config import base_config
    from resnet_jax.tools import benchmark

    if len(args.nets) > 1:  # each network in a process of its own
        for i, spec in enumerate(args.nets):
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    '--nets',
                    spec,
                    '--steps',
                    str(args.steps),
                    '--dtype',
                    args.dtype,
                    '--rounds',
                    str(args.rounds),
                    *(['--rows-only'] if i or args.rows_only else []),
                ],
                stdout=sys.stdout,
                stderr=sys.stderr,
            )
            if proc.returncode:
                return proc.returncode
        return 0
    name, batch = args.nets[0].split(':')
    xla_options.configure(models.create_model(name).stage_sizes)  # before JAX starts
    import jax

    device = 'cuda' if jax.default_backend() == 'gpu' and torch.cuda.is_available() else 'cpu'
    where = (
        f'{jax.devices()[0].device_kind}'
        if device == 'cuda'
        else f'{len(os.sched_getaffinity(0))} CPU cores'
    )
    if not args.rows_only:
        print(
            f'{where}, jax {jax.__version__} ({jax.default_backend()}), torch '
            f'{torch.__version__} ({device}), {args.dtype}, median of {args.rounds} '
            f'alternating rounds of {args.steps} steps each'
        )
        print(
            '| network, batch | PyTorch images/s | resnet_jax images/s | ratio | '
            'resnet_jax compile s |'
        )
        print('|---|---|---|---|---|', flush=True)
    # A shared machine's speed drifts: the two alternate (one compile for resnet_jax), and
    # each reports the median of its rounds (each the median of --steps steps).
    theirs = []
    config = base_config()
    config.model.name, config.model.dtype = name, args.dtype
    ours = benchmark.run(
        config,
        int(batch),
        steps=args.steps,
        rounds=args.rounds,
        between_rounds=lambda: theirs.append(
            torch_images_per_sec(name, int(batch), args.steps, device=device, dtype=args.dtype)
        ),
    )
    jax_rate, torch_rate = ours['train_images_per_sec'], statistics.median(theirs)
    print(
        f'| {name}, {batch} | {torch_rate:.1f} | {jax_rate:.1f} | '
        f'{jax_rate / torch_rate:.2f} | {ours["compile_seconds"]:.1f} |',
        flush=True,
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
