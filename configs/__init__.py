"""The paper's recipes as config files (``get_config()`` of each): shipped inside the
package as ``resnet_jax.configs``, so that ``--config=cifar10.py:resnet110`` (or
``configs/cifar10.py:resnet110``) names them from any folder."""
