"""Supervised workers on a real local Ray cluster: dead actors are replaced, retries go to live actors,
start-up has a timeout, a store outage ends a stage in one line, a stop request cancels, and actors that
cannot fit the cluster are refused before anything starts.

    .venv/bin/python -m pytest tests/test_supervision.py -q            # the end-to-end kill test is slow
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures.services import worker_pids
from refdir.workers.pool import (ActorStartError, Interrupted, JobsFailed, StoreOutage, WorkerPool, clear_stop,
                                 request_stop)

REPO = Path(__file__).resolve().parents[1]


def _ray():
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])   # Ray workers need not import tests/
    return ray


class Toy:
    """A stand-in model actor: jobs are (kind, arg); it can die, fail, stall or hit a store error."""

    def __init__(self, flag_dir: str, fail_start: bool = False):
        if fail_start:
            raise RuntimeError("cannot load weights: model.safetensors is truncated")
        self.flag_dir, self.calls = Path(flag_dir), 0

    def ping(self) -> dict:
        return {"pid": os.getpid()}

    def work(self, job):
        kind, arg = job
        self.calls += 1
        (self.flag_dir / f"call-{os.getpid()}-{self.calls}-{kind}-{arg}").touch()
        if kind == "die" and not (self.flag_dir / f"died-{arg}").exists():
            (self.flag_dir / f"died-{arg}").touch()
            os._exit(1)                                  # the worker process dies mid-job
        if kind == "bug":
            raise ValueError(f"job {arg} is wrong")
        if kind == "store":
            from refdir.workers.store import StoreError

            raise StoreError("cannot reach the S3 endpoint http://127.0.0.1:1 while writing runs/x to s3://b/p")
        if kind == "sleep":
            time.sleep(arg)
        return (kind, arg, os.getpid())


def _pool(tmp_path, n=1, restarts=0, **kw) -> WorkerPool:
    ray = _ray()
    actor = ray.remote(num_cpus=0.5, max_restarts=restarts, max_task_retries=restarts)(Toy)
    kw.setdefault("start_timeout", 60)
    fail_start = kw.pop("fail_start", False)
    resources = kw.pop("resources", None)
    opts = {"resources": resources} if resources else {}
    return WorkerPool(lambda: actor.options(**opts).remote(str(tmp_path), fail_start), n, **kw)


def test_dead_actor_is_replaced_and_job_retried_on_a_live_one(ray_cluster, tmp_path):
    pool = _pool(tmp_path, n=1, restarts=0, max_retries=2)
    first = pool.start()["pid"]
    jobs = [("ok", 0), ("die", 1), ("ok", 2), ("die", 3), ("ok", 4)]
    try:
        out = pool.run("work", jobs)
    finally:
        pool.close()
    assert [(k, a) for k, a, _ in out] == jobs                       # every job, in order, exactly once done
    assert pool.replaced == 2                                         # one new actor per death
    pids = [p for _, _, p in out]
    assert pids[0] == first and pids[-1] != first and len(set(pids)) == 3


def test_application_errors_are_collected_not_retried(ray_cluster, tmp_path):
    pool = _pool(tmp_path, n=1)
    with pytest.raises(JobsFailed) as e:
        pool.run("work", [("ok", 0), ("bug", 1), ("ok", 2)])
    assert "work[1]: ValueError: job 1 is wrong" in str(e.value)
    assert len(list(tmp_path.glob("call-*-bug-1"))) == 1              # not retried
    assert pool.closed                                                # a stage retry gets fresh actors


def test_actor_start_timeout_and_start_failure(ray_cluster, tmp_path):
    pool = _pool(tmp_path, resources={"no-such-node-resource": 1}, start_timeout=3)
    t0 = time.monotonic()
    with pytest.raises(ActorStartError, match=r"did not start within 3 s"):
        pool.start()
    assert time.monotonic() - t0 < 15
    with pytest.raises(ActorStartError, match="model.safetensors is truncated"):
        _pool(tmp_path, fail_start=True).start()


def test_store_outage_fails_the_stage_in_one_line(ray_cluster, tmp_path):
    pool = _pool(tmp_path, n=1, outage_seconds=4)
    jobs = [("store", i) for i in range(40)]
    t0 = time.monotonic()
    with pytest.raises(StoreOutage) as e:
        pool.run("work", jobs)
    took = time.monotonic() - t0
    assert "\n" not in str(e.value) and "cannot reach the S3 endpoint" in str(e.value) and "rerun to resume" in str(e.value)
    assert 4 <= took < 20, took
    assert len(list(tmp_path.glob("call-*"))) <= 6                    # new jobs were held, not failed one by one


def test_stop_request_cancels_in_flight_jobs(ray_cluster, tmp_path):
    pool = _pool(tmp_path, n=1)
    pool.start()
    threading.Timer(1.0, request_stop).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(Interrupted):
            pool.run("work", [("sleep", 60), ("ok", 1)])
    finally:
        clear_stop()
    assert time.monotonic() - t0 < 5 and pool.closed


def test_actor_larger_than_every_node_is_refused(ray_cluster):
    from refdir.flows.cluster import RayUnavailable, check_resources
    from refdir.schemas.spec import ComputeSpec

    with pytest.raises(RayUnavailable, match=r"model 'big': an actor asks for 64 CPU\(s\) and 0 GPU\(s\) but no node"):
        check_resources(ComputeSpec(cpus_per_worker=64.0), ["small", "big"][1:])
    with pytest.raises(RayUnavailable, match=r"need 6 CPUs, the Ray cluster has 2"):
        check_resources(ComputeSpec(num_workers=3, cpus_per_worker=2.0), ["m"])
    check_resources(ComputeSpec(num_workers=2, cpus_per_worker=1.0), ["m"])


def test_cli_refuses_an_actor_that_fits_no_node(organism_dir, tmp_path):
    """`refdir run` with cpus_per_worker beyond the machine: one line, exit 2, within 30 s, no model loaded."""
    spec = tmp_path / "spec.toml"
    spec.write_text(f'name = "toobig"\n[[models]]\nkey = "organism"\npath = "{organism_dir}"\n'
                    f'[store]\nuri = "{tmp_path / "store"}"\n[compute]\ncpus_per_worker = 512.0\n')
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PREFECT_API_URL")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "refdir.flows.cli", "run", str(spec), "--plain"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, start_new_session=True)
    took = time.monotonic() - t0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and "512 CPU(s)" in errors[0] and "cpus_per_worker" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and took < 30, took
    assert "starting a local Ray cluster" not in proc.stderr          # refused before Ray starts


@pytest.mark.slow
def test_worker_killed_four_times_in_one_stage(prefect_api, ray_cluster, organism_dir, tmp_path):
    """Four SIGKILLs of the model's worker process during extraction: Ray restarts it twice, then the pool
    replaces the dead actor (fresh restart budget) and the run finishes with every row exactly once."""
    from refdir.flows import plan
    from refdir.flows.runner import execute
    from refdir.schemas import layout
    from refdir.schemas.spec import ModelSpec
    from refdir.workers.store import Store
    from tests.test_pipeline import activation_rows, make_spec

    spec = make_spec("kill4", [ModelSpec(key="organism", path=str(organism_dir))], str(tmp_path / "store"),
                     prompts_per_job=1)
    store = Store.open(str(tmp_path / "store"))
    markers = layout.activation_markers_dir(spec.run_id, "organism")
    killed: list[int] = []

    def killer() -> None:
        seen, deadline = 0, time.time() + 300
        while time.time() < deadline and len(killed) < 4:
            n = len(store.glob(f"{markers}/*.json"))
            pids = [p for p in worker_pids() if p not in killed]
            if n >= seen + 2 and pids:                 # a live worker that finished work since the last kill
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                seen = n
            time.sleep(0.05)

    class Seen(logging.Handler):                  # on the pool's logger: Prefect's logging setup resets root
        lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    seen = Seen(logging.WARNING)
    logging.getLogger("refdir.workers.pool").addHandler(seen)
    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        summary = execute(spec)
    finally:
        logging.getLogger("refdir.workers.pool").removeHandler(seen)
    t.join(timeout=5)
    assert len(killed) == 4, f"only {len(killed)} kill(s) happened during extraction"
    assert summary["models"]["organism"]["status"] == "done", summary["models"]["organism"]
    assert any("replaced by a new one" in line for line in seen.lines), seen.lines
    jobs = plan.extract_jobs(spec, spec.models[0], plan_draw(spec))
    assert len(store.glob(f"{markers}/*.json")) == len(jobs)
    rows, distinct = activation_rows(store, spec, "organism")
    n_prompts = sum(len(j.prompts) for j in jobs)
    n_layers, n_positions = _organism_shape(store, spec)
    assert rows == distinct == n_prompts * n_layers * n_positions


def plan_draw(spec):
    from refdir.workers.prompts import draw_prompts

    return draw_prompts(spec.prompts, spec.models)


def _organism_shape(store, spec) -> tuple[int, int]:
    """(blocks, post-instruction tokens) from the organism's own config and chat template (not refdir)."""
    import json

    from transformers import AutoTokenizer

    path = spec.models[0].path
    n_layers = json.loads((Path(path) / "config.json").read_text())["num_hidden_layers"]
    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template([{"role": "user", "content": "QQQ"}], tokenize=False, add_generation_prompt=True)
    tail = text.split("QQQ")[-1]
    return n_layers, len(tok.encode(tail, add_special_tokens=False))
