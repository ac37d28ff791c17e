"""refdir: refusal directions at pipeline scale.

The installed package is one namespace whose parts live at the repository's top level:
``refdir.flows`` (flows/: Prefect flows, DuckDB, CLI) -> ``refdir.workers`` (workers/: everything
that touches a model) -> ``refdir.schemas`` (schemas/: specs, job and receipt types, Arrow schemas,
store layout). Dependencies point that way only.
"""

__version__ = "0.1.0"
