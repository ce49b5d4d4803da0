"""Every table and figure of the paper as a runnable experiment, with a report beside it.

    python experiments/reproduce.py --list
    python experiments/reproduce.py table6 --dry-run            # the runs and the targets
    python experiments/reproduce.py table6                      # run them here, one by one
    python experiments/reproduce.py table3 --print-commands     # launch lines for a pod
    python experiments/reproduce.py table6 --report workdirs/reproduce/table6/*

``--report`` collects the runs' metrics into a markdown table (paper, run, difference) and
draws the figure like the paper's: Fig. 4/6 training error dashed and test error bold
against iterations, plain nets left and residual nets right; Fig. 7 the std of each 3x3
layer's response in layer order (top) and sorted (bottom). ``cpu_fig6`` is the CPU-size
version of Fig. 6/7 on the embedded digits set (see experiments/results/). ``large_batch``
runs the large-batch ImageNet recipes that pod users start from (Goyal et al. 2017 at batch
8192, LARS at 32k), set beside their own papers' errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shlex
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # resnet_jax, also when not installed

from resnet_jax import models, paper  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # also the workdir's name
    config: str  # configs/<file>.py:<arg>
    overrides: tuple[str, ...] = ()
    protocol: str = 'center'  # how the paper measured this number
    paper_top1: float | None = None
    paper_top5: float | None = None
    panel: str = ''  # 'plain' or 'residual' for the curve figures
    source: str = 'paper'  # where the target comes from, when not He et al.


@dataclasses.dataclass(frozen=True)
class Experiment:
    description: str
    runs: tuple[Run, ...]
    figure: str | None = None  # 'curves' (Fig. 4/6), 'responses' (Fig. 7)


def _imagenet(name, protocol, panel=''):
    """An ImageNet run with the paper's error for ``protocol`` (none for 'center')."""
    top1, top5 = {'ten_crop': paper.TEN_CROP, 'multiscale': paper.MULTISCALE}.get(protocol, {}).get(
        name, (None, None)
    )
    return Run(name, f'configs/imagenet.py:{name}', (), protocol, top1, top5, panel)


def _large_batch(name):
    """A large-batch ImageNet recipe with its own paper's single-crop error."""
    top1, top5 = paper.LARGE_BATCH[name]
    return Run(
        name,
        f'configs/imagenet.py:{name}',
        (),
        'center',
        top1,
        top5,
        source=paper.LARGE_BATCH_SOURCES[name],
    )


def _cifar(name, panel='', overrides=()):
    parsed = models.parse_cifar_name(f'cifar_{name}')
    top1 = paper.CIFAR10.get(parsed[1]) if parsed and parsed[0] else None
    return Run(name, f'configs/cifar10.py:{name}', tuple(overrides), 'center', top1, None, panel)


# The CPU-size reproduction: the paper's CIFAR recipe shortened, on the embedded digits.
CPU_SCHEDULE = (
    '--config.num_train_steps=300',
    '--config.lr_boundaries=(150,225)',
    '--config.batch_size=64',
    '--config.log_every_steps=10',
    '--config.eval_every_steps=25',
    '--config.checkpoint_every_steps=100',
)


def _cpu(net, seed):
    return Run(
        f'{net}_seed{seed}',
        'configs/default.py',
        (f'--config.model.name=cifar_{net}', f'--config.seed={seed}') + CPU_SCHEDULE,
        'center',
        None,
        None,
        'plain' if net.startswith('plain') else 'residual',
    )


EXPERIMENTS = {
    'table2': Experiment(
        'ImageNet, plain vs residual 18/34 (option A), 10-crop top-1 error',
        tuple(_imagenet(n, 'ten_crop') for n in ('plain18', 'plain34', 'resnet18', 'resnet34a')),
    ),
    'table3': Experiment(
        'ImageNet, shortcut options and depth, 10-crop error',
        tuple(
            _imagenet(n, 'ten_crop')
            for n in (
                'plain34',
                'resnet34a',
                'resnet34b',
                'resnet34c',
                'resnet50',
                'resnet101',
                'resnet152',
            )
        ),
    ),
    'table4': Experiment(
        'ImageNet, single models, multi-scale fully-convolutional error',
        tuple(_imagenet(n, 'multiscale') for n in paper.MULTISCALE),
    ),
    'table6': Experiment(
        'CIFAR-10 test error of the residual nets',
        tuple(_cifar(f'resnet{d}') for d in paper.CIFAR10),
        'curves',
    ),
    'fig4': Experiment(
        'ImageNet training curves: plain-18/34 (degradation) vs ResNet-18/34',
        (
            _imagenet('plain18', 'center', panel='plain'),
            _imagenet('plain34', 'center', panel='plain'),
            _imagenet('resnet18', 'center', panel='residual'),
            _imagenet('resnet34a', 'center', panel='residual'),
        ),
        'curves',
    ),
    'fig6': Experiment(
        'CIFAR-10 curves: plain-20..56 (deeper is worse) vs ResNet-20..110',
        tuple(
            [_cifar(f'plain{d}', panel='plain') for d in (20, 32, 44, 56)]
            + [_cifar(f'resnet{d}', panel='residual') for d in (20, 32, 44, 56, 110)]
        ),
        'curves',
    ),
    'fig7': Experiment(
        'CIFAR-10 std of 3x3 layer responses: plain-20/56, ResNet-20/56/110',
        (
            _cifar('plain20'),
            _cifar('plain56'),
            _cifar('resnet20'),
            _cifar('resnet56'),
            _cifar('resnet110'),
        ),
        'responses',
    ),
    'cpu_fig6': Experiment(
        'CPU-size Fig. 6/7 on the embedded digits: plain/resnet 20 vs 56, 2 seeds, 300 iterations',
        tuple(
            _cpu(net, seed)
            for net in ('plain20', 'plain56', 'resnet20', 'resnet56')
            for seed in (0, 1)
        ),
        'curves+responses',
    ),
    'large_batch': Experiment(
        'ImageNet ResNet-50 large-batch recipes, centre-crop top-1 error: Goyal et al. 2017 '
        f'batch 8192 {paper.LARGE_BATCH["resnet50_goyal8k"][0]}%, LARS batch 32k (You et '
        f'al. 2018) {paper.LARGE_BATCH["resnet50_lars32k"][0]}%',
        tuple(_large_batch(n) for n in paper.LARGE_BATCH),
        'curves',
    ),
}
PAPER_EXPERIMENTS = ('table2', 'table3', 'table4', 'table6', 'fig4', 'fig6', 'fig7')


def train_command(run: Run, workdir: pathlib.Path, python: str = sys.executable) -> list[str]:
    return [
        python,
        '-m',
        'resnet_jax.main',
        f'--config={run.config}',
        f'--workdir={workdir}',
        *run.overrides,
    ]


def eval_command(run: Run, workdir: pathlib.Path, python: str = sys.executable) -> list[str]:
    return [
        python,
        '-m',
        'resnet_jax',
        'evaluate',
        f'--workdir={workdir}',
        f'--protocol={run.protocol}',
    ]


def _target(run: Run) -> str:
    if run.paper_top1 is None:
        return 'paper: curve only'
    top5 = f', top-5 {run.paper_top5}%' if run.paper_top5 is not None else ''
    return f'{run.source}: top-1 {run.paper_top1}%{top5} ({run.protocol})'


# --- reports ---------------------------------------------------------------------------------


def _load(workdir: pathlib.Path, protocol: str) -> dict:
    """A run's errors in %: from its eval_<protocol>.json, else results.json (centre view)."""
    out = {}
    evaluated = workdir / f'eval_{protocol}.json'
    results = workdir / 'results.json'
    if evaluated.exists():
        r = json.loads(evaluated.read_text())
        out.update(top1=100 * r['top1_error'], top5=100 * r['top5_error'], source=protocol)
    elif results.exists():
        r = json.loads(results.read_text())
        out.update(
            top1=100 * r['eval_top1_error'],
            top5=100 * r['eval_top5_error'],
            source='center (results.json)',
        )
    if results.exists():
        r = json.loads(results.read_text())
        out.update(train=100 * r.get('train_top1_error', float('nan')), step=r['step'])
    history = workdir / 'history.json'
    if history.exists():
        out['history'] = json.loads(history.read_text())
    return out


def _match(experiment: Experiment, workdirs: list[pathlib.Path]) -> list[tuple[Run, pathlib.Path]]:
    by_name = {w.name: w for w in workdirs}
    return [(run, by_name[run.name]) for run in experiment.runs if run.name in by_name]


def _fmt(x):
    return '' if x is None else f'{x:.2f}'


def report_table(experiment: Experiment, matched) -> str:
    lines = [
        '| run | protocol | step | paper top-1 | run top-1 | diff | paper top-5 | '
        'run top-5 | diff | run train error |',
        '|' + '---|' * 10,
    ]
    for run, workdir in matched:
        r = _load(workdir, run.protocol)
        top1, top5 = r.get('top1'), r.get('top5')
        d1 = top1 - run.paper_top1 if top1 is not None and run.paper_top1 is not None else None
        d5 = top5 - run.paper_top5 if top5 is not None and run.paper_top5 is not None else None
        lines.append(
            f'| {run.name} | {r.get("source", "(no results)")} | {r.get("step", "")} | '
            f'{_fmt(run.paper_top1)} | {_fmt(top1)} | {_fmt(d1)} | '
            f'{_fmt(run.paper_top5)} | {_fmt(top5)} | {_fmt(d5)} | '
            f'{_fmt(r.get("train"))} |'
        )
    return '\n'.join(lines)


def plot_curves(matched, path: pathlib.Path, title: str) -> None:
    """Fig. 4/6: training error dashed, test error bold; plain left, residual right."""
    import matplotlib.pyplot as plt

    from resnet_jax.training import curves  # selects the Agg backend first

    panels = [p for p in ('plain', 'residual') if any(r.panel == p for r, _ in matched)]
    panels = panels or ['']
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False, sharey=True
    )
    colors: dict[str, str] = {}
    for ax, panel in zip(axes[0], panels):
        for run, workdir in matched:
            history = _load(workdir, run.protocol).get('history')
            if (panel and run.panel != panel) or not history:
                continue
            label = run.name.split('_seed')[0]  # seeds of one net share a colour and label
            first = label not in {line.get_label().rsplit(' ', 1)[0] for line in ax.get_lines()}
            curves.draw_history(
                ax, history, label, colors.setdefault(label, f'C{len(colors)}'), with_label=first
            )
        curves.style_axes(ax, f'{panel} nets' if panel else None)
    curves.save(fig, path, title)


def layer_response_stds(workdir: pathlib.Path, num_images: int = 256):
    """Fig. 7's per-layer stds of a trained run, on its test images."""
    import numpy as np

    import resnet_jax
    from resnet_jax.data import pipeline as input_pipeline
    from resnet_jax.evaluation import responses as analysis

    model, variables, config, _ = resnet_jax.load(workdir)
    pipeline = input_pipeline.Pipeline(config.dataset, config.seed)
    n = min(num_images, len(pipeline.eval))
    images = np.stack([pipeline.center_view(im) for im, _ in pipeline.eval_images(range(n))])
    return analysis.layer_responses(model, variables, images)


def plot_responses(matched, path: pathlib.Path, title: str) -> dict[str, list[float]]:
    """Fig. 7: std per 3x3 layer in layer order (top) and sorted descending (bottom)."""
    import matplotlib.pyplot as plt
    import numpy as np

    from resnet_jax.training import curves  # selects the Agg backend first

    stds: dict[str, list] = {}
    for run, workdir in matched:
        label = run.name.split('_seed')[0]
        stds.setdefault(label, []).append(layer_response_stds(workdir))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7))
    means = {}
    for i, (label, runs) in enumerate(stds.items()):
        mean = np.mean(runs, axis=0)
        means[label] = mean.tolist()
        style = '--' if label.startswith('plain') else '-'
        top.plot(np.arange(1, len(mean) + 1), mean, style, color=f'C{i}', label=label)
        bottom.plot(
            np.arange(1, len(mean) + 1), np.sort(mean)[::-1], style, color=f'C{i}', label=label
        )
    curves.style_axes(top, xlabel='layer index (original)', ylabel='std')
    curves.style_axes(bottom, xlabel='layer index (sorted by magnitude)', ylabel='std')
    curves.save(fig, path, title)
    return means


def report(name: str, workdirs: list[pathlib.Path], out: pathlib.Path) -> pathlib.Path:
    experiment = EXPERIMENTS[name]
    matched = _match(experiment, workdirs)
    if not matched:
        raise SystemExit(
            f'error: none of the workdirs is named like a run of {name} '
            f'({", ".join(r.name for r in experiment.runs)})'
        )
    out.mkdir(parents=True, exist_ok=True)
    text = [f'# {name}: {experiment.description}', '', report_table(experiment, matched), '']
    figure = experiment.figure or ''
    if 'curves' in figure:
        path = out / f'{name}_curves.png'
        plot_curves(matched, path, experiment.description)
        text += [f'![{name} curves]({path.name})', '']
    if 'responses' in figure:
        path = out / f'{name}_responses.png'
        means = plot_responses(matched, path, experiment.description)
        text += [
            f'![{name} layer responses]({path.name})',
            '',
            '| net | mean std of 3x3 responses | layers |',
            '|---|---|---|',
        ]
        text += [f'| {k} | {sum(v) / len(v):.3f} | {len(v)} |' for k, v in means.items()]
        text.append('')
    path = out / f'{name}_report.md'
    path.write_text('\n'.join(text))
    return path


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # tf.data feeds the evaluations
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('experiment', nargs='?', choices=sorted(EXPERIMENTS))
    parser.add_argument('--list', action='store_true', help='name the experiments')
    parser.add_argument(
        '--dry-run', action='store_true', help='print each run: its target and its launch line'
    )
    parser.add_argument(
        '--print-commands',
        action='store_true',
        help='print the launch lines (for a cluster or pod) and exit',
    )
    parser.add_argument('--report', nargs='+', type=pathlib.Path, metavar='WORKDIR')
    parser.add_argument(
        '--root',
        type=pathlib.Path,
        default=pathlib.Path('workdirs/reproduce'),
        help="where the runs' workdirs go (<root>/<experiment>/<run>)",
    )
    parser.add_argument(
        '--out',
        type=pathlib.Path,
        default=None,
        help='report directory (default: <root>/<experiment>/report)',
    )
    args = parser.parse_args(argv)
    if args.list:
        for name in PAPER_EXPERIMENTS + ('cpu_fig6', 'large_batch'):
            print(f'{name:11} {EXPERIMENTS[name].description}')
        return 0
    if not args.experiment:
        parser.error('name an experiment (or --list)')
    experiment = EXPERIMENTS[args.experiment]
    root = args.root / args.experiment
    if args.report:
        path = report(args.experiment, args.report, args.out or root / 'report')
        print(path.read_text())
        print(f'wrote {path}')
        return 0
    for run in experiment.runs:
        workdir = root / run.name
        launch = (
            shlex.join(train_command(run, workdir, 'python'))
            + ' && '
            + shlex.join(eval_command(run, workdir, 'python'))
        )
        if args.dry_run:
            print(f'{run.name}: {_target(run)}\n  {launch}')
        elif args.print_commands:
            print(launch)
        else:
            for cmd in (train_command(run, workdir), eval_command(run, workdir)):
                print('+', shlex.join(cmd), flush=True)
                subprocess.run(cmd, cwd=REPO, check=True)
    if not (args.dry_run or args.print_commands):
        path = report(
            args.experiment, [root / r.name for r in experiment.runs], args.out or root / 'report'
        )
        print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
