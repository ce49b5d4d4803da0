"""The execution wing: how the paper's networks run fastest on a backend, computing the
same. Nothing under ``resnet_jax.models`` imports it.

* ``plans``: execution plans (``get_plan``, ``plan_for_mesh``): other implementations of
  the model's parts for a backend, applied to a model (``ExecutionPlan.apply_to``) and
  compiled into steps that take and return the model's own variables
  (``compile_steps``).
* ``cpu_ops``: the operations of the XLA:CPU plan.
* ``xla_options``: the XLA:CPU options a launcher sets in ``XLA_FLAGS`` before JAX starts
  (imports no JAX).
"""
