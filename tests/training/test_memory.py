"""A batch too large: refused before the run writes anything (larger than the training
split, or than a device holds by the compiled step's own memory analysis); an out-of-memory
error that still comes is one line, and a run that never took a step leaves no workdir."""

import jax
import pytest
from test_train import tiny_config

from resnet_jax.config import ConfigError
from resnet_jax.training import loop, memory

ONE = jax.devices()[:1]  # one device: each compile the shortest


def test_a_batch_larger_than_the_training_split_is_refused_writing_nothing(data_dir, tmp_path):
    config = tiny_config(data_dir, batch_size=1440)  # digits: 1,437 training images
    with pytest.raises(
        ConfigError,
        match=r'^batch_size=1440 is larger than the training split of digits \(1437 examples\)$',
    ):
        loop.train_and_evaluate(config, str(tmp_path / 'run'))
    assert list(tmp_path.iterdir()) == []


def test_a_batch_the_device_cannot_hold_is_refused_writing_nothing(data_dir, tmp_path, monkeypatch):
    """With 64 MiB free, the estimate of cifar_resnet8's step at batch 1,024 is more: refused,
    naming the largest batch it allows; that batch passes the same check."""
    free = 64 << 20
    monkeypatch.setattr(memory, 'available_bytes', lambda device: free)
    config = tiny_config(data_dir, batch_size=1024)
    with pytest.raises(ConfigError) as refused:
        loop.train_and_evaluate(config, str(tmp_path / 'run'), devices=ONE)
    message = str(refused.value)
    assert (
        message.startswith('batch_size=1024 needs about ')
        and 'more than the 64 MiB a cpu device has free' in message
    )
    largest = int(message.split('at most about ')[1].split()[0])
    assert 16 <= largest < 1024, message
    assert list(tmp_path.iterdir()) == []
    # The largest batch named passes the same check.
    loop.Run(tiny_config(data_dir, batch_size=largest // 4 * 4), loop.parallel.create_mesh(ONE), 0)


def test_out_of_memory_in_a_step_is_one_line_and_leaves_no_workdir(data_dir, tmp_path, monkeypatch):
    def exhausted(self, state, batch):
        raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 1 bytes')

    config = tiny_config(data_dir)
    original = loop.Run.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.train_fn = exhausted.__get__(self)

    monkeypatch.setattr(loop.Run, '__init__', init)
    with pytest.raises(
        memory.OutOfMemoryError,
        match=r'^out of memory at batch_size=16 \(the estimate allows about \d+\); lower',
    ):
        loop.train_and_evaluate(config, str(tmp_path / 'run'), devices=ONE)
    assert list(tmp_path.iterdir()) == []
