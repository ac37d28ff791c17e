"""Store tests on a real local folder and a real S3 endpoint (moto server on loopback).

Covers: bytes/JSON/glob/delete, the commit protocol (data then marker), a writer that dies between data
and marker, corrupt shards, Parquet encoding (zstd, byte-stream-split, row group per layer, metadata),
schema-version rejection, atomic local writes, and clear StoreErrors for bad stores.

    .venv/bin/python -m pytest tests/test_store.py -q
"""

from __future__ import annotations

import logging
import os
import socket
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refdir.schemas import layout
from refdir.schemas.spec import StoreSpec
from refdir.schemas.tables import SchemaVersionError, activations_schema
from refdir.workers.store import Store, StoreError

RUN, MODEL = "demo-0123abcd", "org"


def act_table(n_prompts: int, n_layers: int = 3, n_pos: int = 2, d: int = 8, dtype: str = "float32",
              seed: int = 0, layer_major: bool = True) -> pa.Table:
    """A synthetic activations table, one row per (prompt, layer, position)."""
    rng = np.random.default_rng(seed)
    if layer_major:
        keys = [(p, l, q) for l in range(n_layers) for p in range(n_prompts) for q in range(-n_pos, 0)]
    else:
        keys = [(p, l, q) for p in range(n_prompts) for l in range(n_layers) for q in range(-n_pos, 0)]
    vec = rng.standard_normal((len(keys), d)).astype(dtype)
    n = len(keys)
    return pa.table({
        "run_id": [RUN] * n, "model": [MODEL] * n, "split": ["train"] * n, "label": ["harmful"] * n,
        "prompt_id": [k[0] for k in keys], "category": [""] * n, "position": [k[2] for k in keys],
        "layer": [k[1] for k in keys], "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), d),
    }, schema=activations_schema(d, dtype))


def _shard(job: int) -> tuple[str, str]:
    return (layout.activation_shard(RUN, MODEL, "train", "harmful", job),
            layout.activation_marker(RUN, MODEL, "train", "harmful", job))


def test_bytes_json_glob_delete(any_store_uri):
    store = Store.open(any_store_uri)
    store.check_writable()
    store.write_bytes("a/b/c.bin", b"\x00\x01")
    store.write_json("a/b/d.json", {"x": [1, 2]})
    assert store.read_bytes("a/b/c.bin") == b"\x00\x01"
    assert store.read_json("a/b/d.json") == {"x": [1, 2]}
    assert store.exists("a/b/c.bin") and not store.exists("a/b/nope")
    assert store.glob("a/*/*.json") == ["a/b/d.json"]
    assert store.glob("a/*.json") == []          # '*' does not cross '/'
    assert store.list_files("a") == ["a/b/c.bin", "a/b/d.json"]
    store.delete("a/b/c.bin")
    store.delete("a/b/c.bin")                    # idempotent
    assert not store.exists("a/b/c.bin")
    store.delete("a", recursive=True)
    assert store.list_files("a") == []
    with pytest.raises(FileNotFoundError):
        store.read_bytes("a/b/d.json")
    assert store.url("x/y") .endswith("/x/y") and store.uri in store.url("x/y")
    with pytest.raises(ValueError):
        store.url("../escape")


def test_commit_dead_writer_and_corruption(any_store_uri, caplog):
    store = Store.open(any_store_uri)
    receipts = {}
    for job in (0, 1, 2):
        data, marker = _shard(job)
        receipts[job] = store.commit(data, act_table(2 + job, seed=job), marker, table_name="activations",
                                     run_id=RUN, job_id=f"extract/train-harmful-{job:05d}", split="train")
    data3, _ = _shard(3)                          # a writer that died between data and marker
    store.write_table(data3, act_table(5, seed=3), table_name="activations", run_id=RUN)

    markers_dir = layout.activation_markers_dir(RUN, MODEL)
    done = store.done_jobs(markers_dir)
    assert sorted(done) == ["train-harmful-00000", "train-harmful-00001", "train-harmful-00002"]
    m1 = done["train-harmful-00001"]
    assert m1["rows"] == 3 * 3 * 2 == receipts[1].rows and m1["data"] == _shard(1)[0] and m1["split"] == "train"
    assert m1["sha256"] == receipts[1].sha256 and receipts[1].uri == store.url(_shard(1)[0])
    assert store.marker(_shard(3)[1]) is None and not store.verify(_shard(3)[1])
    assert all(store.verify(_shard(j)[1]) for j in (0, 1, 2))

    # corrupt one shard's bytes: verify fails, done_jobs(verify=True) drops it and says so
    raw = bytearray(store.read_bytes(_shard(1)[0]))
    raw[len(raw) // 2] ^= 0xFF
    store.write_bytes(_shard(1)[0], bytes(raw))
    store.delete(_shard(2)[0])                   # and one whose data vanished
    with caplog.at_level(logging.WARNING, logger="refdir.workers.store"):
        assert not store.verify(_shard(1)[1])
        kept = store.done_jobs(markers_dir, verify=True)
    assert sorted(kept) == ["train-harmful-00000"]
    assert "corrupt shard" in caplog.text and "part-00001" in caplog.text
    assert len(store.done_jobs(markers_dir)) == 3   # without verify the markers still list


def test_parquet_encoding_and_metadata(any_store_uri):
    store = Store.open(any_store_uri)
    for dtype in ("float32", "float16"):
        rel = f"t/{dtype}.parquet"
        rows, sha = store.write_table(rel, act_table(4, n_layers=3, dtype=dtype, layer_major=False),
                                      table_name="activations", run_id=RUN)
        assert rows == 4 * 3 * 2 and len(sha) == 64
        md = pq.ParquetFile(pa.BufferReader(store.read_bytes(rel))).metadata
        assert md.num_row_groups == 3                                    # one row group per layer
        leaf = [md.row_group(0).column(i) for i in range(md.num_columns)][-1]
        assert leaf.path_in_schema == "vector.list.element" and leaf.compression == "ZSTD"
        assert ("BYTE_STREAM_SPLIT" in leaf.encodings) == (dtype == "float32")
        t = store.read_table(rel)
        assert t.column("layer").to_pylist() == sorted(t.column("layer").to_pylist())   # sorted layer-major
        assert t.schema.metadata[b"refdir.run_id"] == RUN.encode()
        assert t.schema.metadata[b"refdir.table"] == b"activations"
        con = store.duckdb_connect()                                     # DuckDB reads both dtypes
        n = con.sql(f"SELECT count(*) FROM read_parquet('{store.path_for_duckdb(rel)}') WHERE layer = 1").fetchall()
        assert n == [(8,)]
        con.close()
    with pytest.raises(ValueError, match="missing columns"):
        store.write_table("t/bad.parquet", act_table(1).drop_columns(["category"]), table_name="activations",
                          run_id=RUN)


def test_schema_version_rejected(any_store_uri):
    store = Store.open(any_store_uri)
    t = act_table(1)
    t = t.replace_schema_metadata({b"refdir.schema_version": b"999", b"refdir.table": b"activations"})
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink)
    store.write_bytes("t/future.parquet", sink.getvalue().to_pybytes())
    with pytest.raises(SchemaVersionError, match=r"version 999.*reads version 1"):
        store.read_table("t/future.parquet")
    pq.write_table(act_table(1).replace_schema_metadata(None), sink := pa.BufferOutputStream())
    store.write_bytes("t/foreign.parquet", sink.getvalue().to_pybytes())
    with pytest.raises(SchemaVersionError, match="not a refdir file"):
        store.read_table("t/foreign.parquet")


def test_atomic_local_write(tmp_path):
    store = Store.open(str(tmp_path / "s"))
    store.write_bytes("x/f.bin", b"old" * 1000)
    with open(tmp_path / "s" / "x" / "f.bin", "rb") as reader:   # a reader holding the old object
        store.write_bytes("x/f.bin", b"new" * 2000)
        assert reader.read() == b"old" * 1000                    # replaced, never rewritten in place
    assert store.read_bytes("x/f.bin") == b"new" * 2000
    with pytest.raises(TypeError):                                # a writer failing mid-write
        store.write_bytes("x/f.bin", object())
    assert store.read_bytes("x/f.bin") == b"new" * 2000           # old content intact
    assert os.listdir(tmp_path / "s" / "x") == ["f.bin"]          # no temp file left behind


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_local_stores(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreError, match="is a file, not a folder"):
        Store.open(str(tmp_path / "afile"))
    with pytest.raises(StoreError, match="does not exist"):
        Store.open(str(tmp_path / "missing"), create=False)
    assert Store.open(f"file://{tmp_path}/made").uri == str(tmp_path / "made")
    with pytest.raises(StoreError, match="unsupported scheme"):
        Store.open("gs://bucket/x")


@pytest.mark.s3
def test_bad_s3_stores(s3_server, s3_store_uri):
    bucket_uri = s3_store_uri
    ok = Store.open(bucket_uri)                                   # env credentials from the fixture
    ok.check_writable()
    secret = "definitely-wrong-secret"
    spec = StoreSpec(uri=bucket_uri, endpoint_url=s3_server.endpoint_url, key=s3_server.key, secret=secret)
    with pytest.raises(StoreError, match="refused the credentials") as e:
        Store.open(spec)
    assert secret not in str(e.value)
    with pytest.raises(StoreError, match="refused the credentials"):
        Store.open(StoreSpec(uri=bucket_uri, endpoint_url=s3_server.endpoint_url, key="AKIANOTAKEY000000000",
                             secret=s3_server.secret))
    with pytest.raises(StoreError, match=r"bucket 'refdir-no-such-bucket' does not exist"):
        Store.open("s3://refdir-no-such-bucket/x")
    t0 = time.perf_counter()
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(StoreError, match="cannot reach the S3 endpoint") as e:
        Store.open(StoreSpec(uri=bucket_uri, endpoint_url=url))
    assert url in str(e.value) and time.perf_counter() - t0 < 15
    good = Store.open(StoreSpec(uri=bucket_uri, endpoint_url=s3_server.endpoint_url, key=s3_server.key,
                                secret=s3_server.secret))
    assert s3_server.secret not in repr(good) and repr(good) == f"Store({bucket_uri!r})"
