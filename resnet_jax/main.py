"""``python -m resnet_jax.main``: ``resnet-jax train`` (the quickstart's command).

    python -m resnet_jax.main [--config=cifar10.py:resnet110] [--workdir=workdirs/run]
        [--config.<field>=<value> ...]

With no ``--config`` it trains the embedded default (``configs/default.py``); the same
command again resumes. Every flag: ``python -m resnet_jax.main --help``.
"""

import sys

from resnet_jax import cli


def run() -> None:
    cli.main([sys.argv[0], 'train', *sys.argv[1:]])


if __name__ == '__main__':
    run()
