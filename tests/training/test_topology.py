"""A run moves between topologies: saved on 4 devices, resumed on 2, on 8, and on 2
processes x 2 devices, restored into the new mesh's shardings. Global batch k holds the
same examples on any topology, so the resumed run follows the uninterrupted one; the
gradients' sums over devices add in another order, so the losses agree to float32
rounding (``RTOL``), not bit for bit; on the same topology a resume is bit-exact
(test_faults)."""

import json
import re
import shutil

import jax
import pytest
from test_faults import _two_processes, finish, launch
from test_train import tiny_config

from resnet_jax.training import loop as train

RTOL = 1e-4  # float32 sums in another order, over a few steps


def history(workdir):
    return json.loads((workdir / 'history.json').read_text())


def assert_follows(moved, full):
    """Every record of the uninterrupted run is in the moved run's history (which also
    holds the saving launch's last step), with the same losses and errors."""
    a, b = history(full), history(moved)
    for part in ('train', 'eval'):
        by_step = {r['step']: r for r in b[part]}
        assert {r['step'] for r in a[part]} <= set(by_step) and max(by_step) == 6, part
        for x in a[part]:
            for key, value in x.items():
                if key.endswith(('loss', 'error')):
                    got = by_step[x['step']][key]
                    assert got == pytest.approx(value, rel=RTOL, abs=1e-6), (part, x['step'], key)


def test_a_run_saved_on_4_devices_resumes_on_2(data_dir, tmp_path):
    config = tiny_config(data_dir, batch_size=32, checkpoint_every_steps=2)
    train.train_and_evaluate(config, str(tmp_path / 'full'))
    config.num_train_steps = 4  # saved where a log step ends (a log averages its steps)
    train.train_and_evaluate(config, str(tmp_path / 'moved'))
    config.num_train_steps = 6
    results = train.train_and_evaluate(config, str(tmp_path / 'moved'), jax.devices()[:2])
    assert results['step'] == 6
    assert_follows(tmp_path / 'moved', tmp_path / 'full')


ARGS = [
    '--config.model.name=cifar_resnet8',
    '--config.batch_size=32',
    '--config.eval_batch_size=200',
    '--config.model.bn_group_size=4',
    '--config.lr_boundaries=(4,)',
    '--config.log_every_steps=2',
    '--config.eval_every_steps=3',
    '--config.checkpoint_every_steps=2',
]


@pytest.mark.slow
def test_a_run_saved_on_4_devices_resumes_on_8_and_on_2_processes(data_dir, tmp_path):
    """The run of 6 steps on 4 devices, relaunched from its step 4 (``--resume_step``) on 8
    devices, and on 2 processes x 2 devices, where progress and metrics print from process 0
    only (a pod's workers would repeat every line)."""
    common = [f'--config.dataset.data_dir={data_dir}', *ARGS, '--config.num_train_steps=6']
    code, _, err = finish(launch([f'--workdir={tmp_path / "full"}', *common], 4))
    assert code == 0, err[-2000:]
    for moved in ('eight', 'processes'):
        shutil.copytree(tmp_path / 'full', tmp_path / moved)
    back = [*common, '--resume_step=4']  # saved where a log step ends (a log averages its steps)
    code, out, err = finish(launch([f'--workdir={tmp_path / "eight"}', *back], 8))
    assert code == 0 and 'resumed from step 4' in out, err[-2000:]
    procs = _two_processes(['-m', 'resnet_jax.main', f'--workdir={tmp_path / "processes"}', *back])
    outs = []
    for proc in procs:
        code, out, err = finish(proc)
        assert code == 0, err[-2000:]
        outs.append(out)
    assert re.search(r'^\[6/6\] .*loss', outs[0], re.M) and 'train_loss=' in outs[0]
    assert not re.search(r'loss|^\[\d', outs[1], re.M), outs[1][-2000:]
    for moved in ('eight', 'processes'):
        assert_follows(tmp_path / moved, tmp_path / 'full')
