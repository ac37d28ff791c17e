"""Entry points behind the CLI: check everything, then run, resume, report status or schedule.

    summary = execute(spec)              # preflight -> run id from content -> fast path if finished -> Prefect
    spec = stored_spec(store, run_id)    # for `refdir resume`: the stored spec with its stored run id

Preflight fails before any worker starts: the spec is valid (pydantic), every model path exists and
its family resolves, every prompt source loads, judges are known, the store is writable and the Ray
address answers. The run id comes from content (workers/identity.py): the drawn prompts' text, each model's
content digest and the settings; `refdir resume RUN_ID` reuses the id stored in run.json and refuses when the
inputs changed since. A run whose every model is done returns its summary from the manifests alone, without
starting Prefect, Ray or a model.
"""

from __future__ import annotations

import logging
import os

from refdir.flows import manifest as manifests
from refdir.flows.cluster import check_address, resolve_address
from refdir.flows.summary import model_summary, run_complete
from refdir.schemas import layout
from refdir.schemas.spec import RunSpec, SpecError, parse_spec
from refdir.workers.judges import check_judge_name
from refdir.workers.chat import ChatTemplateError
from refdir.workers.families import FamilyError
from refdir.workers.model import ModelLoadError
from refdir.workers.model import preflight as model_preflight
from refdir.workers.identity import resolve_inputs, run_inputs
from refdir.workers.prompts import draw_prompts
from refdir.workers.store import Store

logger = logging.getLogger(__name__)


def with_overrides(spec: RunSpec, store: str | None = None, ray_address: str | None = None,
                   allow_fallback: bool | None = None) -> RunSpec:
    """CLI flags and REFDIR_STORE override the spec's store / compute / fallback (not part of the run id, so a
    resolved or resumed spec keeps its id)."""
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
    out = parse_spec(data)
    return out.with_inputs(spec.inputs, spec.run_id) if spec.is_resolved else out


def _check_damage_sources(spec: RunSpec) -> None:
    """Load the damage-metric sources (ce_pile_source, ce_alpaca_source) so a bad one fails before any model."""
    from refdir.workers.damage import DamageSourceError, check_damage_sources

    try:
        check_damage_sources(spec.evaluation)
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


def verify_run(store: Store, spec: RunSpec, draw=None) -> dict[str, list[str]]:
    """Check every file the run's markers and manifests vouch for against its sha256 (reads all data).

    A corrupt or missing job shard loses its marker (the job is redone) and its stage's manifest; a corrupt
    stage-level file (means, candidates, scores, direction, evals, the model row) or an unreadable manifest
    loses that manifest (the stage is redone). What was derived from an invalidated stage goes too: every later
    stage's manifest and the markers of later jobs that read its outputs (all but baseline evaluation jobs,
    which read no earlier stage). Returns {model: [invalidated marker/manifest paths]}, each named in a log line."""
    baseline = _baseline_markers(spec, draw or draw_prompts(spec.prompts, spec.models))
    bad: dict[str, list[str]] = {}
    for m in spec.models:
        found, first = _verify_model(store, spec.run_id, m.key)
        if first is not None:
            _drop_derived(store, spec.run_id, m.key, first, baseline[m.key])
        if found:
            bad[m.key] = found
            logger.warning("model %s: %d corrupt or missing file(s); recomputing them and what was derived from "
                           "them (stage %s on)", m.key, len(found), first)
    _verify_files_manifest(store, layout.report_manifest(spec.run_id))
    return bad


def _baseline_markers(spec: RunSpec, draw) -> dict[str, set[str]]:
    from refdir.flows import plan

    return {m.key: {plan.eval_marker(j) for j in plan.eval_jobs(spec, m, draw) if j.intervention == "baseline"}
            for m in spec.models}


def _verify_files_manifest(store: Store, rel: str) -> bool:
    """False (and the manifest removed) when a manifest is unreadable or a file it names is bad."""
    if not store.exists(rel):
        return True
    m = store.marker(rel)
    if m is not None and not store.bad_files(store.recorded_files(m)):
        return True
    store.delete(rel)
    return False


def _verify_model(store: Store, run_id: str, key: str) -> tuple[list[str], str | None]:
    """(invalidated markers/manifests, the first stage that lost something or None)."""
    out: list[str] = []
    first = None
    for stage in manifests.STAGES:
        folder = layout.job_markers_dir(run_id, key, stage)
        broken = [rel for rel in store.glob(f"{folder}/*.json") if not store.verify(rel)] if folder else []
        for rel in broken:
            store.delete(rel)
        rel = layout.stage_manifest(run_id, key, stage)
        if not _verify_files_manifest(store, rel):
            out.append(rel)
        elif broken:
            store.delete(rel)
        out += broken
        if out and first is None:
            first = stage
    if not _verify_files_manifest(store, layout.model_row_manifest(run_id, key)):
        out.append(layout.model_row_manifest(run_id, key))
    return out, first


def _drop_derived(store: Store, run_id: str, key: str, first: str, keep: set[str]) -> None:
    """Every stage after `first` is redone, with the jobs that read an earlier stage's outputs."""
    for stage in manifests.STAGES[manifests.STAGES.index(first) + 1:]:
        store.delete(layout.stage_manifest(run_id, key, stage))
        folder = layout.job_markers_dir(run_id, key, stage)
        for rel in store.glob(f"{folder}/*.json") if folder else []:
            if rel not in keep:
                store.delete(rel)


def check_inputs(spec: RunSpec, draw) -> None:
    """For a resumed run: SpecError when its prompts or a model's content changed since it started."""
    now = run_inputs(spec, draw)
    was = spec.inputs
    changed = ["the drawn prompts' text"] if now["prompts"] != was.get("prompts") else []
    changed += [f"model {k}: {was.get('models', {}).get(k)} -> {d}" for k, d in now["models"].items()
                if d != was.get("models", {}).get(k)]
    if changed:
        raise SpecError(f"run {spec.run_id}: its inputs changed since it started ({'; '.join(changed)}); "
                        "`refdir run SPEC` starts a new run for the new inputs")


def execute(spec: RunSpec, reporter=None, verify: bool = False) -> dict:
    """Run (or resume) a spec to completion; failures of single models are in the summary.

    An unresolved spec gets its run id from its inputs' content; a resolved one (a resume) keeps its id and
    must still have the same inputs. With `verify`, every stored file's checksum is checked first (reads all
    data) and corrupt ones are redone with what was derived from them.
    """
    store, bad = preflight(spec)
    draw = draw_prompts(spec.prompts, spec.models)
    if spec.is_resolved:
        check_inputs(spec.model_copy(update={"models": [m for m in spec.models if m.key not in bad]})
                     .with_inputs(spec.inputs, spec.run_id), draw)
    else:
        spec = resolve_inputs(spec, draw)
    if verify:
        verify_run(store, spec, draw)
    if not bad and run_complete(store, spec):
        logger.info("run %s is complete in %s; nothing to do", spec.run_id, store.uri)
        return {"run_id": spec.run_id, "store": store.uri,
                "models": {m.key: model_summary(store, spec, m.key) for m in spec.models}}
    from refdir.flows.cluster import start_cluster
    from refdir.flows.pipeline import ensure_prefect_env, run_flow, set_progress

    start_cluster(spec.compute, [m.key for m in spec.models if m.key not in bad])   # Ray once; every actor fits
    ensure_prefect_env()
    set_progress(reporter)
    try:
        return run_flow(spec, skip=bad)
    finally:
        set_progress(None)


def stored_spec(store_uri: str | None, run_id: str) -> RunSpec:
    """The spec a run was started with, pinned to its stored run id and inputs (store credentials come from
    the environment / --store)."""
    store = Store.open(store_uri or os.environ.get("REFDIR_STORE") or "refdir-store", create=False)
    rel = layout.run_json(run_id)
    if not store.exists(rel):
        runs = sorted({p.split("/")[1] for p in store.glob(layout.run_json("*"))})
        raise SpecError(f"no run {run_id!r} in {store.uri}; runs there: {runs or 'none'}")
    try:
        doc = store.read_json(rel)
        data, inputs = doc["spec"], doc["identity"]["inputs"]
    except (ValueError, KeyError, TypeError):
        raise SpecError(f"{store.url(rel)} is unreadable or was written by an older refdir (no stored inputs); "
                        "run its spec again (`refdir run SPEC`) to start a new run") from None
    data["store"]["uri"] = store.uri
    return parse_spec(data, f"{store.uri}/{rel}").with_inputs(inputs, run_id)


def _live_counts(store: Store, spec: RunSpec, key: str, draw) -> dict[str, tuple[int, int | str]]:
    """(done, planned) per stage from the markers themselves, for stages without a manifest entry yet."""
    from refdir.flows import plan

    model = spec.model(key)
    ext = plan.extract_jobs(spec, model, draw)
    ev = plan.eval_jobs(spec, model, draw)
    scored = len(store.glob(f"{layout.score_markers_dir(spec.run_id, key)}/*.json"))
    return {"extract": (sum(plan.is_done(store.marker(plan.extract_marker(j)), j) for j in ext), len(ext)),
            "aggregate": (int(store.exists(layout.candidates_table(spec.run_id, key))), 1),
            "select": (scored, "?"),
            "evaluate": (sum(store.exists(plan.eval_marker(j)) for j in ev), len(ev))}


def status_rows(store: Store, spec: RunSpec) -> list[dict]:
    """Planned / done per model and stage: the manifest where a stage is done for the inputs planned now,
    else live marker counts (an unreadable manifest is one warning line and counts as not done)."""
    draw = draw_prompts(spec.prompts, spec.models)
    rows = []
    for m in spec.models:
        live = None
        for stage, (man, ok) in manifests.chain(store, spec, m.key).items():
            if ok:
                rows.append({"model": m.key, "stage": stage, "status": "done", "done": man["done"],
                             "planned": man["planned"]})
                continue
            live = live or _live_counts(store, spec, m.key, draw)
            done, planned = live[stage]
            rows.append({"model": m.key, "stage": stage, "status": "running/partial" if done else "pending",
                         "done": done, "planned": planned})
    return rows
