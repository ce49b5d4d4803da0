"""Pure step functions and their compiled, mesh-sharded forms.

What a train loop, a benchmark or research code needs to run the model: the train state,
``train_step`` / ``eval_step`` (pure functions of state and batch) and ``compile_steps``
(``jax.jit`` over a device ``Mesh``: the state replicated, the batch split along its
first axis; XLA inserts the gradient all-reduce). Nothing here reads data, writes files
or imports TensorFlow; the loop around these is ``resnet_jax.train``.
"""

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax import execution, models, optim, parallel


@flax.struct.dataclass
class TrainState:
    """What a train step updates. In the train loop the layers of ``params``,
    ``batch_stats`` and the optimiser's parameter-shaped state are laid out by the
    execution plan (``ExecutionPlan.pack_state``: each scanned group's blocks stacked on
    the CPU plan); ``ExecutionPlan.unpack_state`` gives the model's own tree, which is
    what checkpoints store."""
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    plateau_metric: jax.Array  # the last eval top-1 error, fed to reduce-on-plateau


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


# --- model and state --------------------------------------------------------------------------

def create_model(config: ml_collections.ConfigDict, num_classes: int) -> models.ResNet:
    """The model of ``config.model`` with ``num_classes`` outputs (the paper's network,
    the same program on every backend; see ``resnet_jax.execution`` for how it is run)."""
    overrides = {k: v for k, v in config.model.items() if k != 'name' and v is not None}
    return models.create_model(config.model.name, num_classes=num_classes, **overrides)


def create_train_state(model: models.ResNet, tx: optax.GradientTransformation,
                       rng: jax.Array, image_shape: tuple[int, ...]) -> TrainState:
    """A fresh state of ``model.init``'s variables, in the model's own tree."""
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=tx.init(params), plateau_metric=jnp.ones((), jnp.float32))


def init_train_state(model: models.ResNet, tx: optax.GradientTransformation, rng: jax.Array,
                     image_shape: tuple[int, ...], mesh: Mesh,
                     plan: execution.ExecutionPlan = execution.XLA) -> TrainState:
    """``create_train_state``, laid out by ``plan`` and replicated over ``mesh`` (all
    processes compute the same).

    The state is built op by op, not as one jitted program: XLA:CPU takes minutes to
    compile the unrolled init of a very deep net (over 3 for ResNet-1202), op by op it
    takes seconds, and the values are the same.
    """
    state = plan.pack_state(model, create_train_state(model, tx, rng, image_shape))
    return jax.tree_util.tree_map(lambda x: parallel.replicate(mesh, np.asarray(x)), state)


# --- steps -----------------------------------------------------------------------------------

def classification_metrics(logits: jax.Array, labels: jax.Array,
                           label_smoothing: float = 0.0) -> dict[str, jax.Array]:
    """Per-example loss and top-1 / top-5 errors."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets)
    _, top = jax.lax.top_k(logits, min(5, logits.shape[-1]))
    hit = top == labels[:, None]
    return {'loss': loss, 'top1_error': 1.0 - hit[:, 0].astype(jnp.float32),
            'top5_error': 1.0 - hit.any(-1).astype(jnp.float32)}


def train_step(model: models.ResNet, tx: optax.GradientTransformationExtraArgs,
               learning_rate_fn: optax.Schedule, label_smoothing: float, state: TrainState,
               batch: dict[str, jax.Array]) -> tuple[TrainState, TrainMetrics]:
    """One SGD step on a global batch."""

    mutable = ['batch_stats'] if state.batch_stats else []  # none with e.g. GroupNorm

    def loss_fn(params):
        logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                      batch['image'], train=True, mutable=mutable)
        per_example = classification_metrics(logits, batch['label'], label_smoothing)
        return per_example['loss'].mean(), (per_example, updates.get('batch_stats', {}))

    grads, (per_example, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                   value=state.plateau_metric)
    params = optax.apply_updates(state.params, updates)
    lr = learning_rate_fn(state.step) * optim.plateau_scale(state.opt_state)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, TrainMetrics.single_from_model_output(
        learning_rate=lr, param_norm=optim.global_norm(params), **per_example)


def eval_step(model: models.ResNet, state: TrainState,
              batch: dict[str, jax.Array]) -> EvalMetrics:
    """Metrics of one (possibly padded) eval batch; ``batch['mask']`` marks real examples."""
    logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                         batch['image'], train=False)
    per_example = classification_metrics(logits, batch['label'])
    return EvalMetrics.single_from_model_output(mask=batch['mask'], **per_example)


# --- compiled steps -------------------------------------------------------------------------

def compile_steps(model, tx, learning_rate_fn, config, mesh: Mesh,
                  plan: execution.ExecutionPlan = execution.XLA):
    """The jitted train and eval steps of ``model`` run by ``plan`` (on a state laid out
    by ``plan.pack_state``), with the state replicated and the batch split."""
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    model, options = plan.apply_to(model), dict(plan.compiler_options) or None
    train = jax.jit(functools.partial(train_step, model, tx, learning_rate_fn,
                                      config.label_smoothing),
                    in_shardings=(replicated, split), out_shardings=(replicated, replicated),
                    donate_argnums=0, compiler_options=options)
    evaluate = jax.jit(functools.partial(eval_step, model),
                       in_shardings=(replicated, split), out_shardings=replicated,
                       compiler_options=options)
    return train, evaluate
