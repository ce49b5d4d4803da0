"""Entry point. Until the training system lands it prints the default model's summary."""

import sys

from resnet_jax import summary


def run() -> None:
    sys.exit(summary.main(['cifar_resnet20']))


if __name__ == '__main__':
    run()
