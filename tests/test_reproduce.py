"""experiments/reproduce.py: --list, --dry-run, --print-commands and --report."""

import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from resnet_jax import models
from resnet_jax.evaluation import responses as analysis

spec = importlib.util.spec_from_file_location('reproduce', REPO / 'experiments' / 'reproduce.py')
reproduce = importlib.util.module_from_spec(spec)
sys.modules['reproduce'] = reproduce  # dataclasses look their module up
spec.loader.exec_module(reproduce)

PAPER = ('table2', 'table3', 'table4', 'table6', 'fig4', 'fig6', 'fig7')


def test_list_names_the_seven_experiments(capsys):
    assert reproduce.main(['--list']) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names[:7] == list(PAPER)


@pytest.mark.parametrize('name', PAPER)
def test_dry_run_prints_every_run_and_the_paper_targets(name, capsys, tmp_path):
    assert reproduce.main([name, '--dry-run', f'--root={tmp_path}']) == 0
    out = capsys.readouterr().out
    experiment = reproduce.EXPERIMENTS[name]
    lines = out.strip().splitlines()
    assert len(lines) == 2 * len(experiment.runs)  # the run and its target, its launch line
    for run, launch in zip(experiment.runs, lines[1::2]):
        workdir = tmp_path / name / run.name
        assert launch.strip() == (
            f'python -m resnet_jax.main --config={run.config} '
            f'--workdir={workdir} {" ".join(run.overrides)}'.rstrip()
            + f' && python -m resnet_jax evaluate --workdir={workdir} '
            f'--protocol={run.protocol}'
        )
    assert not list(tmp_path.iterdir())  # nothing ran
    if name == 'table6':
        assert 'resnet20: paper: top-1 8.75% (center)' in out
    if name == 'table3':
        assert 'top-1 22.85%, top-5 6.71% (ten_crop)' in out


@pytest.mark.parametrize('name', PAPER)
def test_print_commands_emits_train_and_eval_lines(name, capsys):
    assert reproduce.main([name, '--print-commands']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(reproduce.EXPERIMENTS[name].runs)
    assert all(
        line.startswith('python -m resnet_jax.main --config=configs/')
        and '&& python -m resnet_jax evaluate' in line
        for line in lines
    )


def fake_workdir(root, run, top1, top5=None, protocol=None):
    workdir = root / run
    workdir.mkdir(parents=True)
    history = {
        'train': [{'step': s, 'train_top1_error': 0.9 - s / 2000} for s in (10, 20, 30)],
        'eval': [{'step': s, 'eval_top1_error': 0.95 - s / 2000} for s in (10, 30)],
    }
    (workdir / 'history.json').write_text(json.dumps(history))
    (workdir / 'results.json').write_text(
        json.dumps(
            {
                'step': 30,
                'eval_top1_error': top1 / 100,
                'eval_top5_error': (top5 or 1.0) / 100,
                'train_top1_error': 0.5,
            }
        )
    )
    if protocol:
        (workdir / f'eval_{protocol}.json').write_text(
            json.dumps({'top1_error': top1 / 100 - 0.01, 'top5_error': (top5 or 1.0) / 100})
        )
    return workdir


def test_report_sets_the_runs_beside_the_paper(tmp_path):
    dirs = [fake_workdir(tmp_path, 'resnet20', 9.75), fake_workdir(tmp_path, 'resnet56', 7.0)]
    path = reproduce.report('table6', dirs, tmp_path / 'out')
    text = path.read_text()
    assert '| resnet20 | center (results.json) | 30 | 8.75 | 9.75 | 1.00 |' in text
    assert '| resnet56 | center (results.json) | 30 | 6.97 | 7.00 | 0.03 |' in text
    assert 'resnet110' not in text  # only the runs given
    assert (tmp_path / 'out' / 'table6_curves.png').stat().st_size > 10_000


def test_report_uses_the_protocol_the_paper_measured(tmp_path):
    dirs = [fake_workdir(tmp_path, 'resnet50', 23.85, 7.71, protocol='ten_crop')]
    text = reproduce.report('table3', dirs, tmp_path / 'out').read_text()
    assert '| resnet50 | ten_crop | 30 | 22.85 | 22.85 | 0.00 | 6.71 | 7.71 | 1.00 |' in text


def test_curve_report_has_plain_and_residual_panels(tmp_path):
    dirs = [fake_workdir(tmp_path, n, 10.0) for n in ('plain20', 'plain56', 'resnet20')]
    reproduce.report('fig6', dirs, tmp_path / 'out')
    assert (tmp_path / 'out' / 'fig6_curves.png').exists()


def test_report_of_unrelated_workdirs_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match='none of the workdirs'):
        reproduce.report('table2', [fake_workdir(tmp_path, 'other', 1.0)], tmp_path / 'o')


def test_layer_responses_follow_fig7s_definition():
    model = models.create_model('cifar_resnet8')
    variables = model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    stds = analysis.layer_responses(model, variables, images)
    assert len(stds) == 1 + 6  # the 3x3 stem and 6 3x3 convs (option A: no projections)
    _, state = model.apply(variables, images, capture_intermediates=True, mutable=['intermediates'])
    bn = state['intermediates']['conv3_1']['bn2']['__call__'][0]  # before the addition
    assert stds[4] == pytest.approx(float(np.std(np.asarray(bn, np.float64))), rel=1e-6)
    plain = models.create_model('cifar_plain20')
    plain_vars = plain.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))
    assert len(analysis.layer_responses(plain, plain_vars, images)) == 19


def trained_like_workdir(root, run, data_dir):
    """A workdir with a real checkpoint (freshly initialised) of the run's CIFAR net on the
    digits, plus fake results and history: enough for every part of a report."""
    from resnet_jax.config import base_config
    from resnet_jax.training import runs

    workdir = fake_workdir(root, run, 10.0)
    config = base_config()
    config.model.name = f'cifar_{run}'
    config.dataset.data_dir = data_dir
    model = models.create_model(config.model.name)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    runs.save_variables(workdir, variables, config)
    return workdir


@pytest.mark.parametrize('name', PAPER)
def test_report_of_every_experiment(name, tmp_path, data_dir):
    experiment = reproduce.EXPERIMENTS[name]
    runs = [r.name for r in experiment.runs][:2]
    if experiment.figure == 'responses':
        dirs = [trained_like_workdir(tmp_path, r, data_dir) for r in runs]
    else:
        dirs = [
            fake_workdir(tmp_path, r, 30.0, 9.0, protocol=experiment.runs[0].protocol) for r in runs
        ]
    text = reproduce.report(name, dirs, tmp_path / 'out').read_text()
    assert text.startswith(f'# {name}: ') and all(f'| {r} |' in text for r in runs)
    for run in experiment.runs[:2]:
        if run.paper_top1 is not None:
            assert f'| {run.paper_top1:.2f} |' in text
    if experiment.figure == 'curves':
        assert (tmp_path / 'out' / f'{name}_curves.png').exists()
    if experiment.figure == 'responses':
        assert (tmp_path / 'out' / f'{name}_responses.png').exists()
        assert '| plain20 |' in text and '| 19 |' in text  # 19 3x3 layers in a 20-layer net


def test_plot_cli_overlays_runs(tmp_path):
    dirs = [fake_workdir(tmp_path, n, 10.0) for n in ('a', 'b')]
    out = tmp_path / 'overlay.png'
    plot = [sys.executable, '-m', 'resnet_jax', 'plot']
    proc = subprocess.run(
        [*plot, *map(str, dirs), f'--output={out}'], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.stat().st_size > 10_000
    proc = subprocess.run(
        [*plot, str(tmp_path / 'missing')], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f'error: {tmp_path / "missing"} has no history.json (is it a finished run?)'
    )
