"""Aggregation: refdir's means stage against the limit of reading its inputs, and its peak RSS at 10x the data.

    out = bench_aggregation(workdir / "agg", Sizes(...), reps=3)
    out["ratio"]                 # aggregate_means seconds / seconds to read its inputs (info: no goal)
    out["peak_rss_ratio_10x"]    # peak RSS of aggregate_means at 10x data / at 1x (fresh processes), goal <= 1.2

Data: synthetic activation shards (Gaussian float32, SmolLM2's shape: 30 layers x 6 positions x d=576) written
with refdir's real writer and schemas (`workers.extract.activation_table` / `sums_table` / `prompts_table`,
`Store.write_table`, a marker like `run_extract`'s), half harmful, half harmless, every prompt kept. The 10x
run holds each 1x shard ten times under new job indices (hard links: ten times the files and rows to read).

`aggregate_means` reads the done-markers and the per-job float64 sums shards (written while the tensor was
in memory), never the activations; its limit is reading those inputs: every marker and every sums shard's
bytes from the store, timed side by side (interleaved). The means are checked against numpy float64 sums
over the activation shards (max |diff|). Peak RSS: `python -m benchmarks.aggregation rss ...` per run size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import Case, paired, peak_rss_bytes, py_profile, ratio, rss_bytes, run_child

logger = logging.getLogger(__name__)

RSS_GOAL = 1.2   # the store issue: a store 10x larger raises peak RSS by at most ~20%
RUN_1X, RUN_10X, MODEL = "bench-agg-1x", "bench-agg-10x", "synthetic"


@dataclass(frozen=True)
class Sizes:
    n_shards: int = 24            # half harmful, half harmless
    prompts_per_shard: int = 64
    n_layers: int = 30
    n_pos: int = 6
    d: int = 576

    @property
    def raw_bytes(self) -> int:
        return self.n_shards * self.prompts_per_shard * self.n_layers * self.n_pos * self.d * 4


def _job(store, run_id: str, label: str, index: int, n: int, filter_prompts: bool = False):
    from refdir.schemas.jobs import ExtractJob, Prompt
    from refdir.schemas.spec import ModelSpec, StoreSpec

    return ExtractJob(run_id=run_id, model=ModelSpec(key=MODEL, path="synthetic"), store=StoreSpec(uri=store.uri),
                      split="train", label=label, index=index, filter_prompts=filter_prompts,
                      prompts=[Prompt(prompt_id=index * n + i, instruction=f"p{i}") for i in range(n)])


def write_shard(store, run_id: str, label: str, index: int, sizes: Sizes, gen: np.random.Generator) -> None:
    """One synthetic extraction job's objects with the real writer: activations, sums, prompts, then marker."""
    import torch

    from refdir.schemas import layout
    from refdir.workers.extract import Captured, activation_table, prompts_table, sums_table

    n = sizes.prompts_per_shard
    job = _job(store, run_id, label, index, n)
    shape = (n, sizes.n_layers, sizes.n_pos, sizes.d)
    shift = np.float32(0.5 if label == "harmful" else 0.0)
    acts = torch.from_numpy(gen.standard_normal(shape, dtype=np.float32) + shift)    # (n, L, P, d)
    scores = torch.zeros(n, dtype=torch.float64)
    kept = np.ones(n, dtype=bool)
    rels = (layout.activation_shard(run_id, MODEL, "train", label, index),
            layout.sums_shard(run_id, MODEL, "train", label, index),
            layout.prompts_shard(run_id, MODEL, "train", label, index))
    rows, sha = store.write_table(rels[0], activation_table(job, acts, "float32"), table_name="activations",
                                  run_id=run_id, row_group_size=n * sizes.n_pos)
    sums = acts.sum(dim=0, dtype=torch.float64).numpy()                              # (L, P, d), all kept
    store.write_table(rels[1], sums_table(job, Captured(acts, scores, kept, sums)), table_name="sums", run_id=run_id)
    store.write_table(rels[2], prompts_table(job, scores, kept), table_name="prompts", run_id=run_id)
    store.write_json(layout.activation_marker(run_id, MODEL, "train", label, index), {
        "job_id": job.job_id, "data": rels[0], "rows": rows, "sha256": sha, "sums": rels[1], "prompts": rels[2],
        "n_prompts": n, "n_kept": n, "seconds": 0.0, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ")})


def write_run(store, run_id: str, sizes: Sizes, seed: int = 0, start: int = 0) -> None:
    gen = np.random.default_rng(seed)
    for i in range(sizes.n_shards):
        label = "harmful" if i % 2 == 0 else "harmless"
        write_shard(store, run_id, label, start + i // 2, sizes, gen)


def link_copies(store, src_run: str, dst_run: str, copies: int) -> int:
    """dst_run = `copies` x every marked shard of src_run, as hard links under new job indices."""
    from refdir.schemas import layout

    done = store.done_jobs(layout.activation_markers_dir(src_run, MODEL))
    per_label = max(int(stem.rsplit("-", 1)[1]) for stem in done) + 1
    for c in range(copies):
        for stem, m in done.items():
            _, label, idx = stem.split("-")
            index = c * per_label + int(idx)
            new = {"data": layout.activation_shard(dst_run, MODEL, "train", label, index),
                   "sums": layout.sums_shard(dst_run, MODEL, "train", label, index)}
            for key, rel in new.items():
                dst = Path(store.url(rel))
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(store.url(m[key]), dst)
            marker = {**m, **new, "job_id": f"extract/train-{label}-{index:05d}", "prompts": None}
            store.write_json(layout.activation_marker(dst_run, MODEL, "train", label, index), marker)
    return copies * len(done)


# ---------------------------------------------------------------- the numpy limit

def load_activations(store, run_id: str) -> list:
    """Every marked activation shard of a run as an in-memory Arrow table (untimed)."""
    from refdir.schemas import layout

    done = store.done_jobs(layout.activation_markers_dir(run_id, MODEL))
    return [store.read_table(m["data"], columns=["label", "layer", "position", "vector"])
            for _, m in sorted(done.items())]


def check_layer_major(table, n_layers: int, n_pos: int) -> int:
    """Rows are (layer, prompt, position)-ordered as refdir writes them; returns the prompt count."""
    layer = table.column("layer").to_numpy()
    pos = table.column("position").to_numpy()
    n = table.num_rows // (n_layers * n_pos)
    if not (np.array_equal(layer, np.repeat(np.arange(n_layers), n * n_pos))
            and np.array_equal(pos, np.tile(np.arange(-n_pos, 0), n_layers * n))):
        raise RuntimeError("activation shard rows are not layer-major (layer, prompt, position)")
    return n


def numpy_means(tables: list, n_layers: int, n_pos: int) -> dict[str, np.ndarray]:
    """{label: (n_layers, n_pos, d) float64 means} from in-memory Arrow tables; the comparison's limit."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for t in tables:
        vec = t.column("vector").chunk(0) if t.column("vector").num_chunks == 1 else t.column("vector").combine_chunks()
        d = vec.type.list_size
        flat = vec.values.to_numpy().reshape(n_layers, -1, n_pos, d)     # (L, n, P, d) float32, zero-copy
        label = t.column("label")[0].as_py()
        s = flat.sum(axis=1, dtype=np.float64)                          # (L, P, d)
        sums[label] = sums[label] + s if label in sums else s
        counts[label] = counts.get(label, 0) + flat.shape[1]
    return {k: v / counts[k] for k, v in sums.items()}


def _max_diff(store, run_id: str, ref: dict[str, np.ndarray]) -> float:
    """Largest |aggregate_means mean - numpy mean| over every (label, position, layer)."""
    from refdir.schemas import layout

    t = store.read_table(layout.means_table(run_id, MODEL)).to_pylist()
    n_pos = ref["harmful"].shape[1]
    return max(float(np.abs(np.asarray(r["vector"]) - ref[r["label"]][r["layer"], r["position"] + n_pos]).max())
               for r in t)


# ---------------------------------------------------------------- peak RSS in a fresh process

def rss_child(store_uri: str, run_id: str, fn: str) -> dict:
    """Body of `python -m benchmarks.aggregation rss`: run one aggregation, report RSS before and peak."""
    import duckdb  # noqa: F401 - imported before the baseline so the library itself is not counted

    from refdir.flows import aggregate
    from refdir.workers.store import Store

    store = Store.open(store_uri, create=False)
    before = rss_bytes()
    t0 = time.perf_counter()
    getattr(aggregate, fn)(store, run_id, MODEL, "train")
    return {"fn": fn, "run_id": run_id, "rss_before": before, "peak_rss": peak_rss_bytes(),
            "seconds": time.perf_counter() - t0}


def measure_rss(store_uri: str, fn: str) -> dict:
    one = run_child(["-m", "benchmarks.aggregation", "rss", store_uri, RUN_1X, fn])
    ten = run_child(["-m", "benchmarks.aggregation", "rss", store_uri, RUN_10X, fn])
    return {"1x": one, "10x": ten, "peak_rss_ratio_10x": ten["peak_rss"] / one["peak_rss"],
            "growth_mb_1x": (one["peak_rss"] - one["rss_before"]) / 1e6,
            "growth_mb_10x": (ten["peak_rss"] - ten["rss_before"]) / 1e6}


# ---------------------------------------------------------------- the benchmark

def _shard_bytes(store, run_id: str) -> int:
    from refdir.schemas import layout

    done = store.done_jobs(layout.activation_markers_dir(run_id, MODEL))
    return sum(os.path.getsize(store.url(m["data"])) for m in done.values())


def read_inputs(store, run_id: str) -> int:
    """The limit: every done-marker and every sums shard's bytes read from the store; returns the bytes."""
    from refdir.schemas import layout

    done = store.done_jobs(layout.activation_markers_dir(run_id, MODEL))
    return sum(len(store.read_bytes(m["sums"])) for m in done.values())


def bench_aggregation(workdir: Path, sizes: Sizes, *, reps: int, distinct_10x: bool = False,
                      profile_on_miss: bool = True) -> dict:
    from refdir.flows.aggregate import aggregate_means
    from refdir.workers.store import Store

    store = Store.open(str(workdir))
    write_run(store, RUN_1X, sizes)
    if distinct_10x:
        for c in range(10):
            write_run(store, RUN_10X, sizes, seed=c, start=c * sizes.n_shards // 2)
    else:
        link_copies(store, RUN_1X, RUN_10X, 10)
    tables = load_activations(store, RUN_1X)
    for t in tables:
        check_layer_major(t, sizes.n_layers, sizes.n_pos)
    ref = numpy_means(tables, sizes.n_layers, sizes.n_pos)
    tables.clear()
    read: list[int] = []
    times = paired({"refdir": Case(lambda _a: aggregate_means(store, RUN_1X, MODEL, "train")),
                    "read_inputs": Case(lambda _a: read.append(read_inputs(store, RUN_1X)))}, reps)
    r = ratio(times, "refdir", "read_inputs")
    out = {"ratio": r["ratio"], "cpu_ratio": r.get("cpu_ratio"), "refdir_s": r["refdir_s"],
           "read_inputs_s": r["read_inputs_s"], "input_bytes": read[-1], "rounds": dict(times),
           "sizes": sizes.__dict__, "activation_bytes_raw": sizes.raw_bytes,
           "activation_bytes_on_disk": _shard_bytes(store, RUN_1X), "max_abs_diff_vs_numpy": _max_diff(store, RUN_1X, ref),
           "tenx": "distinct shards" if distinct_10x else "hard links"}
    out["rss"] = {"aggregate_means": measure_rss(store.uri, "aggregate_means")}
    out["peak_rss_ratio_10x"] = out["rss"]["aggregate_means"]["peak_rss_ratio_10x"]
    out["rss_goal"] = RSS_GOAL
    if profile_on_miss and out["peak_rss_ratio_10x"] > RSS_GOAL:
        out["profile_refdir"] = py_profile(lambda: aggregate_means(store, RUN_10X, MODEL, "train"))
    logger.info("aggregation: refdir %.2fs, reading its inputs %.3fs (%.1f MB) -> %.1fx; RSS 10x/1x %.2f",
                out["refdir_s"], out["read_inputs_s"], read[-1] / 1e6, out["ratio"], out["peak_rss_ratio_10x"])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.aggregation")
    sub = p.add_subparsers(dest="cmd", required=True)
    rss = sub.add_parser("rss", help="peak RSS of one aggregation function in this fresh process (JSON)")
    rss.add_argument("store")
    rss.add_argument("run_id")
    rss.add_argument("fn", choices=["aggregate_means"])
    args = p.parse_args(argv)
    print(json.dumps(rss_child(args.store, args.run_id, args.fn)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
