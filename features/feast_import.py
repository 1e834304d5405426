"""Feast, imported without its side effects on the process and without its import-time type-check instrumentation.

Several of Feast's modules call ``warnings.simplefilter("once", DeprecationWarning)`` when imported, which puts
every library's DeprecationWarnings in front of users (kafka-python's, at every trainer start). Each module here
that uses Feast imports this one first; the filters are put back as they were once Feast is loaded.

Feast also decorates its classes with typeguard's ``@typechecked``, which parses and recompiles the source of the
decorated module for each of them when imported: about 6 s of CPU out of Feast's 14, in every process that
imports it (each trainer actor, each Serve replica, each command that trains). typeguard means these checks for
development, not production: under ``python -O`` the decorator returns its target untouched. Feast is imported
here with ``typechecked`` doing just that, and typeguard is put back as it was once Feast is loaded (a Feast
module imported later, on first use, is instrumented as usual).
"""

import warnings

import typeguard


def _unchecked(target=None, **_options):
    """typeguard's ``typechecked`` as ``python -O`` has it: the target itself."""
    return _unchecked if target is None else target


_typechecked, typeguard.typechecked = typeguard.typechecked, _unchecked
try:
    with warnings.catch_warnings():
        import feast  # noqa: F401
finally:
    typeguard.typechecked = _typechecked
