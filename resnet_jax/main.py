"""``python -m resnet_jax.main [--config=...] [--workdir=...]``: ``resnet-jax train``, the
quickstart's command (no ``--config``: the embedded default); the same command resumes."""

import sys

from resnet_jax import cli


def run() -> None:
    cli.main([sys.argv[0], 'train', *sys.argv[1:]])


if __name__ == '__main__':
    run()
