"""Aggregation tests: uneven synthetic shards written the way extraction writes them, on local and S3.

`write_job` is the fake extraction output (activation shard + float64 sums shard + marker) that the SQL
tests reuse. Means from the sums path and from the activation path must equal a numpy float64 reference
to 1e-6 relative; candidates are harmful - harmless; layer-0 (identical) candidates are skipped; shards
without a marker, and other splits, do not count; memory does not grow with the number of shards.

    .venv/bin/python -m pytest tests/test_aggregate.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from refdir.flows.aggregate import AggregateError, aggregate_means, means_from_activations
from refdir.schemas import layout
from refdir.schemas.tables import activations_schema, prompts_schema, sums_schema
from refdir.workers.store import Store

RUN = "demo-0123abcd"


def write_job(store: Store, run_id: str, model: str, split: str, label: str, job: int, acts: np.ndarray,
              *, kept: np.ndarray | None = None, marker: bool = True, dtype: str = "float32") -> None:
    """acts: (prompts, layers, positions, d), kept: (prompts,) bool. Like workers.extract: activation shard
    (every prompt), sums over kept prompts, prompts shard with the kept flag, then the marker."""
    n_p, n_l, n_pos, d = acts.shape
    kept = np.ones(n_p, bool) if kept is None else kept
    ids = [1000 * job + p for p in range(n_p)]
    keys = [(p, l, q) for l in range(n_l) for p in range(n_p) for q in range(n_pos)]   # layer-major
    vec = np.stack([acts[p, l, q] for p, l, q in keys]).astype(dtype)                  # (rows, d)
    n = len(keys)
    table = pa.table({
        "run_id": [run_id] * n, "model": [model] * n, "split": [split] * n, "label": [label] * n,
        "prompt_id": [ids[k[0]] for k in keys], "category": [""] * n,
        "position": [k[2] - n_pos for k in keys], "layer": [k[1] for k in keys],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), d),
    }, schema=activations_schema(d, dtype))
    sums = acts[kept].astype(dtype).astype(np.float64).sum(0)                             # (layers, positions, d)
    sk = [(l, q) for l in range(n_l) for q in range(n_pos)]
    sums_t = pa.table({
        "run_id": [run_id] * len(sk), "model": [model] * len(sk), "split": [split] * len(sk),
        "label": [label] * len(sk), "position": [q - n_pos for _, q in sk], "layer": [l for l, _ in sk],
        "sum": pa.FixedSizeListArray.from_arrays(pa.array(np.stack([sums[l, q] for l, q in sk]).ravel()), d),
        "n": [int(kept.sum())] * len(sk),
    }, schema=sums_schema(d))
    prompts_t = pa.table({
        "run_id": [run_id] * n_p, "model": [model] * n_p, "split": [split] * n_p, "label": [label] * n_p,
        "prompt_id": ids, "instruction": [f"how do i do thing {i}" for i in ids], "category": [""] * n_p,
        "refusal_score": np.where(kept == (label == "harmful"), 1.0, -1.0), "kept": kept,
    }, schema=prompts_schema())
    sums_rel = layout.sums_shard(run_id, model, split, label, job)
    prompts_rel = layout.prompts_shard(run_id, model, split, label, job)
    store.write_table(sums_rel, sums_t, table_name="sums", run_id=run_id)
    store.write_table(prompts_rel, prompts_t, table_name="prompts", run_id=run_id)
    data_rel = layout.activation_shard(run_id, model, split, label, job)
    if not marker:                               # a writer that died before its marker
        store.write_table(data_rel, table, table_name="activations", run_id=run_id)
        return
    store.commit(data_rel, table, layout.activation_marker(run_id, model, split, label, job),
                 table_name="activations", run_id=run_id, job_id=f"extract/{split}-{label}-{job:05d}",
                 sums=sums_rel, prompts=prompts_rel, n_prompts=n_p, n_kept=int(kept.sum()))


def make_acts(rng, n_prompts: int, shift: float, n_layers: int = 3, n_pos: int = 2, d: int = 8) -> np.ndarray:
    """Random activations; layer 0 is the same constant for every prompt and label (diff exactly 0)."""
    a = rng.standard_normal((n_prompts, n_layers, n_pos, d)) * 3 + 50 + shift
    a[:, 0] = 0.75
    return a


def build_store(store: Store, model: str = "org", seed: int = 0, d: int = 8, dtype: str = "float32",
                run_id: str = RUN) -> dict:
    """Uneven train shards per label (some prompts filtered, one shard fully), an unmarked shard and val
    shards; returns the float64 reference means over kept train prompts, (layers, positions, d) per label."""
    rng = np.random.default_rng(seed)
    jobs = {("harmful", 0): [1, 1, 0, 1, 1, 1], ("harmful", 1): [1, 1, 1], ("harmful", 2): [0],
            ("harmless", 3): [1, 0, 1, 1, 1], ("harmless", 4): [1, 1]}     # kept: 8 harmful, 6 harmless
    kept_acts: dict[str, list[np.ndarray]] = {"harmful": [], "harmless": []}
    for (label, job), flags in jobs.items():
        kept = np.array(flags, bool)
        acts = make_acts(rng, len(flags), 2.0 if label == "harmful" else -1.0, d=d)
        acts[~kept] += 1000.0                     # filtered prompts would move the means a lot
        write_job(store, run_id, model, "train", label, job, acts, kept=kept, dtype=dtype)
        kept_acts[label].append(acts[kept].astype(dtype).astype(np.float64))
    write_job(store, run_id, model, "train", "harmful", 9, make_acts(rng, 6, 40.0, d=d), marker=False, dtype=dtype)
    for label, job in (("harmful", 20), ("harmless", 21)):
        write_job(store, run_id, model, "val", label, job, make_acts(rng, 2, 99.0, d=d), dtype=dtype)
    return {label: np.concatenate(v).mean(0) for label, v in kept_acts.items()}


def test_means_and_candidates_match_numpy(any_store_uri):
    store = Store.open(any_store_uri)
    ref = build_store(store)
    stats = aggregate_means(store, RUN, "org")
    assert stats == {"n_harmful": 8, "n_harmless": 6, "n_candidates": 3 * 2, "n_skipped": 2}

    means = store.read_table(layout.means_table(RUN, "org")).to_pylist()
    assert len(means) == 2 * 3 * 2
    for row in means:
        want = ref[row["label"]][row["layer"], row["position"] + 2]
        np.testing.assert_allclose(row["vector"], want, rtol=1e-6)
        assert row["n"] == (8 if row["label"] == "harmful" else 6) and row["split"] == "train"

    cands = store.read_table(layout.candidates_table(RUN, "org")).to_pylist()
    for row in cands:
        want = ref["harmful"][row["layer"], row["position"] + 2] - ref["harmless"][row["layer"], row["position"] + 2]
        np.testing.assert_allclose(row["vector"], want, rtol=1e-6, atol=1e-9)
        assert row["skipped"] == (row["layer"] == 0) and np.isclose(row["norm"], np.linalg.norm(want))
        if row["layer"] == 0:
            assert row["norm"] == 0.0

    slow = means_from_activations(store, RUN, "org")
    assert len(slow) == 12
    for (label, pos, layer), (vec, n) in slow.items():
        np.testing.assert_allclose(vec, ref[label][layer, pos + 2], rtol=1e-6)
        assert n == (8 if label == "harmful" else 6)


def test_float16_activations_and_val_split(tmp_path):
    store = Store.open(str(tmp_path / "s"))
    ref = build_store(store, dtype="float16", d=6)
    slow = means_from_activations(store, RUN, "org")
    for (label, pos, layer), (vec, _) in slow.items():
        np.testing.assert_allclose(vec, ref[label][layer, pos + 2], rtol=1e-6)
    val = means_from_activations(store, RUN, "org", split="val")
    assert {n for _, n in val.values()} == {2}
    assert aggregate_means(store, RUN, "org", split="val")["n_candidates"] == 6


def test_clear_errors(tmp_path):
    store = Store.open(str(tmp_path / "s"))
    with pytest.raises(AggregateError, match="no train activation shards marked done.*run the extract stage"):
        aggregate_means(store, RUN, "org")
    rng = np.random.default_rng(1)
    write_job(store, RUN, "org", "train", "harmful", 0, make_acts(rng, 2, 0.0))
    with pytest.raises(AggregateError, match="no harmless prompts"):
        aggregate_means(store, RUN, "org")
    write_job(store, RUN, "org", "train", "harmless", 2, make_acts(rng, 2, 0.0), kept=np.zeros(2, bool))
    with pytest.raises(AggregateError, match="every harmless prompt was filtered"):
        aggregate_means(store, RUN, "org")
    store.delete(layout.activation_marker(RUN, "org", "train", "harmless", 2))
    write_job(store, RUN, "org", "train", "harmless", 1, make_acts(rng, 2, 0.0))
    store.delete(layout.sums_shard(RUN, "org", "train", "harmless", 1))
    with pytest.raises(AggregateError, match="no sums file"):
        aggregate_means(store, RUN, "org")


_PEAK = """
import sys
from refdir.flows.aggregate import means_from_activations
from refdir.workers.store import Store
def kib(key): return int(open("/proc/self/status").read().split(key + ":")[1].split()[0])
store = Store.open(sys.argv[1]); store.duckdb_connect().sql("SELECT 1").fetchall()
open("/proc/self/clear_refs", "w").write("5")   # reset the peak-RSS mark after the imports
base = kib("VmRSS")
means_from_activations(store, "%s", sys.argv[2])
print((kib("VmHWM") - base) // 1024)
""" % RUN


def peak_mib(store: Store, model: str) -> int:
    """Peak RSS growth (MiB) of a fresh process while it computes one model's means."""
    out = subprocess.run([sys.executable, "-c", _PEAK, store.uri, model], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(out.stdout.split()[-1])


def write_many(store: Store, model: str, n_shards: int, rng) -> None:
    for job in range(n_shards):
        label = "harmful" if job % 2 else "harmless"
        write_job(store, RUN, model, "train", label, job, make_acts(rng, 48, 0.0, n_layers=8, n_pos=4, d=1024))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_memory_does_not_grow_with_shards(tmp_path):
    """12 shards (~72 MB of float32) must not need more peak memory than 3 (~18 MB): the scan streams.

    Measured here: streaming +75/+78 MiB (small/big); loading the scan as one Arrow table +41/+100 MiB.
    """
    store = Store.open(str(tmp_path / "s"))
    rng = np.random.default_rng(2)
    write_many(store, "small", 3, rng)
    write_many(store, "big", 12, rng)
    small, big = peak_mib(store, "small"), peak_mib(store, "big")
    assert big - small < 25, (small, big)       # holding every row adds ~60 MiB
