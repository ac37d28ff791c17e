"""Rerun benchmark: seconds for `execute(spec)` on a finished run, and a resume after losing k extraction jobs.

Runs in its own process (it starts Prefect's temporary server and a local Ray cluster, which must not
linger in the process that times the other stages):

    python -m benchmarks.rerun WORKDIR --k 3 --reps 3      # prints one JSON line

1. builds the refusal model organism (`workers.organism.build_organism`) and runs a small spec on it to
   completion with `flows.runner.execute` (the first run: Prefect server start + Ray start + every stage);
2. reruns the finished spec `reps` times in this process (goal <= 5 s: manifests only) and checks that
   no file of the store changed, then once in a fresh process (imports included, what `refdir run` costs);
3. deletes k of the n extraction markers with their shards (activations, sums, prompts) and the extract
   stage's manifest (what a driver killed during extraction leaves behind) and reruns: seconds, and the markers that were rewritten (must be exactly the k deleted ones).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, median

logger = logging.getLogger(__name__)

GOAL_S = 5.0
SRC = "builtin:organism_{}_{}"


def make_spec(name: str, organism: Path, store: str):
    from refdir.schemas.spec import (ComputeSpec, EvaluationSpec, ExtractionSpec, GenerationSpec, ModelSpec,
                                     PromptSpec, RunSpec, SelectionSpec, StoreSpec)

    prompts = PromptSpec(**{f"{lab}_{split}": SRC.format(lab, split) for lab in ("harmful", "harmless")
                            for split in ("train", "val", "test")}, n_train=32, n_val=16, n_test=16)
    return RunSpec(name=name, models=[ModelSpec(key="organism", path=str(organism))], prompts=prompts,
                   extraction=ExtractionSpec(prompts_per_job=8, candidates_per_job=4),
                   selection=SelectionSpec(allow_fallback=True),
                   generation=GenerationSpec(max_new_tokens=6, batch_size=16),
                   evaluation=EvaluationSpec(prompts_per_job=8),
                   store=StoreSpec(uri=store), compute=ComputeSpec(batch_size=16, num_workers=1))


def markers(store, run_id: str, key: str) -> dict[str, dict]:
    """Every done-marker of one model (extraction, scoring, evaluation): path -> content."""
    from refdir.schemas import layout

    return {rel: store.read_json(rel) for rel in store.list_files(layout.model_dir(run_id, key))
            if "/_done/" in rel and rel.endswith(".json")}


def file_stamps(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


def lose_jobs(store, spec, k: int) -> list[str]:
    """Delete k extraction jobs' markers and shards (spread over the plan) and the extract stage's manifest."""
    from refdir.flows import plan
    from refdir.schemas import layout
    from refdir.workers.prompts import draw_prompts

    model = spec.models[0]
    jobs = plan.extract_jobs(spec, model, draw_prompts(spec.prompts, spec.models))
    if not 0 < k < len(jobs):
        raise ValueError(f"k must be between 1 and {len(jobs) - 1} (the run has {len(jobs)} extraction jobs), got {k}")
    lost = [jobs[i * len(jobs) // k] for i in range(k)]
    for j in lost:
        r, key = j.run_id, model.key
        for rel in (plan.extract_marker(j), layout.activation_shard(r, key, j.split, j.label, j.index),
                    layout.sums_shard(r, key, j.split, j.label, j.index),
                    layout.prompts_shard(r, key, j.split, j.label, j.index)):
            store.delete(rel)
    store.delete(layout.stage_manifest(spec.run_id, model.key, "extract"))   # the stage is no longer done
    return [plan.extract_marker(j) for j in lost]


def cold_rerun(spec_path: Path, env: dict) -> float:
    code = ("import json,sys; from refdir.schemas.spec import parse_spec; from refdir.flows.runner import execute; "
            "execute(parse_spec(json.load(open(sys.argv[1]))))")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(spec_path)], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    if proc.returncode != 0:   # say why: a rerun that dies is a product failure, not benchmark noise
        raise RuntimeError(f"cold rerun of {spec_path} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def bench_rerun(workdir: Path, k: int, reps: int) -> dict:
    from refdir.flows.runner import execute
    from refdir.workers.organism import build_organism
    from refdir.workers.store import Store

    t0 = time.perf_counter()
    organism = build_organism(workdir / "organism", seed=0)
    build_s = time.perf_counter() - t0
    from refdir.workers.identity import resolve_inputs

    spec = resolve_inputs(make_spec("bench-rerun", organism, str(workdir / "store")))   # its run id, from content
    store = Store.open(spec.store)
    t0 = time.perf_counter()
    first = execute(spec)
    first_s = time.perf_counter() - t0
    if first["models"]["organism"]["status"] != "done":
        raise RuntimeError(f"the first run did not finish: {first['models']['organism']}")
    before = file_stamps(workdir / "store")
    rerun = []
    for _ in range(reps):
        t0 = time.perf_counter()
        again = execute(spec)
        rerun.append(time.perf_counter() - t0)
    changed = [p for p, s in file_stamps(workdir / "store").items() if before.get(p) != s]
    spec_path = workdir / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    cold = cold_rerun(spec_path, dict(os.environ))
    old = markers(store, spec.run_id, "organism")
    lost = lose_jobs(store, spec, k)
    t0 = time.perf_counter()
    resumed = execute(spec)
    resume_s = time.perf_counter() - t0
    new = markers(store, spec.run_id, "organism")
    rewritten = sorted(rel for rel in new if old.get(rel) != new[rel])
    return {"rerun_seconds": median(rerun), "goal_s": GOAL_S, "rerun_rounds_s": rerun,
            "rerun_files_changed": len(changed), "rerun_status": again["models"]["organism"]["status"],
            "rerun_cold_process_s": cold, "organism_build_s": build_s, "first_run_s": first_s,
            "n_extract_jobs": sum("/activations/_done/" in r for r in old), "k": k,
            "resume_s": resume_s, "resume_status": resumed["models"]["organism"]["status"],
            "jobs_recomputed": len(rewritten), "recomputed_are_lost": rewritten == sorted(lost),
            "recomputed": rewritten}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rerun", description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--k", type=int, default=3, help="extraction jobs to lose before the resume")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    os.environ.setdefault("PREFECT_HOME", str(args.workdir / "prefect-home"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=os.environ.get("REFDIR_BENCH_LOG", "WARNING"), stream=sys.stderr)
    args.workdir.mkdir(parents=True, exist_ok=True)
    out = bench_rerun(args.workdir, args.k, args.reps)
    print(json.dumps(out))
    sys.stdout.flush()
    try:
        import ray

        ray.shutdown()
    except Exception:  # noqa: BLE001 - best effort; the local cluster also stops when this process exits
        pass


if __name__ == "__main__":
    main()
