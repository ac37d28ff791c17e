"""refdir: refusal directions at pipeline scale.

The installed package is one namespace whose parts live at the repository's top level:
``refdir.flows`` (flows/: Prefect flows, DuckDB, CLI) -> ``refdir.workers`` (workers/: everything
that touches a model) -> ``refdir.schemas`` (schemas/: specs, job and receipt types, Arrow schemas,
store layout). Dependencies point that way only. The mapping is the install's (pyproject.toml's
package-dir): use an installed package (`pip install -e .` in a checkout, a built wheel on a bare machine
or a Ray node); importing refdir changes no path.
"""

__version__ = "0.1.0"
