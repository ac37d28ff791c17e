"""Entry points behind the CLI: check everything, then run, resume, report status or schedule.

    summary = execute(spec)              # preflight -> fast path if finished -> Prefect run flow
    spec = stored_spec(store, run_id)    # for `refdir resume`

Preflight fails before any worker starts: the spec is valid (pydantic), every model path exists and
its family resolves, every prompt source loads, judges are known, the store is writable and the Ray
address answers. A run whose every model is done returns its summary from the manifests alone, without
starting Prefect, Ray or a model.
"""

from __future__ import annotations

import logging
import os

from refdir.flows.cluster import check_address, resolve_address
from refdir.flows.summary import STAGE_ORDER, model_summary, run_complete
from refdir.flows.summary import manifest as read_manifest
from refdir.schemas import layout
from refdir.schemas.spec import RunSpec, SpecError, parse_spec
from refdir.workers.judges import check_judge_name
from refdir.workers.chat import ChatTemplateError
from refdir.workers.families import FamilyError
from refdir.workers.model import ModelLoadError
from refdir.workers.model import preflight as model_preflight
from refdir.workers.prompts import draw_prompts
from refdir.workers.store import Store

logger = logging.getLogger(__name__)


def with_overrides(spec: RunSpec, store: str | None = None, ray_address: str | None = None,
                   allow_fallback: bool | None = None) -> RunSpec:
    """CLI flags and REFDIR_STORE override the spec's store / compute / fallback (not part of the run id)."""
    data = spec.model_dump()
    store = store or os.environ.get("REFDIR_STORE")
    if store:
        data["store"]["uri"] = store
    if ray_address:
        data["compute"]["ray_address"] = ray_address
    if allow_fallback is not None:
        data["selection"]["allow_fallback"] = allow_fallback
    if spec.store.secret is not None:
        data["store"]["secret"] = spec.store.secret.get_secret_value()
    return parse_spec(data)


def _check_damage_sources(spec: RunSpec) -> None:
    """Load the damage-metric sources (ce_pile_source, ce_alpaca_source) so a bad one fails before any model."""
    from refdir.workers.damage import DamageSourceError, load_damage_sets

    try:
        load_damage_sets(spec.evaluation)
    except DamageSourceError as e:
        raise SpecError(f"evaluation: {e}") from None


def preflight(spec: RunSpec) -> tuple[Store, dict[str, str]]:
    """Everything that can be checked without loading a model.

    Returns the opened, writable store and {model key: error} for models that cannot load (bad path,
    no config.json, unknown architecture, missing GGUF file): those are reported in the run summary
    while the other models run. Anything else wrong, or every model failing, raises before any
    worker starts.
    """
    for name in spec.evaluation.judges:
        check_judge_name(name)
    draw_prompts(spec.prompts, spec.models)
    _check_damage_sources(spec)
    bad: dict[str, str] = {}
    for m in spec.models:
        try:
            model_preflight(m)
        except (ModelLoadError, FamilyError, ChatTemplateError) as e:
            bad[m.key] = str(e)
            logger.error("model %s will not run: %s", m.key, e)
    if len(bad) == len(spec.models):
        raise SpecError("no model of the spec can be loaded:\n" + "\n".join(f"  {k}: {v}" for k, v in bad.items()))
    store = Store.open(spec.store)
    store.check_writable()
    address = resolve_address(spec.compute)
    if address:
        check_address(address)
    return store, bad


# stage -> the folder of its job markers (stages without jobs have none)
_MARKERS = {"extract": "activations/_done", "select": "scores/_done", "evaluate": "completions/_done"}


def verify_run(store: Store, spec: RunSpec) -> dict[str, list[str]]:
    """Check every job marker's checksums against its shards; corrupt or missing shards lose their marker,
    and the stage that wrote them and every later stage lose their 'done', so the run recomputes exactly
    those jobs and what depends on them. Returns {model: [bad marker paths]}."""
    bad: dict[str, list[str]] = {}
    for m in spec.models:
        mdir = layout.model_dir(spec.run_id, m.key)
        first = None
        for stage in STAGE_ORDER:
            folder = _MARKERS.get(stage)
            if folder is None:
                continue
            broken = [rel for rel in store.glob(f"{mdir}/{folder}/*.json") if not store.verify(rel)]
            for rel in broken:
                store.delete(rel)
            if broken:
                bad.setdefault(m.key, []).extend(broken)
                first = first or stage
        if first:
            manifest = read_manifest(store, spec.run_id, m.key)
            for stage in STAGE_ORDER[STAGE_ORDER.index(first):]:
                manifest["stages"].pop(stage, None)
            store.write_json(layout.manifest(spec.run_id, m.key), manifest)
            logger.warning("model %s: %d corrupt or missing shard(s) will be recomputed (from stage %s on)",
                           m.key, len(bad[m.key]), first)
    return bad


def execute(spec: RunSpec, reporter=None, verify: bool = False) -> dict:
    """Run (or resume) a spec to completion; failures of single models are in the summary.

    With `verify`, every shard's checksum is checked first (reads all data) and corrupt ones are redone.
    """
    store, bad = preflight(spec)
    if verify:
        verify_run(store, spec)
    if not bad and run_complete(store, spec):
        logger.info("run %s is complete in %s; nothing to do", spec.run_id, store.uri)
        return {"run_id": spec.run_id, "store": store.uri,
                "models": {m.key: model_summary(store, spec, m.key) for m in spec.models}}
    from refdir.flows.pipeline import ensure_prefect_env, run_flow, set_progress

    ensure_prefect_env()
    set_progress(reporter)
    try:
        return run_flow(spec, skip=bad)
    finally:
        set_progress(None)


def stored_spec(store_uri: str | None, run_id: str) -> RunSpec:
    """The spec a run was started with (store credentials come from the environment / --store)."""
    store = Store.open(store_uri or os.environ.get("REFDIR_STORE") or "refdir-store", create=False)
    rel = layout.run_json(run_id)
    if not store.exists(rel):
        runs = sorted({p.split("/")[1] for p in store.glob("runs/*/run.json")})
        raise SpecError(f"no run {run_id!r} in {store.uri}; runs there: {runs or 'none'}")
    data = store.read_json(rel)["spec"]
    data["store"]["uri"] = store.uri
    return parse_spec(data, f"{store.uri}/{rel}")


def _live_counts(store: Store, spec: RunSpec, key: str, draw) -> dict[str, tuple[int, int | str]]:
    """(done, planned) per stage from the markers themselves, for stages without a manifest entry yet."""
    from refdir.flows import plan

    model = spec.model(key)
    ext = plan.extract_jobs(spec, model, draw)
    ev = plan.eval_jobs(spec, model, draw)
    scored = len(store.glob(f"{layout.model_dir(spec.run_id, key)}/scores/_done/*.json"))
    return {"extract": (sum(store.exists(plan.extract_marker(j)) for j in ext), len(ext)),
            "aggregate": (int(store.exists(layout.candidates_table(spec.run_id, key))), 1),
            "select": (scored, "?"),
            "evaluate": (sum(store.exists(plan.eval_marker(j)) for j in ev), len(ev))}


def status_rows(store: Store, spec: RunSpec) -> list[dict]:
    """Planned / done per model and stage: the manifest where a stage finished, else live marker counts."""
    draw = draw_prompts(spec.prompts, spec.models)
    rows = []
    for m in spec.models:
        s = model_summary(store, spec, m.key)
        live = None
        for stage, st in s["stages"].items():
            if st["status"] == "done":
                rows.append({"model": m.key, "stage": stage, "status": "done", "done": st["done"], "planned": st["planned"]})
                continue
            live = live or _live_counts(store, spec, m.key, draw)
            done, planned = live[stage]
            rows.append({"model": m.key, "stage": stage, "status": "running/partial" if done else "pending",
                         "done": done, "planned": planned})
    return rows
