"""Aggregation: done activation shards -> per (label, position, layer) means -> diff-in-means candidates.

The shipped path (`aggregate_means`) reads the small per-shard float64 sums + counts that extraction
writes next to every activation shard (`sums` table), only for shards whose activation marker exists,
streams them out of DuckDB as Arrow batches and adds them into one float64 accumulator per key, so
memory is O(keys x d) whatever the number of prompts or shards. `means_from_activations` is the slower
reference straight from the activation shards, kept prompts only (ids from the jobs' prompts shards,
filtered batch by batch), through the same streaming accumulator; tests and the benchmark cross-check the two.

    stats = aggregate_means(store, run_id, "org-1", split="train")   # writes means.parquet, candidates.parquet
    run_stage(mr)                       # the pipeline's aggregate stage (flows/stages.ModelRun)
    ref = means_from_activations(store, run_id, "org-1")              # {(label, pos, layer): (mean, n)}
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from refdir.schemas import layout
from refdir.schemas.tables import candidates_schema, means_schema
from refdir.workers.store import Store

logger = logging.getLogger(__name__)

BATCH_ROWS = 8192  # Arrow batch size streamed out of DuckDB; bounds memory per step

Key = tuple[str, int, int]  # (label, position, layer)


class AggregateError(RuntimeError):
    """Aggregation cannot produce means: no marked shards, a label missing, inconsistent counts."""


# ---------------------------------------------------------------- streaming accumulator

class _Accumulator:
    """float64 sums and counts per (label, position, layer); grows with keys, not rows."""

    def __init__(self) -> None:
        self.index: dict[Key, int] = {}
        self.sums = np.zeros((0, 0), np.float64)   # (keys, d)
        self.counts = np.zeros(0, np.int64)          # (keys,)

    def _ids(self, labels: list[str], positions: np.ndarray, layers: np.ndarray) -> np.ndarray:
        ids = np.empty(len(labels), np.int64)
        for i, key in enumerate(zip(labels, positions.tolist(), layers.tolist())):
            j = self.index.get(key)
            if j is None:
                j = self.index[key] = len(self.index)
            ids[i] = j
        return ids

    def _grow(self, d: int) -> None:
        k = len(self.index)
        if self.sums.shape[0] and self.sums.shape[1] != d:
            raise AggregateError(f"vectors of width {d} mixed with width {self.sums.shape[1]} in one model's shards")
        if k > self.sums.shape[0]:
            extra = max(k - self.sums.shape[0], 64)
            self.sums = np.vstack([self.sums.reshape(-1, d), np.zeros((extra, d), np.float64)])
            self.counts = np.concatenate([self.counts, np.zeros(extra, np.int64)])

    def add(self, labels: list[str], positions: np.ndarray, layers: np.ndarray, vecs: np.ndarray,
            weights: np.ndarray) -> None:
        """vecs: (rows, d) float16/32/64 (a sum or one activation per row); weights: (rows,) counts."""
        ids = self._ids(labels, positions, layers)
        self._grow(vecs.shape[1])
        uniq = np.unique(ids)
        if len(uniq) == len(ids):   # sums rows: one row per key, add them all at once
            self.sums[ids] += vecs
        elif len(uniq) == 1:
            self.sums[uniq[0]] += vecs.sum(0, dtype=np.float64)                       # (d,)
        else:   # a mask per key: 8x faster than sort + reduceat here, each row copied once
            for j in uniq:
                self.sums[j] += vecs[ids == j].sum(0, dtype=np.float64)                # (d,)
        np.add.at(self.counts, ids, weights)

    def means(self) -> dict[Key, tuple[np.ndarray, int]]:
        """Key -> (mean (d,), n); a key with n == 0 (every prompt filtered) gets a NaN mean."""
        out = {}
        for k, j in self.index.items():
            n = int(self.counts[j])
            out[k] = (self.sums[j] / n if n else np.full(self.sums.shape[1], np.nan), n)
        return out


def _vectors(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list/fixed-size-list column -> (rows, d) numpy array without a Python loop."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    if n == 0:
        return np.zeros((0, 0), np.float64)
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    if flat.size % n:
        raise AggregateError("vectors of different widths in one batch; shards of different models were mixed")
    return flat.reshape(n, flat.size // n)


def _stream(store: Store, sql: str, params: dict, acc: _Accumulator, vec: str, weight: str | None,
            kept: dict[str, np.ndarray] | None = None) -> None:
    """DuckDB query -> Arrow batches -> accumulator (memory bounded by BATCH_ROWS, not by the data).

    kept: label -> prompt ids that count (rows of other prompts are dropped batch by batch; a SQL
    semi-join here made DuckDB buffer the whole scan: +60 MiB on 72 MB of shards).
    """
    con = store.duckdb_connect()
    try:
        for batch in con.sql(sql, params=params).to_arrow_reader(BATCH_ROWS):
            if kept is not None:
                batch = batch.filter(_kept_mask(batch, kept))
            if batch.num_rows == 0:
                continue
            w = batch.column(weight).to_numpy() if weight else np.ones(batch.num_rows, np.int64)
            acc.add(batch.column("label").to_pylist(), batch.column("position").to_numpy(),
                    batch.column("layer").to_numpy(), _vectors(batch.column(vec)), w)
    finally:
        con.close()


def _kept_mask(batch: pa.RecordBatch, kept: dict[str, np.ndarray]) -> np.ndarray:
    labels = np.asarray(batch.column("label").to_pylist(), dtype=object)       # (rows,)
    ids = batch.column("prompt_id").to_numpy()                                  # (rows,)
    mask = np.zeros(batch.num_rows, bool)
    for label, keep in kept.items():
        sel = labels == label
        mask[sel] = np.isin(ids[sel], keep)
    return mask


def _kept_ids(store: Store, prompts_files: list[str]) -> dict[str, np.ndarray]:
    """label -> prompt ids marked kept in the prompts shards (small: one row per prompt)."""
    con = store.duckdb_connect()
    try:
        rows = con.sql("SELECT label, list(prompt_id) FROM read_parquet($files) WHERE kept GROUP BY label",
                       params={"files": [store.path_for_duckdb(f) for f in prompts_files]}).fetchall()
    finally:
        con.close()
    return {label: np.asarray(ids, np.int64) for label, ids in rows}


_SCAN = ("SELECT label, prompt_id, position, layer, vector FROM read_parquet($files, hive_partitioning=false) "
         "WHERE split = $split")
_SUMS = 'SELECT label, position, layer, "sum", n FROM read_parquet($files, hive_partitioning=false) WHERE split = $split'


# ---------------------------------------------------------------- which shards count

def _markers(store: Store, run_id: str, model: str, split: str, markers: dict[str, dict] | None = None) -> dict[str, dict]:
    """Markers (path or stem -> content) of the done activation shards of one split: the planned jobs' markers
    when the caller passes them (the pipeline: each checked against its job), else every marker in the folder."""
    done = markers if markers is not None else store.done_jobs(layout.activation_markers_dir(run_id, model))
    out = {s: m for s, m in done.items() if m.get("split", s.rsplit("/", 1)[-1].split("-", 1)[0]) == split}
    if not out:
        raise AggregateError(
            f"no {split} activation shards marked done for model {model!r} in run {run_id!r} under "
            f"{store.url(layout.activation_markers_dir(run_id, model))}; run the extract stage first")
    return out


def _sums_files(store: Store, markers: dict[str, dict]) -> list[str]:
    files = [m.get("sums") for _, m in sorted(markers.items())]
    missing = [f for f in files if not f or not store.exists(f)]
    if missing:
        where = store.url(missing[0]) if missing[0] else "(the marker names none)"
        raise AggregateError(
            f"{len(missing)} marked shard(s) have no sums file (e.g. {where}); rerun their extraction "
            "jobs (delete their markers) or compute means with means_from_activations")
    return files


# ---------------------------------------------------------------- public entry points

def means_from_activations(store: Store, run_id: str, model: str, split: str = "train") -> dict[Key, tuple[np.ndarray, int]]:
    """Reference means straight from the done activation shards: {(label, pos, layer): (mean float64, n)}.

    Only kept prompts count (the marker's "prompts" shard has the paper's filter); shards whose marker
    names no prompts shard count every row.
    """
    markers = [m for _, m in sorted(_markers(store, run_id, model, split).items())]
    with_prompts = [m for m in markers if m.get("prompts")]
    without = [m for m in markers if not m.get("prompts")]
    duck = store.path_for_duckdb
    acc = _Accumulator()
    if with_prompts:
        kept = _kept_ids(store, [m["prompts"] for m in with_prompts])
        _stream(store, _SCAN, {"files": [duck(m["data"]) for m in with_prompts], "split": split}, acc, "vector",
                None, kept=kept)
    if without:
        _stream(store, _SCAN, {"files": [duck(m["data"]) for m in without], "split": split}, acc, "vector", None)
    return acc.means()


def sums_means(store: Store, run_id: str, model: str, split: str = "train",
               markers: dict[str, dict] | None = None) -> dict[Key, tuple[np.ndarray, int]]:
    """Means from the per-shard float64 sums of the done shards (the fast path)."""
    files = _sums_files(store, _markers(store, run_id, model, split, markers))
    acc = _Accumulator()
    _stream(store, _SUMS, {"files": [store.path_for_duckdb(f) for f in files], "split": split}, acc, "sum", "n")
    return acc.means()


def _label_count(means: dict[Key, tuple[np.ndarray, int]], label: str, where: str) -> int:
    ns = {n for (lab, _, _), (_, n) in means.items() if lab == label}
    if not ns or ns == {0}:
        raise AggregateError(f"no {label} prompts in the marked shards of {where}: every {label} prompt was filtered "
                             "out (see the prompts table: kept) or its extraction jobs have not run; use a model that "
                             "refuses, draw more prompts, or rerun extraction")
    if len(ns) > 1:
        raise AggregateError(f"{where}: {label} counts differ between (position, layer) keys {sorted(ns)[:5]}; "
                             "a shard is incomplete — verify markers (done_jobs(verify=True)) and rerun those jobs")
    return ns.pop()


def _means_table(run_id: str, model: str, split: str, means: dict[Key, tuple[np.ndarray, int]]) -> pa.Table:
    keys = sorted(means)
    d = len(means[keys[0]][0])
    vecs = np.stack([means[k][0] for k in keys])          # (keys, d)
    return pa.table({
        "run_id": [run_id] * len(keys), "model": [model] * len(keys), "split": [split] * len(keys),
        "label": [k[0] for k in keys], "position": [k[1] for k in keys], "layer": [k[2] for k in keys],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), d),
        "n": [means[k][1] for k in keys],
    }, schema=means_schema(d))


def _candidates_table(run_id: str, model: str, means: dict[Key, tuple[np.ndarray, int]], prune_norm: float,
                      where: str) -> pa.Table:
    pos_layer = sorted({(p, l) for (_, p, l) in means})
    missing = [pl for pl in pos_layer if ("harmful", *pl) not in means or ("harmless", *pl) not in means]
    if missing:
        raise AggregateError(f"{where}: (position, layer) keys {missing[:5]} exist for one label only; "
                             "shards of the two labels disagree — rerun extraction")
    diff = np.stack([means[("harmful", *pl)][0] - means[("harmless", *pl)][0] for pl in pos_layer])  # (pl, d)
    norms = np.linalg.norm(diff, axis=1)
    d = diff.shape[1]
    return pa.table({
        "run_id": [run_id] * len(pos_layer), "model": [model] * len(pos_layer),
        "position": [p for p, _ in pos_layer], "layer": [l for _, l in pos_layer],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(diff.ravel()), d),
        "norm": norms, "skipped": norms < prune_norm,
    }, schema=candidates_schema(d))


def aggregate_means(store: Store, run_id: str, model: str, split: str = "train", prune_norm: float = 1e-6,
                    markers: dict[str, dict] | None = None) -> dict:
    """Sums of the done shards -> means.parquet + candidates.parquet; returns counts for the receipt.

    `markers`: the planned extraction jobs' markers (see _markers); default every marker in the folder."""
    where = f"run {run_id!r} model {model!r} split {split!r}"
    means = sums_means(store, run_id, model, split, markers)
    stats = {"n_harmful": _label_count(means, "harmful", where), "n_harmless": _label_count(means, "harmless", where)}
    cand = _candidates_table(run_id, model, means, prune_norm, where)
    store.write_table(layout.means_table(run_id, model), _means_table(run_id, model, split, means),
                      table_name="means", run_id=run_id)
    store.write_table(layout.candidates_table(run_id, model), cand, table_name="candidates", run_id=run_id)
    skipped = int(np.sum(cand.column("skipped").to_numpy(zero_copy_only=False)))
    stats.update(n_candidates=cand.num_rows, n_skipped=skipped)
    logger.info("aggregated %s: %d harmful, %d harmless prompts, %d candidates (%d skipped)", where,
                stats["n_harmful"], stats["n_harmless"], cand.num_rows, skipped)
    return stats


# ---------------------------------------------------------------- the stage

def run_stage(mr) -> None:
    """The aggregate stage of one model (mr: flows/stages.ModelRun): extraction is done for this run's inputs
    and the sums and prompts shards it reads match their markers; then means + candidates, recorded in the
    stage manifest."""
    from refdir.flows.extract import check_filters, extract_markers
    from refdir.flows.stages import StageError

    if mr.stage_done("aggregate"):
        return
    mr.require("extract")
    markers = extract_markers(mr, "train")
    bad = mr.store.bad_files({rel: sha for m in markers.values() for rel, sha in mr.store.recorded_files(m).items()
                                if rel != m["data"]})   # sums and prompts shards (small); --verify reads the rest
    if bad:
        raise StageError(f"model {mr.key!r}: {len(bad)} extraction output(s) do not match their markers "
                         f"(e.g. {mr.store.url(bad[0])}); rerun with --verify to recompute them")
    check_filters(mr)
    with mr.store.recording() as files:
        counts = aggregate_means(mr.store, mr.run_id, mr.key, "train", mr.spec.selection.prune_norm,
                                 markers=markers)
    mr.mark("aggregate", 1, 1, files, **counts)

