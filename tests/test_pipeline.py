"""End-to-end runs through real Prefect (test API) and a real local Ray cluster on CPU.

- a two-model spec (the organism + a tiny random Qwen2) runs to completion; the exact set of artifacts;
- SIGKILL of a Ray worker process mid-extraction: the run completes with exactly the planned rows;
- SIGKILL of the driver mid-run: the rerun recomputes only the missing shards;
- a model with a bad path is reported while the other model's results land;
- the cron deployment is registered against the Prefect API with its schedule.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures.services import worker_pids
from refdir.flows import plan
from refdir.flows.runner import execute
from refdir.schemas import layout
from refdir.schemas.spec import (ComputeSpec, EvaluationSpec, ExtractionSpec, GenerationSpec, ModelSpec, PromptSpec,
                                 RunSpec, SelectionSpec, StoreSpec)
from refdir.workers.identity import resolve_inputs
from refdir.workers.prompts import draw_prompts
from refdir.workers.store import Store

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SRC = "builtin:organism_{}_{}"


def organism_prompts(n_train=32, n_val=16, n_test=16, filter_on=True) -> PromptSpec:
    return PromptSpec(harmful_train=SRC.format("harmful", "train"), harmless_train=SRC.format("harmless", "train"),
                      harmful_val=SRC.format("harmful", "val"), harmless_val=SRC.format("harmless", "val"),
                      harmful_test=SRC.format("harmful", "test"), harmless_test=SRC.format("harmless", "test"),
                      n_train=n_train, n_val=n_val, n_test=n_test, filter_train=filter_on, filter_val=filter_on)


def make_spec(name: str, models: list[ModelSpec], store: str, *, prompts_per_job=8, filter_on=True, **kw) -> RunSpec:
    """A small organism-prompt spec with its inputs resolved (so spec.run_id is the run's id)."""
    return resolve_inputs(RunSpec(name=name, models=models, prompts=organism_prompts(filter_on=filter_on),
                   extraction=ExtractionSpec(prompts_per_job=prompts_per_job, candidates_per_job=4),
                   selection=SelectionSpec(allow_fallback=True),
                   generation=GenerationSpec(max_new_tokens=6, batch_size=16),
                   evaluation=EvaluationSpec(prompts_per_job=8),
                   store=StoreSpec(uri=store), compute=ComputeSpec(batch_size=16, num_workers=1), **kw))


def expected_artifacts(spec: RunSpec, store: Store) -> set[str]:
    """Every object a finished run must hold, derived from the plan (not from the store)."""
    draw = draw_prompts(spec.prompts, spec.models)
    out = {layout.run_json(spec.run_id), layout.report_html(spec.run_id), layout.report_manifest(spec.run_id)}
    for m in spec.models:
        r, k = spec.run_id, m.key
        out |= {layout.stage_manifest(r, k, stage) for stage in layout.STAGES} | {layout.model_row_manifest(r, k)}
        out.add(layout.heartbeat(r, k))
        out |= {layout.model_row(r, k), layout.means_table(r, k), layout.candidates_table(r, k),
                layout.scores_table(r, k), layout.direction_json(r, k), layout.direction_tensors(r, k),
                layout.directions_table(r, k)}
        for j in plan.extract_jobs(spec, m, draw):
            out |= {layout.activation_shard(r, k, j.split, j.label, j.index), plan.extract_marker(j),
                    layout.sums_shard(r, k, j.split, j.label, j.index),
                    layout.prompts_shard(r, k, j.split, j.label, j.index)}
        cands = store.read_table(layout.candidates_table(r, k))
        n_scored = cands.num_rows - sum(cands["skipped"].to_pylist())
        for i in range((n_scored + spec.extraction.candidates_per_job - 1) // spec.extraction.candidates_per_job):
            out |= {layout.score_shard(r, k, i), layout.score_marker(r, k, i)}
        for j in plan.eval_jobs(spec, m, draw):
            out |= {layout.completion_shard(r, k, j.dataset, j.intervention, j.index), plan.eval_marker(j)}
        for dataset, ivs in plan.EVAL_PLAN.items():
            out |= {layout.evals_table(r, k, dataset, iv) for iv in ivs}
        out |= {layout.evals_table(r, k, "damage", iv) for iv in plan.DAMAGE_INTERVENTIONS}
    return out


def activation_rows(store: Store, spec: RunSpec, key: str) -> tuple[int, int]:
    """(rows, distinct (split, label, prompt_id, layer, position)) over marked shards, via DuckDB."""
    from refdir.flows.sql import connect_views

    con = connect_views(store)
    return con.execute(
        "select count(*), count(distinct (split, label, prompt_id, layer, position)) from activations "
        "where run_id = ? and model = ?", [spec.run_id, key]).fetchone()


def _model_flow_runs(names: set[str]) -> list:
    """The latest 'refdir-model' flow runs with these names, from the Prefect API."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["refdir-model"])),
                                               sort=FlowRunSort.START_TIME_DESC, limit=20)

    latest: dict = {}
    for r in asyncio.run(read()):
        latest.setdefault(r.name, r)
    return [latest[n] for n in names]


@pytest.fixture
def tiny_qwen(tmp_path) -> Path:
    from tests.fixtures.tiny import save_tiny

    return save_tiny(tmp_path / "tiny-qwen2", "qwen2")


def test_two_model_run_exact_artifacts(prefect_api, ray_cluster, organism_dir, tiny_qwen, tmp_path):
    models = [ModelSpec(key="organism", path=str(organism_dir)),
              ModelSpec(key="tiny-qwen2", path=str(tiny_qwen), family="qwen2")]
    spec = make_spec("two", models, str(tmp_path / "store"), filter_on=False)
    spec = spec.model_copy(update={"compute": spec.compute.model_copy(update={"concurrent_models": 2})})
    summary = execute(spec)   # both model sub-flows at once, one CPU actor each
    assert {k: v["status"] for k, v in summary["models"].items()} == {"organism": "done", "tiny-qwen2": "done"}
    runs = _model_flow_runs({"organism", "tiny-qwen2"})
    assert all(r.parent_task_run_id is not None for r in runs), "model sub-flows must nest under the run flow"
    (a, b) = sorted(runs, key=lambda r: r.start_time)
    assert b.start_time < a.end_time, "with concurrent_models = 2 the two sub-flows overlap"
    store = Store.open(str(tmp_path / "store"))
    stored = {p for p in store.list_files(layout.run_dir(spec.run_id))}
    assert stored == expected_artifacts(spec, store)
    org = summary["models"]["organism"]["rates"]
    assert org["harmful_test/baseline"]["refusal_rate"] >= 0.95
    assert org["harmful_test/ablation"]["refusal_rate"] <= 0.05
    # every planned activation row exactly once
    n_layers = store.read_table(layout.model_row(spec.run_id, "organism"))["n_layers"][0].as_py()
    rows, distinct = activation_rows(store, spec, "organism")
    n_prompts = 2 * spec.prompts.n_train + 2 * spec.prompts.n_val
    n_pos = len(store.read_table(layout.model_row(spec.run_id, "organism"))["eoi_tokens"][0].as_py())
    assert rows == distinct == n_prompts * n_layers * n_pos
    # a rerun is answered from the manifests
    t0 = time.perf_counter()
    again = execute(spec)
    assert time.perf_counter() - t0 < 10 and again["models"]["organism"]["status"] == "done"


def test_bad_model_path_reported_while_other_lands(prefect_api, ray_cluster, organism_dir, tmp_path):
    models = [ModelSpec(key="organism", path=str(organism_dir)), ModelSpec(key="missing", path=str(tmp_path / "nope"))]
    spec = make_spec("badpath", models, str(tmp_path / "store"))
    summary = execute(spec)
    assert summary["models"]["organism"]["status"] == "done"
    assert summary["models"]["missing"]["status"] == "failed"
    assert "nope" in summary["models"]["missing"]["error"]
    store = Store.open(str(tmp_path / "store"))
    assert store.exists(layout.direction_json(spec.run_id, "organism"))
    r = spec.run_id   # the failed model gets its failure record (heartbeat, error.log) and no data
    assert set(store.glob(f"{layout.model_dir(r, 'missing')}/*")) <= {layout.heartbeat(r, "missing"),
                                                                      layout.error_log(r, "missing")}


def test_sigkill_worker_mid_extraction(prefect_api, ray_cluster, organism_dir, tmp_path):
    spec = make_spec("killworker", [ModelSpec(key="organism", path=str(organism_dir))], str(tmp_path / "store"),
                     prompts_per_job=2)
    store = Store.open(str(tmp_path / "store"))
    markers = layout.activation_markers_dir(spec.run_id, "organism")
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            if len(store.glob(f"{markers}/*.json")) >= 3 and worker_pids():
                pid = worker_pids()[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    summary = execute(spec)
    t.join(timeout=5)
    assert killed, "the worker was never killed (extraction finished too fast?)"
    assert summary["models"]["organism"]["status"] == "done"
    jobs = plan.extract_jobs(spec, spec.models[0], draw_prompts(spec.prompts, spec.models))
    assert len(store.glob(f"{markers}/*.json")) == len(jobs)
    rows, distinct = activation_rows(store, spec, "organism")
    n_prompts = sum(len(j.prompts) for j in jobs)
    assert rows == distinct and rows % n_prompts == 0 and rows > 0


def test_sigkill_driver_then_rerun_recomputes_only_missing(prefect_api, organism_dir, tmp_path):
    store_dir = tmp_path / "store"
    spec = make_spec("killdriver", [ModelSpec(key="organism", path=str(organism_dir))], str(store_dir),
                     prompts_per_job=2)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "REFDIR_LOG": "WARNING"}
    code = ("import json,sys; from refdir.schemas.spec import parse_spec; from refdir.flows.runner import execute;"
            "execute(parse_spec(json.load(open(sys.argv[1]))))")
    store = Store.open(str(store_dir))
    markers = layout.activation_markers_dir(spec.run_id, "organism")
    proc = subprocess.Popen([sys.executable, "-c", code, str(spec_path)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and len(store.glob(f"{markers}/*.json")) < 4 and proc.poll() is None:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)   # the driver and the Ray cluster it started
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # Ray's processes live in their own process groups: an orphaned worker may still finish the job it was
    # running. Wait until the markers settle (what a user rerunning after a crash finds), then look.
    settled, last, deadline = 0.0, -1, time.time() + 60
    while time.time() < deadline and settled < 3.0:
        n = len(store.glob(f"{markers}/*.json"))
        settled, last = (settled + 0.25 if n == last else 0.0), n
        time.sleep(0.25)
    before = {p: store.read_json(p)["written_at"] for p in store.glob(f"{markers}/*.json")}
    jobs = plan.extract_jobs(spec, spec.models[0], draw_prompts(spec.prompts, spec.models))
    assert 4 <= len(before) < len(jobs), "the driver should die mid-extraction"
    from refdir.flows.runner import status_rows

    extract = [r for r in status_rows(store, spec) if r["stage"] == "extract"][0]
    assert (extract["status"], extract["done"], extract["planned"]) == ("running/partial", len(before), len(jobs))
    time.sleep(1.1)   # written_at has one-second resolution
    summary = execute(spec)
    assert summary["models"]["organism"]["status"] == "done"
    after = {p: store.read_json(p)["written_at"] for p in store.glob(f"{markers}/*.json")}
    assert len(after) == len(jobs)
    assert all(after[p] == ts for p, ts in before.items()), "finished shards were recomputed"
    assert sum(after[p] != before.get(p) for p in after) == len(jobs) - len(before)


def test_schedule_registers_cron_deployment(prefect_api, organism_dir, tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client

    from refdir.flows.schedule import schedule_spec

    spec = make_spec("nightly", [ModelSpec(key="organism", path=str(organism_dir))], str(tmp_path / "store"))
    deployment_id = schedule_spec(spec, "0 2 * * *", serve=False)

    async def read():
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    dep = asyncio.run(read())
    assert dep.name == "nightly"
    assert [s.schedule.cron for s in dep.schedules] == ["0 2 * * *"]
    assert dep.parameters["spec"]["name"] == "nightly"
    assert "secret" not in json.dumps(dep.parameters["spec"]["store"])
