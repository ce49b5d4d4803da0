"""Injects faults into training runs and checks that each still ends exactly as an
uninterrupted run does.

    python experiments/fault_injection.py [--fault all|kill|corrupt|disk-full|unwritable|
        stall|peer-kill]
        [--kills 5] [--signal KILL|TERM] [--steps 200]

First the embedded default config (shortened to ``--steps``) runs without interruption.
Then, each in a workdir of its own, the faults:

* ``kill``: the process is killed ``--kills`` times in a row at a random moment (``kill
  -9`` by default) and relaunched with the same command each time, then lets finish.
* ``corrupt``: a finished run's latest checkpoint gets same-size damage (bytes flipped in
  its largest array file: bit rot, a bad copy); the relaunch must find it (checksums),
  set it aside, and resume from the checkpoint before.
* ``disk-full``: the workdir is a small file system (a tmpfs: root only) that fills up
  during the run; the run must stop at once with one line naming the cause and the last
  complete checkpoint (exit 1, no hang). The workdir is then moved to a disk with room
  and the same command resumes it.
* ``unwritable``: the checkpoint folder becomes unwritable during the run (``chattr +i``
  for root, as a read-only remount or a quota does); the run must stop the same way.
  It is made writable again and the same command resumes it.

* ``stall``: on a folder of photographs (image size 32), the input workers stop
  answering (``SIGSTOP``, as on a hung network disk) and the run gets SIGTERM: it must
  end within 30 s, exit 1, with one line naming the wait and the last complete
  checkpoint. The same command resumes it (compared with an uninterrupted folder run).
* ``peer-kill``: two processes (one CPU device each); process 1 is killed (``kill -9``):
  process 0 must end within the heartbeat timeout (10 s) and a few seconds, exit 1, with
  one line naming process 1 and the last complete checkpoint; both relaunched resume it
  (compared with an uninterrupted two-process run).

Each faulty run's ``results.json`` must equal the uninterrupted one's (every value but
``wall_seconds``, bit for bit), and its evaluation history too. Prints one table row per
fault and exits 0 when every fault passes.
"""

import argparse
import contextlib
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
FAULTS = ('kill', 'corrupt', 'disk-full', 'unwritable', 'stall', 'peer-kill')


def command(workdir: pathlib.Path, steps: int, data_dir: str | None) -> list[str]:
    args = [
        sys.executable,
        '-m',
        'resnet_jax.main',
        f'--workdir={workdir}',
        f'--config.num_train_steps={steps}',
        f'--config.lr_boundaries=({steps // 2},{3 * steps // 4})',
        '--config.log_every_steps=5',
        '--config.eval_every_steps=20',
        '--config.checkpoint_every_steps=10',
    ]
    if data_dir:
        args.append(f'--config.dataset.data_dir={data_dir}')
    return args


def latest_step(workdir: pathlib.Path) -> int | None:
    steps = [int(p.name) for p in (workdir / 'checkpoints').glob('*') if p.name.isdigit()]
    return max(steps) if steps else None


def wait_for_step(workdir: pathlib.Path, proc, step: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while (latest_step(workdir) or 0) < step:
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f'no checkpoint {step} in {workdir}')
        time.sleep(0.05)


def same_results(clean: pathlib.Path, faulty: pathlib.Path, per_launch=None) -> tuple[bool, str]:
    a = json.loads((clean / 'results.json').read_text())
    b = json.loads((faulty / 'results.json').read_text())
    for key in ('wall_seconds', *(per_launch or ())):
        a.pop(key), b.pop(key)
    history = (
        json.loads((clean / 'history.json').read_text())['eval']
        == json.loads((faulty / 'history.json').read_text())['eval']
    )
    return a == b and history, json.dumps(b, sort_keys=True)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    if len(lines) <= 1:
        return ''.join(lines)
    return f'<{len(lines)} lines> {lines[-1]}'


def relaunch(cmd) -> tuple[int, str]:
    final = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    resumed = [line for line in final.stdout.splitlines() if line.startswith('resumed')]
    return final.returncode, resumed[0] if resumed else 'fresh'


def fault_kill(args, rng, root, steps) -> dict:
    faulty = root / 'killed'
    sig = getattr(signal, f'SIG{args.signal}')
    rows = []
    for kill in range(1, args.kills + 1):
        before = latest_step(faulty)
        proc = subprocess.Popen(
            command(faulty, steps, args.data_dir),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        delay = rng.uniform(6.0, 30.0)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
            proc.wait(timeout=120)
        rows.append(
            f'kill {kill} after {delay:.1f} s: resumed from {before}, checkpoint '
            f'after {latest_step(faulty)}, exit {proc.returncode}'
        )
    code, resumed = relaunch(command(faulty, steps, args.data_dir))
    return {'workdir': faulty, 'details': rows, 'final': f'exit {code}, {resumed}'}


def fault_corrupt(args, rng, root, steps) -> dict:
    faulty = root / 'corrupt'
    cmd = command(faulty, steps, args.data_dir)
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    latest = latest_step(faulty)
    files = sorted(
        (faulty / 'checkpoints' / str(latest) / 'state').rglob('d/*'),
        key=lambda p: p.stat().st_size,
    )
    target = files[-1]  # the largest: array data
    data = bytearray(target.read_bytes())
    start = rng.randrange(len(data) // 4, 3 * len(data) // 4)
    for i in range(start, min(len(data), start + 16)):
        data[i] ^= 0xFF
    target.write_bytes(bytes(data))
    (faulty / 'results.json').unlink()
    final = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    warning = [line for line in final.stdout.splitlines() if line.startswith('warning:')]
    resumed = [line for line in final.stdout.splitlines() if line.startswith('resumed')]
    return {
        'workdir': faulty,
        'details': [
            f'16 bytes flipped at offset {start} of {target.name} '
            f'({len(data)} bytes) in step {latest}',
            warning[0] if warning else 'no warning',
        ],
        'final': f'exit {final.returncode}, {resumed[0] if resumed else "fresh"}',
        'ok': bool(warning) and bool(resumed) and resumed[0] == f'resumed from step {latest - 10}',
    }


def _stopped(proc, started) -> tuple[int, float, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, time.time() - started, one_line(err)


def fault_disk_full(args, rng, root, steps) -> dict:
    if os.geteuid() != 0:
        return {'skipped': 'needs root (a tmpfs mount)'}
    mount = root / 'small_disk'
    mount.mkdir()
    subprocess.run(
        ['mount', '-t', 'tmpfs', '-o', f'size={args.disk_kb}k', 'tmpfs', str(mount)], check=True
    )
    try:
        faulty = mount / 'run'
        started = time.time()
        proc = subprocess.Popen(
            command(faulty, steps, args.data_dir),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        code, seconds, line = _stopped(proc, started)
        last = latest_step(faulty)
        moved = root / 'disk_full'
        shutil.copytree(faulty, moved, symlinks=True)
    finally:
        subprocess.run(['umount', '-l', str(mount)], check=True)
    # Moved to a disk with room: the same command (in its new place) resumes it.
    final_code, resumed = relaunch(command(moved, steps, args.data_dir))
    ok = (
        code == 1
        and f'the last complete checkpoint is step {last} (kept)' in line
        and 'No space left on device' in line
        and resumed == f'resumed from step {last}'
    )
    return {
        'workdir': moved,
        'details': [f'{args.disk_kb} KB disk: exit {code} after {seconds:.1f} s: {line}'],
        'final': f'exit {final_code}, {resumed}',
        'ok': ok,
    }


def fault_unwritable(args, rng, root, steps) -> dict:
    faulty = root / 'unwritable'
    started = time.time()
    proc = subprocess.Popen(
        command(faulty, steps, args.data_dir),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    at = 10 * rng.randint(2, max(2, steps // 20))
    wait_for_step(faulty, proc, min(at, steps - 10))
    folder = faulty / 'checkpoints'
    if os.geteuid() == 0:
        subprocess.run(['chattr', '+i', str(folder)], check=True)
    else:
        folder.chmod(0o555)
    try:
        code, seconds, line = _stopped(proc, started)
        last = latest_step(faulty)
    finally:
        if os.geteuid() == 0:
            subprocess.run(['chattr', '-i', str(folder)], check=True)
        else:
            folder.chmod(0o755)
    final_code, resumed = relaunch(command(faulty, steps, args.data_dir))
    ok = (
        code == 1
        and f'the last complete checkpoint is step {last} (kept)' in line
        and resumed == f'resumed from step {last}'
    )
    return {
        'workdir': faulty,
        'details': [
            f'made unwritable after step {min(at, steps - 10)}: exit {code} after '
            f'{seconds:.1f} s: {line}'
        ],
        'final': f'exit {final_code}, {resumed}',
        'ok': ok,
    }


def _folder_command(workdir: pathlib.Path, steps: int, photos: pathlib.Path) -> list[str]:
    return command(workdir, steps, None) + [
        f'--config.dataset.name=folder:{photos}',
        '--config.dataset.image_size=32',
        '--config.batch_size=8',
        '--config.model.bn_group_size=4',
    ]


def fault_stall(args, rng, root, steps) -> dict:
    sys.path.insert(0, str(REPO / 'tests'))
    from photos import make_photo_folder  # real photographs, re-encoded

    photos = make_photo_folder(root / 'photos', layout='train/val')
    reference = root / 'stall_reference'
    subprocess.run(
        _folder_command(reference, steps, photos), cwd=REPO, check=True, capture_output=True
    )
    faulty = root / 'stall'
    cmd = _folder_command(faulty, steps, photos)
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    at = 10 * rng.randint(1, max(1, steps // 20))
    wait_for_step(faulty, proc, min(at, steps - 10))
    found = subprocess.run(
        ['pgrep', '-P', str(proc.pid), '-f', 'spawn_main'], capture_output=True, text=True
    )
    workers = [int(pid) for pid in found.stdout.split()]
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(5)  # the batches built already are used up
    proc.send_signal(signal.SIGTERM)
    try:
        code, seconds, line = _stopped(proc, time.time())
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    last = latest_step(faulty)
    final_code, resumed = relaunch(cmd)
    # A step may still complete from the batches built: then the run stops there as on any
    # SIGTERM (exit 0); else its watchdog ends it (exit 1).
    ok = (
        seconds < 30
        and (
            (code == 1 and f'The last complete checkpoint: step {last} in' in line)
            or (code == 0 and not line)
        )
        and resumed == f'resumed from step {last}'
    )
    return {
        'workdir': faulty,
        'reference': reference,
        # counted by each launch, and photos/coffee/broken.jpg is read again after a resume
        'per_launch': ('corrupt_records_skipped',),
        'details': [
            f'{len(workers)} input workers stopped after step {min(at, steps - 10)}, then '
            f'SIGTERM: exit {code} after {seconds:.1f} s: {line.replace(str(root), "<tmp>")}'
        ],
        'final': f'exit {final_code}, {resumed}',
        'ok': ok,
    }


def _two_processes(workdir: pathlib.Path, steps: int, data_dir, stderr=subprocess.DEVNULL):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
    return [
        subprocess.Popen(
            command(workdir, steps, data_dir)
            + [
                f'--coordinator_address=127.0.0.1:{port}',
                '--num_processes=2',
                f'--process_id={i}',
                '--heartbeat_timeout_seconds=10',
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
        for i in range(2)
    ]


def _finished(procs) -> tuple[int, str]:
    out, _ = procs[0].communicate(timeout=1800)
    procs[1].wait(timeout=60)
    resumed = [line for line in out.splitlines() if line.startswith('resumed')]
    return procs[0].returncode, resumed[0] if resumed else 'fresh'


def fault_peer_kill(args, rng, root, steps) -> dict:
    reference = root / 'peer_reference'
    code, _ = _finished(_two_processes(reference, steps, args.data_dir))
    if code:
        raise RuntimeError(f'the uninterrupted two-process run failed: exit {code}')
    faulty = root / 'peer_kill'
    procs = _two_processes(faulty, steps, args.data_dir, stderr=subprocess.PIPE)
    at = 10 * rng.randint(2, max(2, steps // 20))
    wait_for_step(faulty, procs[0], min(at, steps - 10))
    procs[1].kill()
    started = time.time()
    _, err = procs[0].communicate(timeout=300)
    seconds, code, line = time.time() - started, procs[0].returncode, one_line(err)
    procs[1].wait()
    last = latest_step(faulty)
    final_code, resumed = _finished(_two_processes(faulty, steps, args.data_dir))
    ok = (
        code == 1
        and seconds < 10 + 30
        and line.startswith('[process 0] error: process 1 stopped answering')
        and f'The last complete checkpoint: step {last} in' in line
        and resumed == f'resumed from step {last}'
    )
    return {
        'workdir': faulty,
        'reference': reference,
        'details': [
            f'process 1 killed after step {min(at, steps - 10)}: process 0 exit {code} after '
            f'{seconds:.1f} s: {line.replace(str(root), "<tmp>")}'
        ],
        'final': f'exit {final_code}, {resumed}',
        'ok': ok,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--fault', choices=('all', *FAULTS), default='all')
    parser.add_argument('--kills', type=int, default=5)
    parser.add_argument('--signal', choices=['KILL', 'TERM', 'INT'], default='KILL')
    parser.add_argument('--steps', type=int, default=200)
    parser.add_argument(
        '--disk_kb',
        type=int,
        default=6000,
        help='disk-full: the size of the small file system (the default '
        "run's checkpoints take ~2.3 MB each)",
    )
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--data_dir', default=None, help="tfds data_dir (default: tfds')")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = pathlib.Path(tempfile.mkdtemp(prefix='fault_injection_'))
    clean = root / 'uninterrupted'
    faults = FAULTS if args.fault == 'all' else (args.fault,)

    if set(faults) - {'stall', 'peer-kill'}:  # (those two run their own reference)
        start = time.time()
        subprocess.run(
            command(clean, args.steps, args.data_dir), cwd=REPO, check=True, capture_output=True
        )
        print(f'uninterrupted run ({args.steps} steps): {time.time() - start:.0f} s')
        a = json.loads((clean / 'results.json').read_text())
        a.pop('wall_seconds')
        print('uninterrupted results:', json.dumps(a, sort_keys=True))

    passed = True
    for name in faults:
        start = time.time()
        outcome = globals()[f'fault_{name.replace("-", "_")}'](args, rng, root, args.steps)
        print(f'\n== {name} ({time.time() - start:.0f} s)')
        if 'skipped' in outcome:
            print(f'   skipped: {outcome["skipped"]}')
            continue
        for line in outcome['details']:
            print(f'   {line}')
        print(f'   final relaunch: {outcome["final"]}')
        equal, results = same_results(
            outcome.get('reference', clean), outcome['workdir'], outcome.get('per_launch')
        )
        ok = equal and outcome.get('ok', True)
        print(
            f'   results.json and eval history equal bit for bit (wall_seconds aside): '
            f'{equal}; {"PASS" if ok else "FAIL"}'
        )
        if not equal:
            print(f'   its results: {results}')
        passed &= ok
    shutil.rmtree(root, ignore_errors=True)
    print(f'\nall faults: {"PASS" if passed else "FAIL"}')
    return 0 if passed else 1


if __name__ == '__main__':
    sys.exit(main())
