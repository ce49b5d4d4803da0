"""Training curves drawn like the paper's Fig. 4 and 6: train error dashed, test bold (and
the EMA's test error dotted).

    resnet-jax plot <workdir>... [--output=curves.png]
"""

from __future__ import annotations

import json
import pathlib

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from etils import epath  # noqa: E402


def draw_history(ax, history: dict, label: str, color: str, with_label: bool = True) -> None:
    """One run's training error (dashed, thin) and test error (bold), in %; the test error
    of its weights' moving average (dotted) when it has one."""
    train, evals = history.get('train', []), history.get('eval', [])
    if train:
        ax.plot(
            [r['step'] for r in train],
            [100 * r['train_top1_error'] for r in train],
            '--',
            color=color,
            linewidth=1,
            alpha=0.85,
            label=f'{label} train' if with_label else None,
        )
    if evals:
        ax.plot(
            [r['step'] for r in evals],
            [100 * r['eval_top1_error'] for r in evals],
            '-',
            color=color,
            linewidth=2.5,
            label=f'{label} test' if with_label else None,
        )
    ema = [r for r in evals if 'eval_ema_top1_error' in r]
    if ema:
        ax.plot(
            [r['step'] for r in ema],
            [100 * r['eval_ema_top1_error'] for r in ema],
            ':',
            color=color,
            linewidth=2,
            label=f'{label} test (EMA)' if with_label else None,
        )


def style_axes(
    ax, title: str | None = None, xlabel: str = 'iteration', ylabel: str = 'error (%)'
) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)


def save(fig, path, title: str | None = None) -> None:
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with epath.Path(path).open('wb') as f:  # a local file or an object in a bucket
        fig.savefig(f, dpi=120, format='png')
    plt.close(fig)


def plot_runs(histories: dict[str, dict], path, title: str | None = None) -> None:
    """One colour per run: training error (dashed, thin) and test error (bold) in %."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, (label, history) in enumerate(histories.items()):
        draw_history(ax, history, label, f'C{i}')
    style_axes(ax)
    save(fig, path, title)


def load_history(workdir: pathlib.Path) -> dict:
    return json.loads((epath.Path(workdir) / 'history.json').read_text())
