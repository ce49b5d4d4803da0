"""Parameter and multiply-add counts, computed from the model itself.

The paper's "FLOPs" (Table 1) are multiply-adds of the convolutions and the fc layer.
``count_macs`` traces ``model.apply`` to a jaxpr and adds up the multiply-adds of every
``conv_general_dilated`` and ``dot_general`` in it, so the count follows whatever the
module computes (stride placement, shortcut option, input size), not a table.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core


def count_params(params: Any) -> int:
    """The number of scalars in a pytree of arrays (e.g. ``variables['params']``)."""
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def _eqn_macs(eqn) -> int:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
        rhs = eqn.invars[1].aval.shape
        out_features = rhs[eqn.params['dimension_numbers'].rhs_spec[0]]
        return math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // out_features
    if name == 'dot_general':
        (lhs_contract, _), _ = eqn.params['dimension_numbers']
        lhs = eqn.invars[0].aval.shape
        return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
    return 0


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def _walk(jaxpr, scope: str, times: int, out: dict[str, int]) -> None:
    for eqn in jaxpr.eqns:
        stack = str(eqn.source_info.name_stack)
        here = '/'.join(s for s in (scope, stack) if s)
        macs = _eqn_macs(eqn)
        if macs:
            out[here] += macs * times
        repeat = eqn.params.get('length', 1) if eqn.primitive.name == 'scan' else 1
        for sub in _sub_jaxprs(eqn):
            _walk(sub, here, times * repeat, out)


def macs_by_scope(model, input_shape: Sequence[int], train: bool = False) -> Mapping[str, int]:
    """Multiply-adds per module path (e.g. ``'ResNet/conv2_1/conv1'``), for one forward pass."""
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False)
    )

    def forward(v, images):
        if train:
            return model.apply(v, images, train=True, mutable=['batch_stats'])
        return model.apply(v, images, train=False)

    closed = jax.make_jaxpr(forward)(variables, x)
    out: dict[str, int] = collections.defaultdict(int)
    _walk(closed.jaxpr, '', 1, out)
    return dict(out)


def count_macs(model, input_shape: Sequence[int]) -> int:
    """Multiply-adds of one forward pass on a batch of ``input_shape`` (NHWC).

    For ``(1, 224, 224, 3)`` this is the paper's "FLOPs" per image (Table 1).
    """
    return int(sum(macs_by_scope(model, input_shape).values()))
