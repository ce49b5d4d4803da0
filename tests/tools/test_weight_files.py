"""Weights files in and out, where they cannot be right or the path is not a new file:
non-finite weights refused by name, nothing written over, a dangling link refused in one
line, a written file's mode from the umask as for every other file."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from resnet_jax import models
from resnet_jax.tools import convert


@pytest.fixture(scope='module')
def resnet18():
    """A torchvision resnet18's state dict (numpy) and its model and variables."""
    model = models.create_model('resnet18', stride_in_1x1=False)
    variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))()
    variables = jax.tree_util.tree_map(np.asarray, variables)
    return (
        model,
        variables,
        {k: np.asarray(v) for k, v in convert.to_torchvision(variables, model).items()},
    )


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_weights_in_are_refused_naming_the_tensor(resnet18, tmp_path, bad):
    _, variables, state_dict = resnet18
    state_dict = dict(
        state_dict, **{'layer2.0.conv1.weight': state_dict['layer2.0.conv1.weight'].copy()}
    )
    state_dict['layer2.0.conv1.weight'][0, 0, 0, :2] = bad
    path = tmp_path / 'diverged.safetensors'
    save_file(state_dict, path)
    with pytest.raises(ValueError, match=r'params/conv3_1/conv1/kernel holds 2 NaN or Inf values'):
        convert.load_weights(path)
    model, back, _ = convert.load_weights(path, allow_nonfinite=True)
    assert np.isnan(back['params']['conv3_1']['conv1']['kernel']).any() == np.isnan(bad)


def test_non_finite_weights_out_are_refused_and_nothing_is_written(resnet18, tmp_path):
    model, variables, _ = resnet18
    stats = jax.tree_util.tree_map(np.copy, variables['batch_stats'])
    stats['bn1']['var'][3] = np.inf
    path = tmp_path / 'out.safetensors'
    with pytest.raises(ValueError, match=r'bn1.running_var holds 1 NaN or Inf value of 64'):
        convert.to_torchvision(dict(variables, batch_stats=stats), model, path)
    assert not path.exists()
    convert.to_torchvision(dict(variables, batch_stats=stats), model, path, allow_nonfinite=True)
    assert np.isinf(load_file(path)['bn1.running_var'][3])


def test_an_existing_file_is_kept_unless_overwrite(resnet18, tmp_path):
    model, variables, state_dict = resnet18
    path = tmp_path / 'r18.safetensors'
    path.write_bytes(b'keep me')
    with pytest.raises(ValueError, match=r'r18.safetensors exists; name a new file'):
        convert.to_torchvision(variables, model, path)
    assert path.read_bytes() == b'keep me'
    convert.to_torchvision(variables, model, path, overwrite=True)
    assert load_file(path).keys() == state_dict.keys()
    (tmp_path / 'folder.safetensors').mkdir()
    with pytest.raises(ValueError, match=r'folder.safetensors is a folder'):
        convert.to_torchvision(variables, model, tmp_path / 'folder.safetensors', overwrite=True)


def test_a_dangling_link_is_refused_in_one_line(resnet18, tmp_path):
    model, variables, _ = resnet18
    link = tmp_path / 'out.safetensors'
    link.symlink_to(tmp_path / 'gone' / 'x.safetensors')
    with pytest.raises(ValueError, match=r'symbolic link to .*gone.*, which does not exist'):
        convert.to_torchvision(variables, model, link)
    assert not (tmp_path / 'gone').exists()


def test_a_written_file_follows_the_umask(resnet18, tmp_path):
    model, variables, _ = resnet18
    previous = os.umask(0o027)
    try:
        convert.to_torchvision(variables, model, tmp_path / 'r18.safetensors')
    finally:
        os.umask(previous)
    assert (tmp_path / 'r18.safetensors').stat().st_mode & 0o777 == 0o640
