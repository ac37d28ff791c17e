"""Extraction: refdir's extraction job vs a bare forward pass doing the same logits work.

    out = bench_extraction(lm, workdir, n_prompts=16, batch_size=8, reps=5, jobs=3)
    out["ratio"]          # run_extract / bare forward, one job at a time (goal <= 1.10 on CPU)
    out["stream_ratio"]   # per job, `jobs` jobs in flight through the actor's writer / bare (GPU goal <= 1.5)

Sides, interleaved round by round (torch threads fixed by the caller), over the same prompts:
- refdir: `run_extract(lm, store, job)` on a real local Store: tokenise, capture resid_pre, refusal scores,
  Arrow, Parquet (activations, sums, prompts), marker; a fresh job index each round;
- bare:   `lm.model(**batch, logits_to_keep=1)` over the same batches, tokenised beforehand: the forward the
  job needs (only the last position's logits feed the refusal score);
- stream: `jobs` jobs at once in threads sharing one `ExtractWriter`, as a threaded GPU actor runs them
  (forwards one at a time, shards encoded on the writer's threads); its seconds / jobs per round.
Also one instrumented job (forward+capture / Arrow tables / Parquet writes), the written shard's bytes per
value as float32 (byte-stream-split + zstd) and float16 (zstd), and a cProfile of a job when the ratio misses.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.common import Case, paired, prompts, py_profile, ratio

logger = logging.getLogger(__name__)

GOAL, GPU_GOAL = 1.10, 1.5


def _job(lm, store, rows: list[dict], index: int, batch_size: int, dtype: str = "float32"):
    from refdir.schemas.jobs import ExtractJob, Prompt
    from refdir.schemas.spec import StoreSpec

    return ExtractJob(run_id="bench-extract", model=lm.spec, store=StoreSpec(uri=store.uri), split="train",
                      label="harmful", index=index, batch_size=batch_size, activation_dtype=dtype,
                      prompts=[Prompt(prompt_id=i, instruction=r["instruction"], category=r["category"])
                               for i, r in enumerate(rows)])


def _bare(lm, batches: list) -> None:
    with torch.inference_mode():
        for enc in batches:
            lm.model(**enc, logits_to_keep=1).logits[:, -1, :]        # (batch, vocab)


def breakdown(lm, store, job) -> dict:
    """Seconds of each part of one job, with the job's own building blocks, and bytes per stored value."""
    from refdir.workers.extract import activation_table, forward_capture, prompts_table, sums_table

    t = [time.perf_counter()]
    cap = forward_capture(lm, [p.instruction for p in job.prompts], job.batch_size, job.label, job.filter_prompts)
    t.append(time.perf_counter())
    tables = (activation_table(job, cap.acts, "float32"), sums_table(job, cap), prompts_table(job, cap.scores, cap.kept))
    t.append(time.perf_counter())
    for name, table in zip(("activations", "sums", "prompts"), tables):
        store.write_table(f"breakdown/{name}.parquet", table, table_name=name, run_id=job.run_id)
    t.append(time.perf_counter())
    store.write_table("breakdown/f16.parquet", activation_table(job, cap.acts, "float16"), table_name="activations",
                      run_id=job.run_id)
    values = cap.acts.numel()
    size = {k: Path(store.url(f"breakdown/{k}.parquet")).stat().st_size for k in ("activations", "f16")}
    store.delete("breakdown", recursive=True)
    return {"forward_capture_s": t[1] - t[0], "arrow_tables_s": t[2] - t[1], "parquet_writes_s": t[3] - t[2],
            "activation_mb": values * 4 / 1e6, "bytes_per_value_float32": size["activations"] / values,
            "bytes_per_value_float16": size["f16"] / values}


def bench_extraction(lm, store_dir: Path, *, n_prompts: int, batch_size: int, reps: int, jobs: int = 3,
                     profile_on_miss: bool = True) -> dict:
    """run_extract vs the bare last-logits forward: one job at a time, and `jobs` at once through the writer."""
    from refdir.workers.extract import ExtractWriter, run_extract
    from refdir.workers.store import Store

    store = Store.open(str(store_dir))
    rows = prompts("harmful", n_prompts)
    texts = [r["instruction"] for r in rows]
    batches = [lm.encode(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    counter = iter(range(10**6))
    receipts: list = []
    writer, threads = ExtractWriter(workers=2, max_pending=2), ThreadPoolExecutor(jobs)

    def new_job(_r=None):
        return _job(lm, store, rows, next(counter), batch_size)

    def stream(job_list) -> None:
        receipts.extend(threads.map(lambda j: run_extract(lm, store, j, writer=writer), job_list))

    cases = {"refdir": Case(lambda j: receipts.append(run_extract(lm, store, j)), new_job),
             "bare": Case(lambda _a: _bare(lm, batches)),
             "stream": Case(stream, lambda _r: [new_job() for _ in range(jobs)])}
    try:
        times = paired(cases, reps)
    finally:
        writer.close()
        threads.shutdown()
    times["stream"] = [s / jobs for s in times["stream"]]
    times.cpu["stream"] = [s / jobs for s in times.cpu["stream"]]
    if any(r.skipped for r in receipts):
        raise RuntimeError("an extraction round was answered from its marker; the benchmark must recompute")
    one, st = ratio(times, "refdir", "bare"), ratio(times, "stream", "bare")
    out = {"ratio": one["ratio"], "goal": GOAL, "cpu_ratio": one.get("cpu_ratio"), "ratio_of_mins": one["ratio_of_mins"],
           "stream_ratio": st["ratio"], "stream_cpu_ratio": st.get("cpu_ratio"), "gpu_goal": GPU_GOAL, "jobs": jobs,
           "refdir_s": one["refdir_s"], "bare_s": one["bare_s"], "stream_s_per_job": st["stream_s"],
           "rounds": dict(times), "cpu_rounds": times.cpu, "n_prompts": n_prompts, "batch_size": batch_size,
           "tokens": sum(int(b["attention_mask"].sum()) for b in batches), "rows_per_job": receipts[-1].rows,
           "breakdown": breakdown(lm, store, new_job())}
    if profile_on_miss and out["ratio"] > GOAL:
        job = new_job()
        out["profile_refdir"] = py_profile(lambda: run_extract(lm, store, job))
    logger.info("extraction: refdir %.2fs, stream %.2fs/job, bare %.2fs -> ratio %.3f, stream %.3f", out["refdir_s"],
                out["stream_s_per_job"], out["bare_s"], out["ratio"], out["stream_ratio"])
    return out
