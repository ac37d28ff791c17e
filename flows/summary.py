"""Run summaries from the store: per-model status, chosen direction and headline rates.

    model_summary(store, spec, "organism") -> {"status": "done", "direction": {...}, "rates": {...}, ...}
    run_complete(store, spec) -> bool          # every stage of every model done for the inputs planned now

A stage counts as done only when its manifest says so for the inputs planned now (flows/manifest.py), and
the numbers shown are read through the sha256 their manifest recorded: a tampered evals file or direction
is an error naming it (rerun with --verify), never a silently wrong table.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import platform

from refdir.flows import manifest as manifests
from refdir.schemas import layout
from refdir.schemas.spec import RunSpec

STAGE_ORDER = layout.STAGES
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
    """{"model": key, "stages": {stage: its manifest}} (stages without a readable manifest are left out)."""
    return manifests.model_manifest(store, run_id, key)


def model_status(m: dict) -> str:
    stages = m.get("stages", {})
    if all(stages.get(s, {}).get("status") == "done" for s in STAGE_ORDER):
        return "done"
    return "incomplete"


def chain_status(store, spec: RunSpec, key: str) -> str:
    """'done' when every stage is done for the inputs planned now (the digest chain holds), else 'incomplete'."""
    return "done" if all(ok for _, ok in manifests.chain(store, spec, key).values()) else "incomplete"


def run_complete(store, spec: RunSpec) -> bool:
    from refdir.flows.optimize import is_done as optimize_done   # the opt-in optimize stage, when enabled

    return all(chain_status(store, spec, m.key) == "done" and optimize_done(store, spec, m.key) for m in spec.models)


def rates(store, run_id: str, key: str) -> dict[str, dict[str, float]]:
    """{dataset/intervention: {metric[:judge]: value}} from the evals files the evaluate manifest vouches for."""
    m = manifests.read(store, run_id, key, "evaluate") or {}
    out: dict[str, dict[str, float]] = {}
    evals = layout.evals_dir(run_id, key) + "/"
    for rel, sha in sorted((m.get("files") or {}).items()):
        if not rel.startswith(evals):
            continue
        for r in store.read_table(rel, sha256=sha).to_pylist():
            name = r["metric"] if r["judge"] in ("", "substring") else f"{r['metric']}:{r['judge']}"
            out.setdefault(f"{r['dataset']}/{r['intervention']}", {})[name] = r["value"]
            if r.get("ci_low") is not None:   # a rate: its Wilson 95 % interval, for the CLI table
                out[f"{r['dataset']}/{r['intervention']}"][f"{name}_ci"] = [r["ci_low"], r["ci_high"]]
    return out


def direction(store, run_id: str, key: str) -> dict | None:
    """direction.json as the select manifest vouches for it, or None before selection."""
    m = manifests.read(store, run_id, key, "select") or {}
    rel = layout.direction_json(run_id, key)
    sha = (m.get("files") or {}).get(rel)
    return json.loads(store.read_verified(rel, sha)) if sha else None


def model_summary(store, spec: RunSpec, key: str) -> dict:
    m = manifest(store, spec.run_id, key)
    out = {"model": key, "status": chain_status(store, spec, key),
           "stages": {s: {k: m["stages"].get(s, {}).get(k) for k in ("status", "planned", "done")} for s in STAGE_ORDER}}
    d = direction(store, spec.run_id, key)
    if d is not None:
        out["direction"] = {k: d[k] for k in ("position", "layer", "bypass_score", "induce_score", "kl_score", "fallback")}
    out["rates"] = rates(store, spec.run_id, key)
    return out


def health_states(store, run_id: str, keys: list[str]) -> dict[str, dict]:
    """{model: heartbeat doc} for models that have one; state running | stale | failed | finished."""
    from refdir.flows.health import health

    return {k: h for k in keys if (h := health(store, run_id, k)) is not None}


def run_state(store, run_id: str, keys: list[str]) -> tuple[str, str | None]:
    """(status, last activity time) of a run: done | failed | stale | running | incomplete."""
    mans = {k: manifest(store, run_id, k) for k in keys}
    hs = health_states(store, run_id, keys)
    times = [st.get("finished_at") for m in mans.values() for st in m.get("stages", {}).values()]
    times += [h.get("updated_at") for h in hs.values()]
    last = max((t for t in times if t), default=None)
    undone = [k for k in keys if model_status(mans[k]) != "done"]
    if not undone:
        return "done", last
    states = {hs[k]["state"] for k in undone if k in hs}
    for s in ("running", "stale", "failed"):
        if s in states:
            return s, last
    return "incomplete", last


def list_runs(store) -> list[dict]:
    """Every run in the store, oldest first: id, name, models, status, started, duration, store."""
    from datetime import datetime

    rows = []
    for rel in store.glob(f"{layout.run_dir('*')}/run.json"):
        doc = store.read_json(rel)
        keys = [m["key"] for m in doc.get("spec", {}).get("models", [])]
        status, last = run_state(store, doc["run_id"], keys)
        started = doc.get("created_at")
        duration = None
        if started and last:
            fmt = "%Y-%m-%dT%H:%M:%SZ"
            secs = (datetime.strptime(last, fmt) - datetime.strptime(started, fmt)).total_seconds()
            duration = f"{int(secs // 3600)}h{int(secs % 3600 // 60):02d}m{int(secs % 60):02d}s"
        rows.append({"id": doc["run_id"], "name": doc.get("spec", {}).get("name"), "models": ",".join(keys),
                     "status": status, "started": started, "duration": duration, "store": store.uri})
    return sorted(rows, key=lambda r: (r["started"] or "", r["id"]))
