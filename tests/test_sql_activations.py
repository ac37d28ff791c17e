"""SQL over activation shards: the benchmark's queries agree with polars and pyarrow + numpy, a one-layer query
reads about one layer's bytes, the read-only reader returns the file's bytes from many threads, and float16
storage halves the bytes without changing the sums the means come from.

    .venv/bin/python -m pytest tests/test_sql_activations.py -q
"""

from __future__ import annotations

import os
import random
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks import sql as bench
from refdir.flows.sql import _read_only_fs, connect_views
from refdir.schemas import layout
from refdir.schemas.jobs import ExtractJob, Prompt
from refdir.schemas.spec import ExtractionSpec, ModelSpec, StoreSpec
from refdir.workers.extract import activation_table, run_extract
from refdir.workers.store import Store
from tests.fixtures.tiny import tiny_lm

SMALL = bench.SqlSizes(n_shards=4, prompts_per_shard=32, n_layers=10, n_pos=3, d=576)   # ~2 MB shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    store = Store.open(str(tmp_path_factory.mktemp("sqlacts") / "store"))
    bench.write_run(store, SMALL)
    return store


def test_three_queries_agree_with_polars_and_pyarrow(shards):
    """refdir sql's answers (DuckDB over the views) against two readers refdir does not own, plus numpy."""
    files, direction = bench.shard_files(shards), bench._direction(SMALL.d)
    assert len(files) == SMALL.n_shards
    sides = {"refdir": bench._refdir(shards, SMALL, direction), "polars": bench._polars(files, SMALL, direction),
             "pyarrow": bench._pyarrow(files, SMALL, direction)}
    diffs = bench.agreement(sides)
    assert all(v <= bench.TOL for d in diffs.values() for v in d.values()), diffs
    a = bench.as_answer("a", sides["refdir"]("a"))
    assert len(a) == 2 * SMALL.n_layers and all(v.shape == (SMALL.d,) for v in a.values())
    # harmful activations are shifted by +0.5 in the synthetic data: the means see it
    assert np.mean(a[("harmful", 3)]) - np.mean(a[("harmless", 3)]) == pytest.approx(0.5, abs=0.05)
    b = bench.as_answer("b", sides["refdir"]("b"))
    assert sum(n for _, n in b.values()) == SMALL.n_shards * SMALL.prompts_per_shard


def test_one_layer_query_reads_about_one_layer(shards):
    """Row groups hold one layer each: a layer filter skips the others (bytes counted under DuckDB's reads)."""
    files = bench.shard_files(shards)
    total = sum(os.path.getsize(f) for f in files)
    out = bench.layer_bytes(shards.uri, SMALL, bench._direction(SMALL.d), total)
    assert 0 < out["fraction"] <= 1.5 / SMALL.n_layers, out
    groups = pq.ParquetFile(files[0]).metadata
    assert groups.num_row_groups == SMALL.n_layers


def test_read_only_reader_serves_many_threads(tmp_path):
    """Positional reads from 8 threads on one handle return exactly the file's bytes at each offset."""
    store = Store.open(str(tmp_path / "s"))
    data = os.urandom(1 << 20)
    store.write_bytes("blob.bin", data)
    fs = _read_only_fs(store)
    f = fs.open(store.url("blob.bin"), "rb")
    assert f.seek(0, 2) == len(data)
    errors = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(200):
            off, n = rng.randrange(len(data)), rng.randrange(1, 70_000)
            f.seek(off)
            got = f.read(n)
            if got != data[off: off + n] or f.tell() != off + len(got):
                errors.append((off, n))
    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    f.seek(len(data) - 10)
    assert f.read() == data[-10:]
    with pytest.raises(PermissionError):
        fs.open(store.url("blob.bin"), "wb")


def _job(store: Store, dtype: str) -> ExtractJob:
    prompts = [Prompt(prompt_id=i, instruction=f"Tell me about topic number {i}.") for i in range(24)]
    return ExtractJob(run_id="f16", model=ModelSpec(key="tiny", path="tiny"), store=StoreSpec(uri=store.uri),
                      split="train", label="harmful", index=0, prompts=prompts, activation_dtype=dtype,
                      filter_prompts=False, batch_size=8)


def test_float16_is_the_default_and_halves_bytes_with_the_same_sums(tmp_path):
    assert ExtractionSpec().activation_dtype == "float16"
    lm = tiny_lm("llama3")
    out = {}
    for dtype in ("float32", "float16"):
        store = Store.open(str(tmp_path / dtype))
        run_extract(lm, store, _job(store, dtype))
        acts = pq.read_table(store.url(layout.activation_shard("f16", "tiny", "train", "harmful", 0)))
        sums = pq.read_table(store.url(layout.sums_shard("f16", "tiny", "train", "harmful", 0)))
        con = connect_views(store)
        duck = np.array(con.sql("SELECT vector FROM activations").fetchnumpy()["vector"].tolist(), np.float64)
        con.close()
        meta = pq.ParquetFile(store.url(layout.activation_shard("f16", "tiny", "train", "harmful", 0))).metadata
        vector_bytes = sum(meta.row_group(g).column(meta.num_columns - 1).total_compressed_size
                           for g in range(meta.num_row_groups))
        out[dtype] = (acts, sums, duck, vector_bytes)
    a32, s32, d32, b32 = out["float32"]
    a16, s16, d16, b16 = out["float16"]
    assert s16.equals(s32), "the float64 sums (what the means come from) do not depend on the stored dtype"
    assert str(a16.schema.field("vector").type.value_type) == "halffloat"
    v32 = np.stack(a32.column("vector").to_numpy(zero_copy_only=False))
    v16 = np.stack(a16.column("vector").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(v16, v32.astype(np.float16))     # numpy's own rounding of the float32 values
    np.testing.assert_array_equal(d16, v32.astype(np.float16).astype(np.float64))   # DuckDB reads float16 as is
    assert d32.shape == d16.shape
    # the vector column's stored bytes (the tiny model's file is mostly footer): about half
    assert b16 < 0.6 * b32, (b16, b32)


def test_float16_overflow_falls_back_to_float32(caplog):
    store_spec = StoreSpec(uri="unused")
    job = ExtractJob(run_id="r", model=ModelSpec(key="m", path="m"), store=store_spec, split="train",
                     label="harmless", index=0, prompts=[Prompt(prompt_id=0, instruction="x")])
    acts = torch.zeros(1, 2, 1, 4)
    acts[0, 1, 0, 2] = 1e5                       # beyond float16's largest finite value (65504)
    t = activation_table(job, acts, "float16")
    assert str(t.schema.field("vector").type.value_type) == "float"
    assert "beyond float16" in caplog.text
    assert str(activation_table(job, acts / 10, "float16").schema.field("vector").type.value_type) == "halffloat"
