"""Feast, imported without its side effect on the process's warning filters.

Several of Feast's modules call ``warnings.simplefilter("once", DeprecationWarning)`` when imported, which puts
every library's DeprecationWarnings in front of users (kafka-python's, at every trainer start). Each module here
that uses Feast imports this one first; the filters are put back as they were once Feast is loaded.
"""

import warnings

with warnings.catch_warnings():
    import feast  # noqa: F401
