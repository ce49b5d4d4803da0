"""Pure train and eval steps and their compiled, mesh-sharded forms (``compile_steps``),
with exact gradient accumulation and an EMA of the weights. Reads no data, writes no files."""

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import models, parallel
from resnet_jax.backends import plans
from resnet_jax.training import optim


@flax.struct.dataclass
class TrainState:
    """``params`` and ``batch_stats`` keyed like the model's variables (the compiled steps may
    stack a scanned stage's: ``plans.StateLayout``), the optimiser's state like them."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    plateau_metric: jax.Array  # the last eval top-1 error, fed to reduce-on-plateau


@flax.struct.dataclass
class EmaTrainState(TrainState):
    """A ``TrainState`` with an EMA of the weights and statistics; a subclass, not an
    optional field, so that runs without it keep their checkpoint layout."""

    ema: Any  # {'params': ..., 'batch_stats': ...}, keyed like the model's variables


def with_ema_weights(state: EmaTrainState) -> TrainState:
    """``state`` with the EMA's weights and statistics in place of the raw ones."""
    return state.replace(params=state.ema['params'], batch_stats=state.ema['batch_stats'])


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output('loss')
    top1_error: metrics.Average.from_output('top1_error')
    top5_error: metrics.Average.from_output('top5_error')
    learning_rate: metrics.LastValue.from_output('learning_rate')
    param_norm: metrics.LastValue.from_output('param_norm')  # also guards against overflow


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    loss: metrics.Average.from_output('loss')
    top1_error: metrics.Average.from_output('top1_error')
    top5_error: metrics.Average.from_output('top5_error')


def create_train_state(
    model: models.ResNet,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    image_shape: tuple[int, ...],
    ema: bool = False,
) -> TrainState:
    """A fresh state of ``model.init``'s variables, in the model's own tree; with ``ema``
    an ``EmaTrainState`` whose average starts at those variables."""
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables['params']
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get('batch_stats', {}),
        opt_state=tx.init(params),
        plateau_metric=jnp.ones((), jnp.float32),
    )
    return add_ema(state) if ema else state


def add_ema(state: TrainState) -> EmaTrainState:
    """``state`` with an EMA that starts at its weights and statistics."""
    fields = {f: getattr(state, f) for f in TrainState.__dataclass_fields__}

    def copy(tree):
        return jax.tree_util.tree_map(jnp.array, tree)

    return EmaTrainState(
        **fields, ema={'params': copy(state.params), 'batch_stats': copy(state.batch_stats)}
    )


def init_train_state(
    model: models.ResNet,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    image_shape: tuple[int, ...],
    mesh: Mesh,
    ema: bool = False,
) -> TrainState:
    """``create_train_state`` replicated over ``mesh``, built op by op: XLA:CPU takes minutes
    to compile ResNet-1202's init as one program, seconds op by op."""
    state = create_train_state(model, tx, rng, image_shape, ema)
    return jax.tree_util.tree_map(lambda x: parallel.replicate(mesh, np.asarray(x)), state)


def classification_metrics(
    logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> dict[str, jax.Array]:
    """Per-example loss and top-1 / top-5 errors."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets)
    _, top = jax.lax.top_k(logits, min(5, logits.shape[-1]))
    hit = top == labels[:, None]
    return {
        'loss': loss,
        'top1_error': 1.0 - hit[:, 0].astype(jnp.float32),
        'top5_error': 1.0 - hit.any(-1).astype(jnp.float32),
    }


def split_micro_batches(
    batch: dict[str, jax.Array],
    steps: int,
    num_shards: int = 1,
    group_size: int = 0,
    sharding: NamedSharding | None = None,
) -> dict[str, jax.Array]:
    """The global batch (B, ...) as ``steps`` micro-batches, stacked: (steps, B / steps, ...).
    Each is whole BatchNorm groups (``group_size``), so every statistic is the full batch's;
    micro-batch i takes the i-th part of each of ``s`` equal blocks, ``s`` the largest
    divisor of ``num_shards`` that allows it (``num_shards``: no data moves). ``sharding``
    (e.g. ``P(None, 'data')``) splits every micro-batch over the mesh."""
    size = len(jax.tree_util.tree_leaves(batch)[0])
    part = size // steps
    if part * steps != size or (group_size and part % group_size):
        raise ValueError(
            f'a batch of {size} does not split into {steps} micro-batches of '
            f'whole BatchNorm groups of {group_size}'
        )
    blocks = max(
        s
        for s in range(1, num_shards + 1)
        if num_shards % s == 0
        and size % (s * steps) == 0
        and (not group_size or (size // (s * steps)) % group_size == 0)
    )

    def split(x):
        x = x.reshape((blocks, steps, size // (blocks * steps)) + x.shape[1:])
        x = jnp.swapaxes(x, 0, 1).reshape((steps, part) + x.shape[3:])
        return jax.lax.with_sharding_constraint(x, sharding) if sharding is not None else x

    return jax.tree_util.tree_map(split, batch)


def train_step(
    model: models.ResNet,
    tx: optax.GradientTransformationExtraArgs,
    learning_rate_fn: optax.Schedule,
    label_smoothing: float,
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    micro_batches: Callable[[dict], dict] | None = None,
    ema_decay: float = 0.0,
    seed: int = 0,
) -> tuple[TrainState, TrainMetrics]:
    """One SGD (or LARS) step on a global batch. With ``micro_batches`` (e.g.
    ``split_micro_batches``) they run in turn (``lax.scan``) from the same state and the step
    takes the mean of their gradients and BatchNorm statistics: the full batch's step, with
    one micro-batch's memory. With ``ema_decay`` the EMA moves towards the new weights.
    A model with ``drop_path_rate`` draws from the 'dropout' rng a key of (``seed``, step,
    micro-batch): a resumed run draws the same; another device count or accumulation
    draws other masks (a micro-batch's examples depend on them)."""

    mutable = ['batch_stats'] if state.batch_stats else []  # none with e.g. GroupNorm
    step_key = jax.random.fold_in(jax.random.key(seed), state.step)

    def gradients(batch, index=0):
        rngs = {}
        if getattr(model, 'drop_path_rate', 0):
            rngs['dropout'] = jax.random.fold_in(step_key, index)

        def loss_fn(params):
            logits, updates = model.apply(
                {'params': params, 'batch_stats': state.batch_stats},
                batch['image'],
                train=True,
                mutable=mutable,
                rngs=rngs,
            )
            per_example = classification_metrics(logits, batch['label'], label_smoothing)
            return per_example['loss'].mean(), (per_example, updates.get('batch_stats', {}))

        return jax.grad(loss_fn, has_aux=True)(state.params)

    if micro_batches is None:
        grads, (per_example, batch_stats) = gradients(batch)
    else:
        parts = micro_batches(batch)
        steps = len(jax.tree_util.tree_leaves(parts)[0])

        def accumulate(total, indexed):
            grads, (per_example, batch_stats) = gradients(*indexed)
            return jax.tree_util.tree_map(jnp.add, total, (grads, batch_stats)), per_example

        zeros = jax.tree_util.tree_map(jnp.zeros_like, (state.params, state.batch_stats))
        (grads, batch_stats), per_example = jax.lax.scan(
            accumulate, zeros, (parts, jnp.arange(steps))
        )
        grads, batch_stats = jax.tree_util.tree_map(lambda x: x / steps, (grads, batch_stats))
        per_example = jax.tree_util.tree_map(lambda x: x.reshape(-1), per_example)

    updates, opt_state = tx.update(grads, state.opt_state, state.params, value=state.plateau_metric)
    params = optax.apply_updates(state.params, updates)
    lr = learning_rate_fn(state.step) * optim.plateau_scale(state.opt_state)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    if ema_decay:
        new_state = new_state.replace(
            ema=jax.tree_util.tree_map(
                lambda average, new: ema_decay * average + (1 - ema_decay) * new,
                state.ema,
                {'params': params, 'batch_stats': batch_stats},
            )
        )
    return new_state, TrainMetrics.single_from_model_output(
        learning_rate=lr, param_norm=optim.global_norm(params), **per_example
    )


def eval_step(model: models.ResNet, state: TrainState, batch: dict[str, jax.Array]) -> EvalMetrics:
    """Metrics of one (possibly padded) eval batch; ``batch['mask']`` marks real examples."""
    logits = model.apply(
        {'params': state.params, 'batch_stats': state.batch_stats}, batch['image'], train=False
    )
    per_example = classification_metrics(logits, batch['label'])
    return EvalMetrics.single_from_model_output(mask=batch['mask'], **per_example)


def compile_steps(
    model, tx, learning_rate_fn, config, mesh: Mesh, compiler_options: dict | None = None
) -> plans.CompiledSteps:
    """The jitted train and eval steps of ``model`` with ``config``'s recipe over ``mesh``, by
    the plan ``config.execution`` (``plans.compile_steps``): ``grad_accum_steps``
    micro-batches, the EMA at ``ema_decay``. Both take the state in the returned ``layout``
    (``layout.from_model(state)``); ``compiler_options`` are added to the plan's."""
    micro_batches = None
    if config.grad_accum_steps > 1:
        micro_batches = functools.partial(
            split_micro_batches,
            steps=config.grad_accum_steps,
            num_shards=mesh.size,
            group_size=config.model.bn_group_size,
            sharding=NamedSharding(mesh, P(None, 'data')),
        )

    def train(model, state, batch):
        return train_step(
            model,
            tx,
            learning_rate_fn,
            config.label_smoothing,
            state,
            batch,
            micro_batches=micro_batches,
            ema_decay=config.ema_decay,
            seed=config.seed,
        )

    return plans.compile_steps(train, eval_step, model, mesh, config.execution, compiler_options)
