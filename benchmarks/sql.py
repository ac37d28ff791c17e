"""SQL over activations: `refdir sql` against polars and pyarrow + numpy on the same activation shards.

    out = bench_sql(workdir / "sql", SqlSizes(), reps=5)
    out["sql_ratio"]                   # refdir sql / fastest other side, worst of queries a-c (goal <= 1.2)
    out["sql_layer_bytes_fraction"]    # bytes a one-layer query reads / activation bytes (goal <= 1.5 / n_layers)
    python -m benchmarks.sql [--quick] [--workdir /tmp/sqlbench] [--keep]   # this section alone, JSON on stdout

Data: synthetic Gaussian activation shards written by refdir's own writer (`activation_table` +
`Store.write_table` + a done-marker), SmolLM2's shape (30 layers x 6 positions x d=576), half harmful
(shifted by +0.5), half harmless, prompts spread over categories. The three queries (layer n_layers // 2, position -1):
  (a) mean activation per (label, layer) at one position            -> (label, layer, d-vector)
  (b) projection of every prompt's activation onto a unit direction at one layer, mean and count by category
  (c) cosine similarity of every prompt's activation to the mean harmful activation at one layer
Sides, same files, same process, rounds interleaved side by side after a warm-up round (whose answers are
compared), ratio = median of per-round ratios against the faster of polars and pyarrow:
  refdir    the SQL a user types into `refdir sql` (README, SQL section), each round on a new
            `flows.sql.connect_views` connection (what `run_sql` opens: the store listed, done-markers and
            footers checked, views over the marked shards, read-only filesystem, locked configuration),
            statement check included, result as Arrow. Connections share the process's DuckDB instance for
            the store (started once, footers parsed once, no file bytes cached), as the other sides share
            their warm process;
  refdir_cold  (b) and (c) only, reported apart (`cold_ratio`, not in sql_ratio): the same on a new DuckDB
            instance each round, what a fresh `refdir sql "..."` process pays for its one query (imports aside);
  polars    `pl.scan_parquet` over the same files with the layer/position filter, collect, numpy for the math;
  pyarrow   `pyarrow.dataset` with the same filter -> numpy.
Answers agree within TOL (max abs difference). Bytes read by a one-layer query (b): the bytes every read
call of refdir sql's read-only local file reader returns are summed, from a fresh DuckDB instance's view
setup to the query's end (every footer DuckDB parses included; refdir's own 8-byte footer checks are not).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.aggregation import Sizes


logger = logging.getLogger(__name__)

GOAL = 1.2
RUN, MODEL = "bench-sql", "synthetic"
CATEGORIES = ("cyber", "fraud", "harassment", "weapons", "drugs", "privacy", "misinfo", "other")
TOL = 1e-4    # max abs difference between sides (float32 inputs, float32/float64 accumulation)


@dataclass(frozen=True)
class SqlSizes(Sizes):
    """The aggregation benchmark's shard shape (SmolLM2's), more shards: 80 x 64 prompts = 2.12 GB of float32."""

    n_shards: int = 80            # half harmful, half harmless

    @property
    def layer(self) -> int:
        return self.n_layers // 2


QUICK = SqlSizes(n_shards=4, prompts_per_shard=8, n_layers=4, n_pos=5, d=64)
POS = -1


# ---------------------------------------------------------------- data

def write_shard(store, label: str, index: int, sizes: SqlSizes, gen: np.random.Generator, dtype: str) -> int:
    """One extraction job's activation shard with refdir's writer, then its done-marker; returns its bytes."""
    import torch

    from refdir.schemas import layout
    from refdir.schemas.jobs import ExtractJob, Prompt
    from refdir.schemas.spec import ModelSpec, StoreSpec
    from refdir.workers.extract import activation_table

    n = sizes.prompts_per_shard
    prompts = [Prompt(prompt_id=index * n + i, instruction=f"p{i}", category=CATEGORIES[(index * n + i) % 8])
               for i in range(n)]
    job = ExtractJob(run_id=RUN, model=ModelSpec(key=MODEL, path="synthetic"), store=StoreSpec(uri=store.uri),
                     split="train", label=label, index=index, prompts=prompts, activation_dtype=dtype)
    shift = np.float32(0.5 if label == "harmful" else 0.0)
    acts = torch.from_numpy(gen.standard_normal((n, sizes.n_layers, sizes.n_pos, sizes.d), dtype=np.float32) + shift)
    rel = layout.activation_shard(RUN, MODEL, "train", label, index)
    rows, sha = store.write_table(rel, activation_table(job, acts, dtype), table_name="activations", run_id=RUN)
    store.write_marker(layout.activation_marker(RUN, MODEL, "train", label, index), job_id=job.job_id, data=rel,
                       rows=rows, sha256=sha, n_prompts=n, n_kept=n)
    return os.path.getsize(store.url(rel))


def write_run(store, sizes: SqlSizes, dtype: str = "float32", seed: int = 0) -> int:
    """Every shard of the benchmark run; returns the activation bytes on disk."""
    gen = np.random.default_rng(seed)
    return sum(write_shard(store, "harmful" if i % 2 == 0 else "harmless", i // 2, sizes, gen, dtype)
               for i in range(sizes.n_shards))


def shard_files(store) -> list[str]:
    """The marked activation shards of the benchmark run, as local paths (what polars and pyarrow read)."""
    from refdir.schemas import layout

    done = store.done_jobs(layout.activation_markers_dir(RUN, MODEL))
    return [store.url(m["data"]) for _, m in sorted(done.items())]


# ---------------------------------------------------------------- the queries, as a user types them

def refdir_queries(sizes: SqlSizes) -> dict[str, str]:
    """SQL for `refdir sql` (the README's SQL section has the same queries); $dir is the unit direction.

    (c) materialises the layer's rows once: the mean and the cosines then share one scan (2.1x -> ~1.1x)."""
    at = f"layer = {sizes.layer} AND position = {POS}"
    by_index = ("SELECT {keys}i, avg(v) AS m FROM (SELECT {keys}unnest(vector) AS v, generate_subscripts(vector, 1) AS i "
                "FROM {src}) GROUP BY ALL")
    return {
        "a": ("SELECT label, layer, list(m ORDER BY i) AS mean FROM ("
              + by_index.format(keys="label, layer, ", src=f"activations WHERE position = {POS}") + ") GROUP BY ALL"),
        "b": (f"SELECT category, avg(list_inner_product(vector, $dir)) AS proj, count(*) AS n FROM activations "
              f"WHERE {at} GROUP BY category"),
        "c": (f"WITH x AS MATERIALIZED (SELECT label, prompt_id, vector FROM activations WHERE {at}), "
              "h AS (SELECT list(m ORDER BY i) AS mu FROM ("
              + by_index.format(keys="", src="x WHERE label = 'harmful'") + ")) "
              "SELECT label, prompt_id, list_cosine_similarity(vector, h.mu) AS cos FROM x, h"),
    }


def _refdir(store, sizes: SqlSizes, direction: np.ndarray, cold: bool = False):
    """Each query on the connection `refdir sql` opens (views over marked shards, locked down), as Arrow.

    cold: on a new DuckDB instance each time (a fresh process's first query: instance start, every footer parsed)."""
    from refdir.flows.sql import check_read_only, close_databases, connect_views

    queries = refdir_queries(sizes)

    def run(name: str):
        if cold:
            close_databases()
        con = connect_views(store)
        try:
            check_read_only(con, queries[name])
            params = {"dir": direction.tolist()} if name == "b" else None
            return con.sql(queries[name], params=params).to_arrow_table()
        finally:
            con.close()
    return run


# ---------------------------------------------------------------- numpy math shared by polars and pyarrow

def _vectors(col) -> np.ndarray:
    """(rows, d) float32 view of an Arrow fixed-size-list (or list) column."""
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(arr), -1) if len(arr) else flat.reshape(0, 0)


def np_mean_by(keys: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique keys, float64 mean of x's rows per key)."""
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    sums = np.add.reduceat(x[order], starts, axis=0, dtype=np.float64)
    counts = np.diff(np.r_[starts, len(k)])
    return k[starts], sums / counts[:, None]


def np_a(label: np.ndarray, layer: np.ndarray, x: np.ndarray) -> dict:
    keys = (label == "harmful").astype(np.int64) * 10_000 + layer.astype(np.int64)
    uk, means = np_mean_by(keys, x)
    return {("harmful" if k >= 10_000 else "harmless", int(k % 10_000)): m for k, m in zip(uk, means)}


def np_b(category: np.ndarray, x: np.ndarray, direction: np.ndarray) -> dict:
    proj = x @ direction.astype(np.float32)
    cats, inv = np.unique(category, return_inverse=True)
    n = np.bincount(inv)
    return {c: (s / k, int(k)) for c, s, k in zip(cats, np.bincount(inv, weights=proj.astype(np.float64)), n)}


def np_c(label: np.ndarray, prompt_id: np.ndarray, x: np.ndarray) -> dict:
    mu = x[label == "harmful"].mean(axis=0, dtype=np.float64)
    cos = (x @ mu) / (np.linalg.norm(x, axis=1) * np.linalg.norm(mu))
    return dict(zip(zip(label.tolist(), prompt_id.tolist()), cos.tolist()))


def _polars(files: list[str], sizes: SqlSizes, direction: np.ndarray):
    import polars as pl

    at = (pl.col("layer") == sizes.layer) & (pl.col("position") == POS)

    def run(name: str):
        if name == "a":
            df = pl.scan_parquet(files).filter(pl.col("position") == POS).select("label", "layer", "vector").collect()
            return np_a(df["label"].to_numpy(), df["layer"].to_numpy(), df["vector"].to_numpy())
        if name == "b":
            df = pl.scan_parquet(files).filter(at).select("category", "vector").collect()
            return np_b(df["category"].to_numpy(), df["vector"].to_numpy(), direction)
        df = pl.scan_parquet(files).filter(at).select("label", "prompt_id", "vector").collect()
        return np_c(df["label"].to_numpy(), df["prompt_id"].to_numpy(), df["vector"].to_numpy())
    return run


def _pyarrow(files: list[str], sizes: SqlSizes, direction: np.ndarray):
    import pyarrow.dataset as ds

    pos = ds.field("position") == POS
    at = (ds.field("layer") == sizes.layer) & pos

    def col(t, name):
        return t.column(name).to_numpy()

    def run(name: str):
        dataset = ds.dataset(files, format="parquet")
        if name == "a":
            t = dataset.to_table(columns=["label", "layer", "vector"], filter=pos)
            return np_a(col(t, "label"), col(t, "layer"), _vectors(t.column("vector")))
        if name == "b":
            t = dataset.to_table(columns=["category", "vector"], filter=at)
            return np_b(col(t, "category"), _vectors(t.column("vector")), direction)
        t = dataset.to_table(columns=["label", "prompt_id", "vector"], filter=at)
        return np_c(col(t, "label"), col(t, "prompt_id"), _vectors(t.column("vector")))
    return run


# ---------------------------------------------------------------- agreement

def as_answer(name: str, result) -> dict:
    """Any side's result as {key: value} (refdir's Arrow tables become the numpy sides' dicts)."""
    if isinstance(result, dict):
        return result
    rows = result.to_pylist()
    if name == "a":
        return {(r["label"], r["layer"]): np.asarray(r["mean"]) for r in rows}
    if name == "b":
        return {r["category"]: (r["proj"], r["n"]) for r in rows}
    return {(r["label"], r["prompt_id"]): r["cos"] for r in rows}


def max_diff(name: str, x: dict, y: dict) -> float:
    """Largest abs difference between two answers (inf when their keys or counts differ)."""
    if x.keys() != y.keys():
        return float("inf")
    if name == "b":
        if any(x[k][1] != y[k][1] for k in x):
            return float("inf")
        return max(abs(x[k][0] - y[k][0]) for k in x)
    return max(float(np.max(np.abs(np.asarray(x[k], np.float64) - np.asarray(y[k], np.float64)))) for k in x)


# ---------------------------------------------------------------- bytes read by a one-layer query

def layer_bytes(root: str, sizes: SqlSizes, direction: np.ndarray, total: int) -> dict:
    """Bytes DuckDB reads (every footer included) for query (b), one layer, in a fresh process's `refdir sql`."""
    from refdir.flows import sql
    from refdir.workers.store import Store

    store = Store.open(root, create=False)
    counted = [0]
    plain = sql._LocalReader.read

    def read(self, n: int = -1) -> bytes:
        data = plain(self, n)
        counted[0] += len(data)
        return data

    sql.close_databases()              # a fresh DuckDB instance: no footer parsed yet
    sql._LocalReader.read = read
    try:
        con = sql.connect_views(store)
        con.sql(refdir_queries(sizes)["b"], params={"dir": direction.tolist()}).fetchall()
        con.close()
    finally:
        sql._LocalReader.read = plain
    return {"bytes_read": counted[0], "bytes_total": total, "fraction": counted[0] / total,
            "goal": 1.5 / sizes.n_layers, "method": "sum of the bytes returned by every read DuckDB made through "
            "refdir sql's read-only local file reader, from a fresh DuckDB instance's view setup to the query's end"}


# ---------------------------------------------------------------- the benchmark

def _direction(d: int) -> np.ndarray:
    v = np.random.default_rng(1).standard_normal(d)
    return (v / np.linalg.norm(v)).astype(np.float32)


def timed_rounds(sides: dict, q: str, reps: int) -> tuple[dict, dict]:
    """Interleaved rounds (side by side, after one warm-up round whose answers are kept for the check):
    ({side: [wall s]}, {side: [cpu s]}) and {side: warm-up answer}."""
    wall: dict = {k: [] for k in sides}
    cpu: dict = {k: [] for k in sides}
    answers = {}
    for r in range(1 + reps):
        for k, run in sides.items():
            c0, t0 = time.process_time(), time.perf_counter()
            res = run(q)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r == 0:
                answers[k] = as_answer(q, res)
            else:
                wall[k].append(dt)
                cpu[k].append(dc)
    return (wall, cpu), answers


def agreement(sides: dict, names=("a", "b", "c")) -> dict:
    """{query: max abs difference of each other side's answer from refdir's} (one untimed run each)."""
    out = {}
    for q in names:
        ref = as_answer(q, sides["refdir"](q))
        out[q] = {k: max_diff(q, ref, as_answer(q, run(q))) for k, run in sides.items() if k != "refdir"}
    return out


def _query_result(wall: dict, cpu: dict) -> dict:
    med = {k: statistics.median(v) for k, v in wall.items()}
    best = min(("polars", "pyarrow"), key=lambda k: med[k])
    per_round = [a / b for a, b in zip(wall["refdir"], wall[best])]
    cpu_round = [a / b for a, b in zip(cpu["refdir"], cpu[best]) if b > 0]
    cold = [a / b for a, b in zip(wall.get("refdir_cold", []), wall[best])]
    return {"ratio": statistics.median(per_round), "vs": best, "seconds": med, "rounds": wall, "cpu_rounds": cpu,
            "cpu_ratio": statistics.median(cpu_round) if cpu_round else None,
            "cold_ratio": statistics.median(cold) if cold else None}


def bench_sql(workdir: Path, sizes: SqlSizes, *, reps: int, dtype: str = "float32", queries: str = "abc") -> dict:
    """Write (or reuse) the shards, time the sides interleaved, check their answers agree, count a one-layer
    query's bytes."""
    from refdir.workers.store import Store

    store = Store.open(str(workdir))
    t0 = time.perf_counter()
    files = shard_files(store)
    if len(files) != sizes.n_shards:      # a kept --workdir of the same sizes is reused as it is
        write_run(store, sizes, dtype)
        files = shard_files(store)
    write_s = time.perf_counter() - t0
    disk, direction = sum(os.path.getsize(f) for f in files), _direction(sizes.d)
    sides = {"refdir": _refdir(store, sizes, direction), "polars": _polars(files, sizes, direction),
             "pyarrow": _pyarrow(files, sizes, direction)}
    out: dict = {"queries": refdir_queries(sizes), "tolerance": TOL, "max_abs_diff": {}}
    cold = _refdir(store, sizes, direction, cold=True)     # one-layer queries: where fixed costs show
    for q in queries:
        (wall, cpu), answers = timed_rounds(sides if q == "a" else {**sides, "refdir_cold": cold}, q, reps)
        out["max_abs_diff"][q] = {k: max_diff(q, answers["refdir"], v) for k, v in answers.items() if k != "refdir"}
        out[q] = _query_result(wall, cpu)
        logger.info("sql %s: refdir %.3fs, polars %.3fs, pyarrow %.3fs -> %.2f vs %s (cpu %.2f, cold %s)", q,
                    *(out[q]["seconds"][k] for k in sides), out[q]["ratio"], out[q]["vs"], out[q]["cpu_ratio"] or 0,
                    "n/a" if out[q]["cold_ratio"] is None else f"{out[q]['cold_ratio']:.2f}")
    worst = max(v for d in out["max_abs_diff"].values() for v in d.values())
    if not worst <= TOL:
        raise RuntimeError(f"the sides disagree beyond {TOL}: {out['max_abs_diff']}")
    out["sql_ratio"] = max(out[q]["ratio"] for q in queries)
    colds = [out[q]["cold_ratio"] for q in queries if out[q]["cold_ratio"] is not None]
    out["cold_ratio"] = max(colds) if colds else None      # a fresh process's first query, worst of (b), (c)
    out["goal"] = GOAL
    out["layer_bytes"] = layer_bytes(store.uri, sizes, direction, disk)
    out["sql_layer_bytes_fraction"] = out["layer_bytes"]["fraction"]
    out.update(sizes=sizes.__dict__, dtype=dtype, activation_bytes_raw=sizes.raw_bytes, activation_bytes_on_disk=disk,
               bytes_per_value=disk / (sizes.raw_bytes / 4), write_s=write_s, n_files=len(files),
               load_avg=list(os.getloadavg()))
    return out


def section(workdir: Path, quick: bool, reps: int) -> dict:
    """The "sql" section of benchmarks/run.py; headline keys: sql_ratio, sql_layer_bytes_fraction."""
    return bench_sql(workdir, QUICK if quick else SqlSizes(), reps=reps)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sql", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shards, one round (the smoke test)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per query (default 5, --quick 1)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--workdir", type=Path, default=None, help="data folder (default: a temp folder, deleted)")
    p.add_argument("--keep", action="store_true", help="keep the data folder")
    p.add_argument("--queries", default="abc", help="a subset of the queries a, b, c (sql_ratio is over these)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="refdir-sql-"))
    reps = args.reps or (1 if args.quick else 5)
    try:
        out = bench_sql(workdir, QUICK if args.quick else SqlSizes(), reps=reps, dtype=args.dtype,
                        queries=args.queries)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(out, default=float))
    return out


if __name__ == "__main__":
    main()
