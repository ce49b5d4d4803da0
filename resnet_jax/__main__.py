"""``python -m resnet_jax COMMAND ...``: the ``resnet-jax`` command (``resnet_jax.cli``)."""

from resnet_jax import cli

if __name__ == '__main__':
    cli.main()
