"""A helper for tests that inspect traced programs."""


def all_eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it (scan, custom_vjp, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, 'jaxpr', item)
                if hasattr(inner, 'eqns'):
                    yield from all_eqns(inner)
