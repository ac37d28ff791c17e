"""Run summaries from the store: per-model status, chosen direction and headline rates.

    model_summary(store, spec, "organism") -> {"status": "done", "direction": {...}, "rates": {...}, ...}
    run_complete(store, spec) -> bool          # every model's manifest marks every stage done
"""

from __future__ import annotations

import importlib.metadata as md
import platform

from refdir.schemas import layout
from refdir.schemas.spec import RunSpec

STAGE_ORDER = ("extract", "aggregate", "select", "evaluate")
_PACKAGES = ("refdir", "torch", "transformers", "ray", "prefect", "duckdb", "pyarrow", "s3fs", "numpy")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in _PACKAGES:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def manifest(store, run_id: str, key: str) -> dict:
    rel = layout.manifest(run_id, key)
    return store.read_json(rel) if store.exists(rel) else {"model": key, "stages": {}}


def model_status(m: dict) -> str:
    stages = m.get("stages", {})
    if all(stages.get(s, {}).get("status") == "done" for s in STAGE_ORDER):
        return "done"
    return "incomplete"


def run_complete(store, spec: RunSpec) -> bool:
    return all(model_status(manifest(store, spec.run_id, m.key)) == "done" for m in spec.models)


def rates(store, run_id: str, key: str) -> dict[str, dict[str, float]]:
    """{dataset/intervention: {metric[:judge]: value}} from the model's evals files."""
    out: dict[str, dict[str, float]] = {}
    for rel in store.glob(f"{layout.model_dir(run_id, key)}/evals/*.parquet"):
        for r in store.read_table(rel).to_pylist():
            name = r["metric"] if r["judge"] in ("", "substring") else f"{r['metric']}:{r['judge']}"
            out.setdefault(f"{r['dataset']}/{r['intervention']}", {})[name] = r["value"]
            if r.get("ci_low") is not None:   # a rate: its Wilson 95 % interval, for the CLI table
                out[f"{r['dataset']}/{r['intervention']}"][f"{name}_ci"] = [r["ci_low"], r["ci_high"]]
    return out


def model_summary(store, spec: RunSpec, key: str) -> dict:
    m = manifest(store, spec.run_id, key)
    out = {"model": key, "status": model_status(m),
           "stages": {s: {k: m["stages"].get(s, {}).get(k) for k in ("status", "planned", "done")} for s in STAGE_ORDER}}
    rel = layout.direction_json(spec.run_id, key)
    if store.exists(rel):
        d = store.read_json(rel)
        out["direction"] = {k: d[k] for k in ("position", "layer", "bypass_score", "induce_score", "kl_score", "fallback")}
    out["rates"] = rates(store, spec.run_id, key)
    return out
