"""Reading weight files as float32 state dicts (.safetensors without torch; .pth / .pt /
.bin with ``torch.load(weights_only=True)``), and telling which framework's weights a
file, folder or object holds."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from etils import epath

from resnet_jax import paths

TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
KERAS_SUFFIXES = ('.h5', '.keras')

_WRAPPER_PREFIXES = ('module.', '_orig_mod.', 'model.')  # DDP, torch.compile, a wrapper


def _float32(value, key: str, source: str) -> np.ndarray:
    """A tensor or array of any floating dtype (bfloat16, float16, float64) as float32."""
    if hasattr(value, 'detach'):  # a torch tensor: numpy has no bfloat16, cast in torch
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    array = np.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(f'{source}: {key} is {array.dtype}, not floating-point weights')
    return array.astype(np.float32)


def _read_safetensors(path: epath.Path) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file's tensors as numpy arrays, without torch."""
    import ml_dtypes  # noqa: F401 (numpy learns 'bfloat16': safetensors' numpy reader needs it)
    import safetensors

    try:
        with (
            paths.local_file(path) as local,
            safetensors.safe_open(str(local), framework='numpy') as f,
        ):
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (no __iter__)
    except Exception as e:  # noqa: BLE001 (safetensors raises its own SafetensorError)
        raise ValueError(
            f'{path}: not a readable .safetensors file ({type(e).__name__}: '
            f'{(str(e).splitlines() or [""])[0]})'
        ) from None


def _read_torch(path: epath.Path) -> Any:
    """A ``.pth`` / ``.pt`` / ``.bin`` file read with ``torch.load(weights_only=True)``."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            f'reading {path.name} needs torch: pip install '
            "'resnet_jax[interop]' (a .safetensors file needs no torch)"
        ) from None
    try:
        with path.open('rb') as f:
            loaded = torch.load(f, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 (pickle and torch raise many kinds)
        raise ValueError(
            f'{path}: torch.load(weights_only=True) cannot read it '
            f'({type(e).__name__}: {(str(e).splitlines() or [""])[0]})'
        ) from None
    if not isinstance(loaded, Mapping):  # a file's content: a value, not a type, is wrong
        raise ValueError(f'{path} holds a {type(loaded).__name__}, not a state dict')  # noqa: TRY004
    return loaded


def _strip_prefixes(state_dict: dict, source: str) -> dict:
    """``state_dict`` without the wrappers' prefixes every key shares, in any combination,
    with a warning naming them."""
    stripped = ''
    while state_dict:
        prefix = next(
            (p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), None
        )
        if prefix is None:
            break
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
        stripped += prefix
    if stripped:
        warnings.warn(
            f'{source}: every key starts with {stripped!r} (a wrapper: DDP module., '
            'torch.compile _orig_mod., model.); read without it',
            stacklevel=4,
        )
    return state_dict


def read_state_dict(source) -> tuple[dict[str, np.ndarray], str]:
    """``(state dict as float32 numpy arrays, a description for messages)`` of a mapping, a
    torch module (its ``state_dict()``) or a file (``.safetensors``, ``.pth``, ``.pt``,
    ``.bin``); a checkpoint holding it under ``state_dict`` or ``model`` is unwrapped, the
    BatchNorms' ``num_batches_tracked`` dropped, the wrappers' prefixes stripped."""
    what = 'state dict'
    if isinstance(source, (str, os.PathLike)):
        path = paths.resolve(source)
        what = str(path)
        if not path.exists():
            raise FileNotFoundError(f'{path} does not exist')
        if path.is_dir():
            raise ValueError(
                f'{path} is a folder, not a weights file (a transformers '
                'folder: from_transformers or load_weights)'
            )
        if path.suffix == '.safetensors':
            source = _read_safetensors(path)
        elif path.suffix in TORCH_SUFFIXES:
            source = _read_torch(path)
        else:
            raise ValueError(
                f'{path}: unknown weights file type {path.suffix!r}; allowed: '
                f'.safetensors, {", ".join(TORCH_SUFFIXES)} (Keras: '
                f'{", ".join(KERAS_SUFFIXES)})'
            )
    elif not isinstance(source, Mapping) and callable(getattr(source, 'state_dict', None)):
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise TypeError(
            f'{what}: expected a mapping of names to tensors, a torch module or a '
            f'file; got {type(source).__name__}'
        )
    for wrapper in ('state_dict', 'model'):  # a training checkpoint holding the weights
        if isinstance(source.get(wrapper), Mapping):
            source = source[wrapper]
            break
    state_dict = {
        str(k): v for k, v in source.items() if not str(k).endswith('num_batches_tracked')
    }
    state_dict = _strip_prefixes(state_dict, what)
    return {k: _float32(v, k, what) for k, v in state_dict.items()}, what


def check_finite(tree: Mapping, what: str, at: str = '') -> None:
    """ValueError naming the first tensor of ``tree`` (nested mappings of arrays) holding NaN
    or Inf: weights from a diverged run compute nothing useful, and a converted file would
    carry them on without a word."""
    for key, value in tree.items():
        name = f'{at}/{key}' if at else str(key)
        if isinstance(value, Mapping):
            check_finite(value, what, name)
            continue
        array = np.asarray(value)
        if jnp.issubdtype(array.dtype, jnp.floating) and not np.isfinite(array).all():
            bad = int(array.size - np.isfinite(array).sum())
            raise ValueError(
                f'{what}: {name} holds {bad} NaN or Inf value{"s" * (bad > 1)} of {array.size}; '
                'weights that are not finite are refused (allow_nonfinite=True, '
                '--allow_nonfinite, converts them anyway)'
            )


def is_transformers_style(state_dict: Mapping) -> bool:
    return any(k.startswith(('embedder.embedder.', 'resnet.embedder.')) for k in state_dict)


def detect_kind(source) -> str:
    """The source a file, folder or object holds (``'auto'`` detection)."""
    if isinstance(source, (str, os.PathLike)):
        path = paths.resolve(source)
        if path.suffix in KERAS_SUFFIXES:
            return 'keras'
        if path.is_dir():
            if (path / 'checkpoints').is_dir():
                raise ValueError(
                    f'{path} is a resnet_jax workdir: resnet_jax.load({str(path)!r}) reads it'
                )
            if (path / 'config.json').exists():
                return 'transformers'
            raise ValueError(
                f'{path}: a folder without config.json (a transformers model is '
                'saved with config.json and model.safetensors)'
            )
        return ''  # a weights file: by its names
    if hasattr(source, 'get_layer') and hasattr(source, 'layers'):
        return 'keras'
    if getattr(getattr(source, 'config', None), 'model_type', None) == 'resnet':
        return 'transformers'
    if hasattr(source, 'pretrained_cfg'):  # every timm model has one
        return 'timm'
    return ''
