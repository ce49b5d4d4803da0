"""The training run: the paper's recipe (``optim``) as a loop (``loop.train_and_evaluate``)
over compiled ``steps``, with checkpoints, ``faults`` handled and progress reported."""


def __getattr__(name):
    """``train_and_evaluate``, imported when first used: the loop imports tfds."""
    if name == 'train_and_evaluate':
        from resnet_jax.training.loop import train_and_evaluate

        return train_and_evaluate
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = ['train_and_evaluate']
