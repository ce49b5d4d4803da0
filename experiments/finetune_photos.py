"""The fine-tuning recipe (configs/finetune.py) on a small folder of real photographs, from
converted weights, against the same recipe from scratch.

No pretrained weights can be downloaded here, so the "converted weights" are made the
way a user's would arrive, through the interop path end to end: a ResNet-18 (v1.5,
option B, torchvision's normalisation) is trained with this library on one folder of
real photographs (the source task), written as a torchvision ``.safetensors`` file
(``convert.to_torchvision``), converted back into a workdir (``resnet-jax convert``), and
fine-tuned with ``configs/finetune.py`` on another folder of other photographs (the
target task). Beside it: the same fine-tuning with BatchNorm trained
(``--config.model.frozen_bn=False``), and the target task trained with the same recipe
from a random initialisation (BatchNorm trained: random statistics frozen would be
meaningless). A run whose workdir holds a ``results.json`` is reported, not rerun.

The photographs are scikit-image's and scikit-learn's own (no download): each class is
crops of one photograph, the training crops from its left 70% and the validation crops
from its right 30%, so no validation pixel is seen in training.

    python experiments/finetune_photos.py --out /tmp/finetune --steps 300
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np
from PIL import Image

SOURCE = ['brick', 'grass', 'gravel', 'moon', 'camera', 'coins', 'china', 'flower']
TARGET = [
    'astronaut',
    'chelsea',
    'coffee',
    'rocket',
    'hubble_deep_field',
    'immunohistochemistry',
    'retina',
]


def photo(name: str) -> np.ndarray:
    if name in ('china', 'flower'):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f'{name}.jpg')
    else:
        import skimage.data

        image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    return np.ascontiguousarray(image[..., :3])


def build_folder(root: pathlib.Path, classes, train: int, val: int, seed: int = 0) -> None:
    """``root/{train,val}/<class>/*.jpg``: random square crops (30-60% of the shorter
    side) of each class's photograph, resized to 128 px; train from the left 70% of the
    photograph, val from the right 30%."""
    rng = np.random.default_rng(seed)
    for name in classes:
        image = photo(name)
        h, w = image.shape[:2]
        split_x = int(w * 0.7)
        for split, count, (x0, x1) in (('train', train, (0, split_x)), ('val', val, (split_x, w))):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                side = int(min(h, x1 - x0) * rng.uniform(0.3, 0.6))
                y = rng.integers(0, h - side + 1)
                x = rng.integers(x0, x1 - side + 1)
                crop = Image.fromarray(image[y : y + side, x : x + side]).resize((128, 128))
                crop.save(folder / f'{k:03d}.jpg', quality=90)


def train(config: str, workdir: pathlib.Path, overrides: list[str], log) -> dict:
    command = [
        sys.executable,
        '-m',
        'resnet_jax',
        'train',
        f'--config={config}',
        f'--workdir={workdir}',
        *overrides,
    ]
    log(f'$ {" ".join(command[2:])}')
    if (workdir / 'results.json').exists():  # a finished run of an earlier invocation
        results = json.loads((workdir / 'results.json').read_text())
        log(
            f'  (finished earlier: {results["wall_seconds"]:.0f} s) step {results["step"]}, '
            f'train loss {results["train_loss"]:.3f}, validation top-1 error '
            f'{100 * results["eval_top1_error"]:.2f}%'
        )
        return results
    start = time.time()
    proc = subprocess.run(command, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-3:] + proc.stderr.strip().splitlines()[-3:]
    if proc.returncode:
        raise SystemExit('\n'.join(tail))
    for line in proc.stdout.splitlines():
        if line.startswith('initialised from'):
            log('  ' + line)
    results = json.loads((workdir / 'results.json').read_text())
    log(
        f'  {time.time() - start:.0f} s; step {results["step"]}, train loss '
        f'{results["train_loss"]:.3f}, validation top-1 error '
        f'{100 * results["eval_top1_error"]:.2f}%'
    )
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', required=True)
    parser.add_argument('--steps', type=int, default=300)
    parser.add_argument('--pretrain_steps', type=int, default=300)
    parser.add_argument('--image_size', type=int, default=96)
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(text):
        print(text, flush=True)
        lines.append(text)

    source, target = out / 'source_photos', out / 'target_photos'
    if not source.exists():
        build_folder(source, SOURCE, train=40, val=10, seed=0)
        build_folder(target, TARGET, train=20, val=12, seed=1)
    log(
        f'source task: {len(SOURCE)} classes x 40 train / 10 val crops; target task: '
        f'{len(TARGET)} classes x 20 train / 12 val crops; {args.image_size} px inputs'
    )

    size = [
        f'--config.dataset.image_size={args.image_size}',
        '--config.model.name=resnet18',
        '--config.dataset.num_workers=2',
    ]
    schedule = [
        f'--config.num_train_steps={args.steps}',
        f'--config.lr_boundaries=({int(args.steps * 0.6)},{int(args.steps * 0.85)})',
        f'--config.eval_every_steps={args.steps}',
        f'--config.checkpoint_every_steps={args.steps}',
        f'--config.log_every_steps={max(args.steps // 10, 1)}',
    ]
    # 1. the "pretrained" network: the fine-tuning recipe's model, trained on the source
    #    task (BatchNorm learning, lr 0.1), as a torchvision user would have trained it.
    pre = out / 'pretrain'
    p = args.pretrain_steps
    train(
        f'finetune.py:{source}',
        pre,
        size
        + [
            '--config.model.frozen_bn=False',
            '--config.learning_rate=0.1',
            f'--config.num_train_steps={p}',
            f'--config.lr_boundaries=({int(p * 0.6)},{int(p * 0.85)})',
            f'--config.eval_every_steps={p}',
            f'--config.checkpoint_every_steps={p}',
            f'--config.log_every_steps={max(p // 10, 1)}',
        ],
        log,
    )

    # 2. out as torchvision weights, and in again as a user's converted workdir
    import resnet_jax
    from resnet_jax import convert

    model, variables, _, _ = resnet_jax.load(pre)
    weights = out / 'resnet18_source.safetensors'
    if not weights.exists():
        convert.to_torchvision(variables, pre, path=weights)
    converted = out / 'converted'
    command = [
        sys.executable,
        '-m',
        'resnet_jax',
        'convert',
        f'--input={weights}',
        f'--output={converted}',
    ]
    log(f'$ {" ".join(command[2:])}')
    if converted.exists():
        log('  (converted earlier)')
    else:
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-2000:])
        log('  ' + proc.stdout.strip().splitlines()[-1])

    # 3. the recipe from the converted weights, and from scratch
    tuned = train(
        f'finetune.py:{target}',
        out / 'finetuned',
        size + schedule + [f'--config.init_from={converted}'],
        log,
    )
    unfrozen = train(
        f'finetune.py:{target}',
        out / 'finetuned_bn_trained',
        size + schedule + [f'--config.init_from={converted}', '--config.model.frozen_bn=False'],
        log,
    )
    scratch = train(
        f'finetune.py:{target}',
        out / 'scratch',
        size + schedule + ['--config.model.frozen_bn=False'],
        log,
    )
    log(
        f'target validation top-1 error ({len(TARGET) * 12} images): fine-tuned, BatchNorm '
        f'frozen (the recipe) {100 * tuned["eval_top1_error"]:.2f}%; fine-tuned, BatchNorm '
        f'trained {100 * unfrozen["eval_top1_error"]:.2f}%; from scratch '
        f'{100 * scratch["eval_top1_error"]:.2f}%'
    )
    (out / 'finetune_photos.log').write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
