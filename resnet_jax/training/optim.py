"""The paper's optimiser (SGD, momentum, L2 weight decay) and learning-rate schedules, with
warm-up and LARS for large batches, from ``config``."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from resnet_jax.config_rules import OPTIMIZERS, SCHEDULES, WARMUP_TYPES, ConfigError


def base_learning_rate(config: ml_collections.ConfigDict, value: float) -> float:
    """Scales a learning rate linearly with the batch (Goyal et al.) when configured."""
    if config.scale_lr_with_batch:
        return value * config.batch_size / config.reference_batch_size
    return value


def create_learning_rate_fn(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The lr at each iteration: warm-up, then step decay at absolute iterations (warm-up
    included), constant (plateau), cosine or polynomial decay to 0 at ``num_train_steps``."""
    base = base_learning_rate(config, config.learning_rate)
    warmup = config.warmup_steps
    if config.schedule == 'step':
        main = optax.piecewise_constant_schedule(
            base, {int(b) - warmup: config.lr_decay_factor for b in config.lr_boundaries}
        )
    elif config.schedule == 'plateau':
        main = optax.constant_schedule(base)  # scaled down by reduce_on_plateau
    elif config.schedule == 'cosine':
        main = optax.cosine_decay_schedule(base, max(config.num_train_steps - warmup, 1))
    elif config.schedule == 'poly':
        main = optax.polynomial_schedule(
            base, 0.0, config.lr_poly_power, max(config.num_train_steps - warmup, 1)
        )
    else:
        raise ConfigError(f'unknown schedule {config.schedule!r}; allowed: {", ".join(SCHEDULES)}')
    if not warmup:
        return main
    if config.warmup_type == 'constant':
        warm = optax.constant_schedule(base_learning_rate(config, config.warmup_learning_rate))
    elif config.warmup_type == 'linear':
        warm = optax.linear_schedule(0.0, base, warmup)
    elif config.warmup_type == 'gradual':  # Goyal et al. sec. 2.2: from eta to k * eta
        warm = optax.linear_schedule(config.learning_rate, base, warmup)
    else:
        raise ConfigError(
            f'unknown warmup_type {config.warmup_type!r}; allowed: {", ".join(WARMUP_TYPES)}'
        )
    return optax.join_schedules([warm, main], [warmup])


def kernels(params: Any) -> Any:
    """True at the conv and fc kernels of ``params``, False at the biases and BatchNorm's."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params
    )


def weight_decay_mask(config: ml_collections.ConfigDict) -> Callable[[Any], Any] | None:
    """The kernels, or everything (None) with ``weight_decay_on='all'``."""
    return None if config.weight_decay_on == 'all' else kernels


def create_optimizer(
    config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule
) -> optax.GradientTransformationExtraArgs:
    """SGD with momentum and L2 weight decay added to the gradient, or LARS (``optax.lars``,
    trust ratio on the kernels only, as the large-batch papers), either followed by
    reduce-on-plateau when scheduled."""
    if config.optimizer == 'sgd':
        parts = [
            optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask(config)),
            optax.sgd(learning_rate_fn, momentum=config.momentum, nesterov=config.nesterov),
        ]
    elif config.optimizer == 'lars':
        parts = [
            optax.lars(
                learning_rate_fn,
                weight_decay=config.weight_decay,
                weight_decay_mask=weight_decay_mask(config) or True,
                trust_coefficient=config.lars_trust_coefficient,
                trust_ratio_mask=kernels,
                momentum=config.momentum,
                nesterov=config.nesterov,
            )
        ]
    else:
        raise ConfigError(
            f'unknown optimizer {config.optimizer!r}; allowed: {", ".join(OPTIMIZERS)}'
        )
    if config.schedule == 'plateau':
        # Fed the last evaluation's error at every step; averaging it over one evaluation
        # period makes `patience` count evaluations.
        parts.append(
            optax.contrib.reduce_on_plateau(
                factor=config.lr_decay_factor,
                patience=config.plateau_patience,
                accumulation_size=config.eval_every_steps,
                min_scale=config.plateau_min_scale,
            )
        )
    return optax.chain(*parts)


def plateau_scale(opt_state: optax.OptState) -> jax.Array:
    """The reduce-on-plateau factor in ``opt_state`` (1 without that schedule)."""

    def is_plateau(s):
        return isinstance(s, optax.contrib.ReduceLROnPlateauState)

    found = [
        s.scale for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_plateau) if is_plateau(s)
    ]
    return found[0] if found else jnp.ones(())


def global_norm(tree) -> jax.Array:
    """``optax.global_norm`` with one reduction per leaf shape: one per leaf (ResNet-1202's
    3,605) made XLA:CPU take minutes to compile the train step."""
    groups: dict[tuple, list] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        groups.setdefault((leaf.shape, leaf.dtype), []).append(leaf)
    total = sum(
        jnp.sum(jnp.square(jnp.stack(leaves).astype(jnp.float32))) for leaves in groups.values()
    )
    return jnp.sqrt(total)
