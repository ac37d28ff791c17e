"""refdir: refusal directions at pipeline scale.

The installed package is one namespace whose parts live at the repository's top level:
``refdir.flows`` (flows/: Prefect flows, DuckDB, CLI) -> ``refdir.workers`` (workers/: everything
that touches a model) -> ``refdir.schemas`` (schemas/: specs, job and receipt types, Arrow schemas,
store layout). Dependencies point that way only.
"""

import os as _os

__version__ = "0.1.0"

# In a source checkout used without installation (a Ray worker whose working directory is the
# repository, a GPU box with the code copied over), let refdir.flows/.workers/.schemas resolve to the
# top-level folders. Installed packages already have them under refdir/ and are left alone.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and all(
        _os.path.isfile(_os.path.join(_root, p, "__init__.py")) for p in ("flows", "workers", "schemas")):
    if _root not in __path__:
        __path__.append(_root)
