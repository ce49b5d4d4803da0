"""The launch recipes of experiments/launch, run as far as this machine allows: the Slurm
job's body as two local processes under Slurm's variables (a stand-in ``srun`` starts the
tasks as Slurm does), the TPU pod script against a stand-in ``gcloud`` that records what
it is asked to do, the Kubernetes manifest as parsed YAML."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from resnet_jax import parallel

LAUNCH = REPO / 'experiments' / 'launch'

# srun as Slurm runs a job step: SLURM_NTASKS tasks of the command, each told its index,
# the step's node list and its local index; it fails if one task fails.
FAKE_SRUN = """#!{python}
import os, subprocess, sys
command = [a for a in sys.argv[1:] if not a.startswith('--kill-on-bad-exit')]
tasks = [
    subprocess.Popen(command, env=dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                     SLURM_STEP_NODELIST='localhost', SLURM_STEP_NUM_NODES='1'))
    for i in range(int(os.environ['SLURM_NTASKS']))
]
sys.exit(max(task.wait() for task in tasks))
"""

FAKE_GCLOUD = """#!{python}
import json, os, sys
with open(os.environ['GCLOUD_LOG'], 'a') as f:
    f.write(json.dumps(sys.argv[1:]) + '\\n')
"""


def stand_in(folder, name, text):
    path = folder / name
    path.write_text(text.format(python=sys.executable))
    path.chmod(0o755)


def slurm_job_id():
    """A job id whose port (JAX: 61440 + id % 4096) is free here."""
    for port in range(61440 + os.getpid() % 4000, 65536):
        with socket.socket() as s:
            try:
                s.bind(('127.0.0.1', port))
            except OSError:
                continue
        return str(port - 61440)
    raise RuntimeError('no free port in 61440-65535')


@pytest.mark.slow
def test_the_slurm_job_runs_as_two_processes_under_slurms_variables(data_dir, tmp_path):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    stand_in(bin_dir, 'srun', FAKE_SRUN)
    env = dict(
        os.environ,
        PATH=f'{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{os.environ["PATH"]}',
        SLURM_JOB_ID=slurm_job_id(),
        SLURM_NTASKS='2',
        CONFIG='default.py',
        WORKDIR=str(tmp_path / 'run'),
        XLA_FLAGS='--xla_force_host_platform_device_count=2',
    )
    args = [
        f'--config.dataset.data_dir={data_dir}',
        '--config.model.name=cifar_resnet8',
        '--config.batch_size=16',
        '--config.model.bn_group_size=4',
        '--config.num_train_steps=2',
        '--config.checkpoint_every_steps=2',
    ]
    proc = subprocess.run(
        ['bash', str(LAUNCH / 'slurm.sbatch'), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'on 4 device(s)' in proc.stdout  # 2 processes x 2 devices, one run
    results = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert results['step'] == 2


@pytest.mark.slow
def test_the_tpu_pod_script_creates_installs_and_launches_on_every_worker(tmp_path):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    stand_in(bin_dir, 'gcloud', FAKE_GCLOUD)
    log = tmp_path / 'gcloud.log'
    env = dict(
        os.environ,
        PATH=f'{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{os.environ["PATH"]}',
        GCLOUD_LOG=str(log),
        BUCKET='gs://my-bucket',
        TPU='v4-32',
    )
    script = str(LAUNCH / 'tpu_pod.sh')
    for step in ('all', 'train'):  # the first launch, then the one after a preemption
        proc = subprocess.run(
            ['bash', script, '--config.seed=1'],
            env=dict(env, STEP=step),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[:4] for c in calls] == [['compute', 'tpus', 'tpu-vm', c[3]] for c in calls]
    assert [c[3] for c in calls] == ['create', 'scp', 'ssh', 'ssh', 'ssh']
    assert '--accelerator-type=v4-32' in calls[0]
    wheel = os.path.basename(calls[1][4])
    assert wheel.startswith('resnet_jax-') and wheel.endswith('.whl')
    commands = [next(a for a in c if a.startswith('--command=')) for c in calls[2:]]
    assert all('--worker=all' in c for c in calls[1:])
    assert f"pip install './{wheel}[gcs]'" in commands[0]
    train = (
        '--command=resnet-jax train --config=imagenet.py:resnet50 '
        '--workdir=gs://my-bucket/runs/imagenet_resnet50 '
        '--config.dataset.data_dir=gs://my-bucket/tfds --config.seed=1'
    )
    assert commands[1] == commands[2] == train  # the same command resumes
    # The command the workers run parses as a train command: every flag and config field
    # exists (a bad one is refused, exit 2, before --helpshort, last, prints the usage).
    flags = train.split(' ', 3)[3].split()
    proc = subprocess.run(
        [sys.executable, '-m', 'resnet_jax', 'train', *flags, '--helpshort'],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and not proc.stderr.strip(), proc.stderr[-3000:]
    assert 'Try --helpfull' in proc.stdout


def test_the_gke_jobset_gives_jax_its_coordinator_process_count_and_index(monkeypatch):
    """The manifest, parsed: an Indexed Job whose pods find pod 0 through the JobSet's
    headless service (JAX_COORDINATOR_ADDRESS, which JAX reads) and get their index and
    count; each pod's command, expanded as Kubernetes expands $(VAR), parses."""
    manifest = yaml.safe_load((LAUNCH / 'gke_jobset.yaml').read_text())
    assert manifest['apiVersion'].startswith('jobset.x-k8s.io/') and manifest['kind'] == 'JobSet'
    name, job = manifest['metadata']['name'], manifest['spec']['replicatedJobs'][0]
    spec = job['template']['spec']
    assert job['replicas'] == 1 and spec['completionMode'] == 'Indexed'
    assert spec['parallelism'] == spec['completions'] == 2
    pod = spec['template']['spec']
    container = pod['containers'][0]
    env = {e['name']: e for e in container['env']}
    host, port = env['JAX_COORDINATOR_ADDRESS']['value'].rsplit(':', 1)
    assert host == f'{name}-{job["name"]}-0-0.{name}'  # pod 0 of the Job
    assert int(port) in [p['containerPort'] for p in container['ports']]
    assert env['NUM_PROCESSES']['value'] == str(spec['parallelism'])
    assert env['PROCESS_ID']['valueFrom']['fieldRef']['fieldPath'] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert pod['terminationGracePeriodSeconds'] > 30  # SIGTERM ends a run within 30 s
    monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', env['JAX_COORDINATOR_ADDRESS']['value'])
    assert parallel.cluster_launch() == 'JAX_COORDINATOR_ADDRESS'

    values = {'NUM_PROCESSES': env['NUM_PROCESSES']['value'], 'PROCESS_ID': '1'}
    args = [re.sub(r'\$\((\w+)\)', lambda m: values[m.group(1)], a) for a in container['args']]
    assert args[0] == 'train' and '--process_id=1' in args and '--num_processes=2' in args
    assert container['command'] == ['resnet-jax']
    proc = subprocess.run(
        [sys.executable, '-m', 'resnet_jax', *args, '--helpshort'],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and not proc.stderr.strip(), proc.stderr[-3000:]
    assert 'Try --helpfull' in proc.stdout
