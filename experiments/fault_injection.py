"""Kills a training run at random moments and checks that it still ends exactly as an
uninterrupted run does.

    python experiments/fault_injection.py [--kills 5] [--signal KILL|TERM] [--steps 60]

1. Runs the embedded default config (shortened to ``--steps``) without interruption.
2. Runs it again in another workdir, killing the process ``--kills`` times in a row at a
   random moment (``kill -9`` by default) and relaunching the same command each time, then
   lets it finish.
3. Compares the two ``results.json`` (every value but ``wall_seconds``, bit for bit) and
   the metric histories, and prints the table of kills.
Exit status 0 when they are equal.
"""

import argparse
import json
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


def command(workdir: pathlib.Path, steps: int, data_dir: str | None) -> list[str]:
    args = [sys.executable, '-m', 'resnet_jax.main', f'--workdir={workdir}',
            f'--config.num_train_steps={steps}',
            f'--config.lr_boundaries=({steps // 2},{3 * steps // 4})',
            '--config.log_every_steps=5', '--config.eval_every_steps=20',
            '--config.checkpoint_every_steps=10']
    if data_dir:
        args.append(f'--config.dataset.data_dir={data_dir}')
    return args


def latest_step(workdir: pathlib.Path) -> int | None:
    steps = [int(p.name) for p in (workdir / 'checkpoints').glob('*') if p.name.isdigit()]
    return max(steps) if steps else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--kills', type=int, default=5)
    parser.add_argument('--signal', choices=['KILL', 'TERM', 'INT'], default='KILL')
    parser.add_argument('--steps', type=int, default=200)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--data_dir', default=None, help='tfds data_dir (default: tfds\')')
    args = parser.parse_args()
    rng = random.Random(args.seed)
    sig = getattr(signal, f'SIG{args.signal}')
    root = pathlib.Path(tempfile.mkdtemp(prefix='fault_injection_'))
    clean, faulty = root / 'uninterrupted', root / 'interrupted'

    start = time.time()
    subprocess.run(command(clean, args.steps, args.data_dir), cwd=REPO, check=True,
                   capture_output=True)
    print(f'uninterrupted run: {time.time() - start:.0f} s')

    print(f'{"kill":>4} {"after (s)":>9} {"resumed from":>12} {"checkpoint after":>16} '
          f'{"exit":>5}')
    for kill in range(1, args.kills + 1):
        before = latest_step(faulty)
        proc = subprocess.Popen(command(faulty, args.steps, args.data_dir), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = rng.uniform(6.0, 30.0)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
            proc.wait(timeout=120)
        print(f'{kill:>4} {delay:>9.1f} {str(before):>12} {str(latest_step(faulty)):>16} '
              f'{proc.returncode:>5}')
    final = subprocess.run(command(faulty, args.steps, args.data_dir), cwd=REPO,
                           capture_output=True, text=True)
    resumed = [line for line in final.stdout.splitlines() if line.startswith('resumed')]
    print(f'final relaunch: exit {final.returncode}, {resumed[0] if resumed else "fresh"}')

    a = json.loads((clean / 'results.json').read_text())
    b = json.loads((faulty / 'results.json').read_text())
    a.pop('wall_seconds'), b.pop('wall_seconds')
    same_history = (json.loads((clean / 'history.json').read_text())['eval'] ==
                    json.loads((faulty / 'history.json').read_text())['eval'])
    print('uninterrupted results:', json.dumps(a, sort_keys=True))
    print('interrupted results:  ', json.dumps(b, sort_keys=True))
    equal = a == b
    print(f'results.json equal bit for bit (wall_seconds aside): {equal}; '
          f'eval history equal: {same_history}')
    return 0 if equal and same_history else 1


if __name__ == '__main__':
    sys.exit(main())
