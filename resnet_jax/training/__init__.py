"""The training run: the paper's recipe as a loop over compiled steps.

* ``loop``: ``train_and_evaluate(config, workdir)``, in named phases.
* ``steps``: the train state, the pure train and eval steps and their compiled forms.
* ``optim``: SGD with the paper's weight decay and step decay (and the other schedules,
  LARS).
* ``checkpoints``: orbax checkpoints with the run's identity, checksums and history;
  ``load`` of a trained run.
* ``faults``: preemption, divergence, locks and unwritable workdirs.
* ``progress`` and ``events``: the console's progress line and the TensorBoard file.
"""



def __getattr__(name):
    """``resnet_jax.training.train_and_evaluate``, imported when first used (the loop
    imports the input pipelines, and with them tfds: the steps, optimiser and checkpoints
    are used without)."""
    if name == 'train_and_evaluate':
        from resnet_jax.training.loop import train_and_evaluate
        return train_and_evaluate
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = ['train_and_evaluate']
