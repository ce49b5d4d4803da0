"""A Table-1-like view of a model: per stage the output size, blocks, parameters and MACs.

resnet-jax summary --model=resnet50 [--image_size=224] [--config.model.stride_in_1x1=False]
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp

from resnet_jax import models
from resnet_jax.models.complexity import count_params, macs_by_scope


def _stage_of(module_name: str) -> str:
    """'conv3_2' -> 'conv3_x'; stem and fc keep their names."""
    head = module_name.split('_')[0]
    return f'{head}_x' if '_' in module_name and head.startswith('conv') else module_name


def _block_spec(model: models.ResNet, stage: int, num_blocks: int) -> str:
    f = model.width * 2**stage
    if model.block_cls is models.BottleneckBlock:
        convs = f'1x1 {f}, 3x3 {f}, 1x1 {4 * f}'
    else:
        convs = f'3x3 {f}, 3x3 {f}'
    return f'[{convs}] x{num_blocks}'


def summarize(
    model: models.ResNet, image_size: int | tuple[int, int] = 224
) -> list[dict[str, Any]]:
    """Rows ``{layer, output, blocks, params, macs}`` for the stem, each stage and the fc."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    x = jnp.zeros((1, h, w, models.input_channels(model)))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    _, state = jax.eval_shape(
        lambda v: model.apply(
            v, x, train=False, capture_intermediates=True, mutable=['intermediates']
        ),
        variables,
    )
    outputs = state['intermediates']

    params: dict[str, int] = collections.defaultdict(int)
    for name, sub in variables['params'].items():
        params[_stage_of(name)] += count_params(sub)
    macs: dict[str, int] = collections.defaultdict(int)
    for scope, n in macs_by_scope(model, x.shape).items():
        parts = scope.split('/')
        macs[_stage_of(parts[1]) if len(parts) > 1 else 'other'] += n

    stem_kernel = '7x7' if model.stem == 'imagenet' else '3x3'
    stem_spec = f'{stem_kernel} {model.width}' + (
        ', stride 2; 3x3 max pool, stride 2' if model.stem == 'imagenet' else ''
    )
    rows = [
        {
            'layer': 'conv1',
            'output': outputs['conv1']['__call__'][0].shape[1:3],
            'blocks': stem_spec,
            'params': params['conv1'] + params['bn1'],
            'macs': macs['conv1'],
        }
    ]
    for i, n in enumerate(model.stage_sizes):
        name = f'conv{i + 2}_x'
        last = outputs[models.block_names(i, n)[-1]]['__call__'][0]
        rows.append(
            {
                'layer': name,
                'output': last.shape[1:3],
                'blocks': _block_spec(model, i, n),
                'params': params[name],
                'macs': macs[name],
            }
        )
    rows.append(
        {
            'layer': 'fc',
            'output': (1, 1),
            'blocks': f'avg pool, {model.num_classes}-d fc',
            'params': params['fc'],
            'macs': macs['fc'],
        }
    )
    return rows


def format_table(name: str, rows: list[dict[str, Any]]) -> str:
    total_p = sum(r['params'] for r in rows)
    total_m = sum(r['macs'] for r in rows)
    lines = [
        f'{name}: {total_p:,} parameters, {total_m / 1e9:.3f} x10^9 multiply-adds',
        f'{"layer":<8} {"output":>9}  {"blocks":<44} {"params":>12} {"MACs (10^6)":>12}',
    ]
    for r in rows:
        size = 'x'.join(str(s) for s in r['output'])
        lines.append(
            f'{r["layer"]:<8} {size:>9}  {r["blocks"]:<44} {r["params"]:>12,} '
            f'{r["macs"] / 1e6:>12.1f}'
        )
    return '\n'.join(lines)
