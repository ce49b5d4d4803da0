"""How the networks run fastest on a backend, computing the same: execution ``plans``, the
CPU plan's ``cpu_ops`` and the ``xla_options`` a launcher sets before JAX starts."""
