"""The Prefect flows: a run is one flow, each model a sub-flow, each stage a task.

    summary = run_flow(spec.model_dump(mode="json"))     # what `refdir run spec.toml` calls

The run flow reads like the README's steps:
  1. the run id from content (prompt texts, model digests, settings; a resume keeps its stored id), then
     open the store and write run.json (refusing a stored run with a different identity),
  2. draw the prompts once (the paper's seeded draw), shared by every model,
  3. per model (a sub-flow; a failing model is reported and the others go on):
     extract -> aggregate -> select -> evaluate, each a task with retries, each skipped when its
     manifest says done for the inputs planned now, otherwise running only the jobs whose marker does not
     vouch for their inputs; then the opt-in optimize search (flows/optimize.py),
  4. write the report and return a summary.
Flows pass specs and store URIs only; Ray actors do the model work (flows/stages.py).
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

from prefect import flow, task
from prefect.cache_policies import NONE

from refdir.flows.health import Heartbeat, health, record_failure
from refdir.flows.cluster import start_cluster
from refdir.flows.manifest import write_files
from refdir.flows.stages import ModelRun, StageError, write_run_json
from refdir.flows.summary import model_summary, versions
from refdir.schemas import layout
from refdir.schemas.spec import RunSpec, parse_spec
from refdir.workers.identity import resolve_inputs
from refdir.workers.pool import Interrupted, stop_requested
from refdir.workers.prompts import draw_prompts
from refdir.workers.store import Store

logger = logging.getLogger(__name__)

_PROGRESS = {"reporter": None}   # set by the CLI for the driver process; flows work without it


def set_progress(reporter) -> None:
    _PROGRESS["reporter"] = reporter


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry a stage once after an infrastructure hiccup; a StageError or SelectionError (every prompt filtered,
    every candidate dropped) would only say the same thing again, a second time in the log."""
    from refdir.workers.selection import SelectionError

    return not isinstance(getattr(state, "data", None), (StageError, SelectionError))


@task(name="extract", retries=1, retry_delay_seconds=2, cache_policy=NONE, retry_condition_fn=_retry_unless_user_error)
def extract_task(mr: ModelRun) -> None:
    mr.extract()


@task(name="aggregate", retries=1, retry_delay_seconds=2, cache_policy=NONE, retry_condition_fn=_retry_unless_user_error)
def aggregate_task(mr: ModelRun) -> None:
    mr.aggregate()


@task(name="select", retries=1, retry_delay_seconds=2, cache_policy=NONE, retry_condition_fn=_retry_unless_user_error)
def select_task(mr: ModelRun) -> None:
    mr.select()


@task(name="evaluate", retries=1, retry_delay_seconds=2, cache_policy=NONE, retry_condition_fn=_retry_unless_user_error)
def evaluate_task(mr: ModelRun) -> None:
    mr.evaluate()


@task(name="optimize", retries=1, retry_delay_seconds=2, cache_policy=NONE, retry_condition_fn=_retry_unless_user_error)
def optimize_task(mr: ModelRun) -> None:
    from refdir.flows.optimize import optimize_model

    optimize_model(mr.spec, mr.key, mr.store, mr.pool, mr.draw, mr.progress)


def _optimize_stage(mr: ModelRun, hb: Heartbeat) -> None:
    """The opt-in optimize search after evaluate (its own manifest: not one of layout.STAGES)."""
    from refdir.flows.optimize import is_done

    if mr.spec.optimize.enabled and not is_done(mr.store, mr.spec, mr.key):
        hb.stage("optimize")
        logger.info("%s optimize: started", mr.key)
        t0 = time.perf_counter()
        optimize_task(mr)
        logger.info("%s optimize: finished in %.1f s", mr.key, time.perf_counter() - t0)


@flow(name="refdir-model", flow_run_name="{key}")
def model_flow(spec: RunSpec, key: str) -> dict:
    """One model's stages, in order; actors are released when the model is done or fails."""
    run_spec = spec
    store = Store.open(run_spec.store)
    mr = ModelRun(run_spec, key, store, draw_prompts(run_spec.prompts, run_spec.models), _PROGRESS["reporter"])
    hb = Heartbeat(store, run_spec.run_id, key)
    try:
        with hb:
            for stage, stage_task in (("extract", extract_task), ("aggregate", aggregate_task),
                                      ("select", select_task), ("evaluate", evaluate_task)):
                _logged_stage(mr, hb, stage, stage_task)
            _optimize_stage(mr, hb)
            mr.ensure_model_row()
    except BaseException as e:
        record_failure(store, run_spec.run_id, key, hb.current, e)
        raise
    finally:
        mr.close()
    return model_summary(store, run_spec, key)


def _logged_stage(mr: ModelRun, hb: Heartbeat, stage: str, stage_task) -> None:
    """One stage with its start and finish lines (to the log whatever the terminal) and heartbeat."""
    if mr.stage_done(stage):
        logger.info("%s %s: already done", mr.key, stage)
        return
    hb.stage(stage)
    logger.info("%s %s: started", mr.key, stage)
    t0 = time.perf_counter()
    stage_task(mr)
    logger.info("%s %s: finished in %.1f s", mr.key, stage, time.perf_counter() - t0)


@flow(name="refdir-run")
def run_flow(spec: RunSpec | dict, skip: dict[str, str] | None = None, run_name: str | None = None,
             when: str | None = None, timezone: str | None = None) -> dict:
    """A whole run: every model of the spec; returns {model: summary} with failures reported, not raised.

    `spec` is a RunSpec (the CLI) or its JSON dict (a scheduled deployment, whose store credentials come
    from the environment: secrets are never written into deployment parameters). `skip` names models
    that failed preflight, with the reason; they are reported as failed without starting a worker.
    A name template ("nightly-{date}") is filled from `when` (else the scheduled start) in `timezone`;
    `run_name` names this trigger's run outright (flows/schedule.py).
    """
    from refdir.flows.schedule import resolve_name, trigger_time

    run_spec = spec if isinstance(spec, RunSpec) else parse_spec(spec)
    inputs = run_spec.inputs if run_spec.is_resolved else None
    run_spec = resolve_name(run_spec, trigger_time(when, timezone), run_name)
    if not run_spec.is_resolved:   # a deployment's dict, or a renamed spec: the name is not an input
        run_spec = run_spec.with_inputs(inputs) if inputs is not None else resolve_inputs(run_spec)
    store = Store.open(run_spec.store)
    write_run_json(store, run_spec, versions())
    skip = skip or {}
    todo = [m.key for m in run_spec.models if m.key not in skip]
    logs = {key: record_failure(store, run_spec.run_id, key, "preflight", reason) for key, reason in skip.items()}
    if todo:
        start_cluster(run_spec.compute, todo)   # Ray once, before any model thread; every actor fits a node
    done = _run_models(run_spec, todo)
    results = {m.key: done[m.key] if m.key in done else
               {"model": m.key, "status": "failed", "error": skip[m.key], "stage": "preflight", "log": logs[m.key]}
               for m in run_spec.models}
    from refdir.flows.report import write_report

    try:
        with store.recording() as files:
            write_report(store, run_spec.run_id, errors={k: v["error"] for k, v in results.items() if v.get("error")})
        write_files(store, layout.report_manifest(run_spec.run_id), files)
    except Exception:  # noqa: BLE001 - a report failure must not sink finished results
        logger.warning("report failed:\n%s", traceback.format_exc())
    return {"run_id": run_spec.run_id, "store": store.uri, "models": results}


def _run_model(run_spec: RunSpec, key: str) -> dict:
    if stop_requested():                 # SIGINT/SIGTERM: no new model starts
        raise Interrupted(f"model {key} not started: stopped on request")
    state = model_flow(spec=run_spec, key=key, return_state=True)
    if state.is_completed():
        return state.result()
    hb = health(Store.open(run_spec.store), run_spec.run_id, key) or {}
    return {"model": key, "status": "failed", "error": _error_text(state), "stage": hb.get("stage"),
            "failed_at": hb.get("failed_at"), "log": hb.get("log")}


def _run_models(run_spec: RunSpec, keys: list[str]) -> dict[str, dict]:
    """Model sub-flows one after another, or compute.concurrent_models at a time in threads (each thread
    gets a copy of the flow's context, so its sub-flow nests under this run in Prefect)."""
    k = min(run_spec.compute.concurrent_models, len(keys))
    if k <= 1:
        return {key: _run_model(run_spec, key) for key in keys}
    with ThreadPoolExecutor(k, thread_name_prefix="refdir-model") as pool:
        futures = {key: pool.submit(contextvars.copy_context().run, _run_model, run_spec, key) for key in keys}
        return {key: f.result() for key, f in futures.items()}


def _error_text(state) -> str:
    try:
        state.result()
    except BaseException as e:  # noqa: BLE001 - the failed sub-flow's own exception
        return f"{type(e).__name__}: {e}"
    return state.message or "failed"


def ensure_prefect_env() -> None:
    """Offline defaults: no analytics (avoids 'database is locked' noise); Prefect's flow/task-run
    tracebacks stay off the console (one line per failed model instead, the traceback in error.log)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from refdir.flows.progress import quiet_prefect_tracebacks
    from refdir.flows.services import ensure_prefect_api

    quiet_prefect_tracebacks()
    ensure_prefect_api()   # unless PREFECT_API_URL is set: a temporary API in its own process group (Ctrl-C safe)
