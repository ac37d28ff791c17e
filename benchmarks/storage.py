"""Storage benchmark: bytes per activation value on disk, write and scan MB/s, local folder vs S3 on loopback.

    out = bench_storage(acts, workdir / "storage", n_shards=8, reps=3)    # acts: (n, L, P, d) real activations

- bytes/value: real activations (the extraction benchmark's shard) written with refdir's writer as
  float16 (zstd, no byte-stream-split: DuckDB 2.0.1 cannot read BSS float16) and float32 (BSS + zstd), plus
  float32 zstd without BSS (plain pyarrow) and Gaussian noise as references;
- write MB/s: `Store.write_table` of `n_shards` activation shards (Arrow -> Parquet encode + sha256 + the
  object write), and the transport alone (`Store.write_bytes` of the encoded bytes);
- scan MB/s: DuckDB `read_parquet` over those shards streamed as Arrow batches (what aggregation does),
  through `Store.duckdb_connect()` (on S3 the fsspec filesystem is registered with DuckDB).
MB/s count the raw float32 activation bytes (rows x d x 4) unless named `_disk_`. The S3 endpoint is
moto's ThreadedMotoServer on 127.0.0.1, started in its own process so it does not share this process's GIL.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

KEY, SECRET, BUCKET = "bench", "bench-secret", "refdir-bench"
_MOTO = ("import sys; from moto.server import ThreadedMotoServer; "
         "s = ThreadedMotoServer(ip_address='127.0.0.1', port=int(sys.argv[1]), verbose=False); s.start(); "
         "print('ready', flush=True); sys.stdin.read(); s.stop()")


@contextlib.contextmanager
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server on loopback in a child process, with one empty bucket; yields the endpoint URL."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", _MOTO, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the moto S3 server did not start")
        url = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=KEY,
                     aws_secret_access_key=SECRET).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _job(uri: str, n: int, index: int, d_type: str = "float32"):
    from refdir.schemas.jobs import ExtractJob, Prompt
    from refdir.schemas.spec import ModelSpec, StoreSpec

    return ExtractJob(run_id="bench-storage", model=ModelSpec(key="smollm2", path="smollm2"), store=StoreSpec(uri=uri),
                      split="train", label="harmful", index=index, activation_dtype=d_type,
                      prompts=[Prompt(prompt_id=index * n + i, instruction="x") for i in range(n)])


def bytes_per_value(acts: torch.Tensor, store) -> dict:
    """On-disk bytes per activation value for each encoding (real activations and Gaussian noise)."""
    import pyarrow.parquet as pq

    from refdir.workers.extract import activation_table

    n = acts.shape[0]
    values = acts.numel()
    noise = torch.from_numpy(np.random.default_rng(0).standard_normal(tuple(acts.shape), dtype=np.float32))
    out = {}
    for name, data in (("real", acts), ("gaussian", noise)):
        for dtype in ("float16", "float32"):
            rel = f"bpv/{name}-{dtype}.parquet"
            store.write_table(rel, activation_table(_job(store.uri, n, 0, dtype), data, dtype), table_name="activations",
                              run_id="bench-storage", row_group_size=n * acts.shape[2])
            key = f"{name}_{dtype}_" + ("zstd" if dtype == "float16" else "bss_zstd")
            out[key] = Path(store.url(rel)).stat().st_size / values
        plain = Path(store.url(f"bpv/{name}-plain.parquet"))
        table = activation_table(_job(store.uri, n, 0), data, "float32")
        pq.write_table(table, plain, compression="zstd", compression_level=1, row_group_size=n * acts.shape[2],
                       use_dictionary=[f.name for f in table.schema if f.name != "vector"])   # the store's, minus BSS
        out[f"{name}_float32_zstd_no_bss"] = plain.stat().st_size / values
    store.delete("bpv", recursive=True)
    return out


def _write_round(store, tables: list, encoded: list[bytes] | None) -> None:
    for i, t in enumerate(tables):
        if encoded is None:
            store.write_table(f"scan/part-{i:05d}.parquet", t, table_name="activations", run_id="bench-storage",
                              row_group_size=_rows_per_group(t))
        else:
            store.write_bytes(f"scan/raw-{i:05d}.parquet", encoded[i])


def _rows_per_group(table) -> int:
    import pyarrow.compute as pc

    return int(pc.max(pc.value_counts(table.column("layer")).field("counts")).as_py())


def _scan(store, files: list[str]) -> int:
    con = store.duckdb_connect()
    try:
        rel = con.sql("SELECT layer, position, vector FROM read_parquet($files)",
                      params={"files": [store.path_for_duckdb(f) for f in files]})
        return sum(batch.num_rows for batch in rel.to_arrow_reader(8192))
    finally:
        con.close()


def throughput(store, tables: list, raw_bytes: int, reps: int) -> dict:
    """Median write / transport / scan rates of one store over the same shards."""
    files = [f"scan/part-{i:05d}.parquet" for i in range(len(tables))]
    _write_round(store, tables, None)                     # warm-up + the files the scan reads
    encoded = [store.read_bytes(f) for f in files]
    disk = sum(len(b) for b in encoded)
    _scan(store, files)
    w, tr, sc = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        _write_round(store, tables, None)
        t1 = time.perf_counter()
        _write_round(store, tables, encoded)
        t2 = time.perf_counter()
        rows = _scan(store, files)
        t3 = time.perf_counter()
        w.append(t1 - t0), tr.append(t2 - t1), sc.append(t3 - t2)
    if rows != sum(t.num_rows for t in tables):
        raise RuntimeError(f"scan returned {rows} rows, wrote {sum(t.num_rows for t in tables)}")
    mb = raw_bytes / 1e6
    store.delete("scan", recursive=True)
    return {"write_mb_per_s": mb / statistics.median(w), "transport_mb_per_s": mb / statistics.median(tr),
            "transport_disk_mb_per_s": disk / 1e6 / statistics.median(tr), "scan_mb_per_s": mb / statistics.median(sc),
            "scan_disk_mb_per_s": disk / 1e6 / statistics.median(sc), "raw_mb": mb, "disk_mb": disk / 1e6,
            "rounds_s": {"write": w, "transport": tr, "scan": sc}}


def bench_storage(acts: torch.Tensor, workdir: Path, *, n_shards: int, reps: int) -> dict:
    from refdir.schemas.spec import StoreSpec
    from refdir.workers.extract import activation_table
    from refdir.workers.store import Store

    local = Store.open(str(workdir))
    n = acts.shape[0]
    tables = [activation_table(_job(local.uri, n, i), acts, "float32") for i in range(n_shards)]
    raw = n_shards * acts.numel() * 4
    out = {"bytes_per_value": bytes_per_value(acts, local), "activation_shape": list(acts.shape), "n_shards": n_shards,
           "local": throughput(local, tables, raw, reps)}
    with moto_endpoint() as url:
        s3 = Store.open(StoreSpec(uri=f"s3://{BUCKET}/store", endpoint_url=url, key=KEY, secret=SECRET))
        out["s3"] = throughput(s3, tables, raw, reps)
        out["s3_endpoint"] = "moto ThreadedMotoServer on 127.0.0.1 (own process)"
    for k in ("write_mb_per_s", "scan_mb_per_s", "transport_mb_per_s"):
        out[f"s3_vs_local_{k}"] = out["s3"][k] / out["local"][k]
    logger.info("storage: local write %.0f MB/s scan %.0f MB/s; s3 write %.0f MB/s scan %.0f MB/s",
                out["local"]["write_mb_per_s"], out["local"]["scan_mb_per_s"], out["s3"]["write_mb_per_s"],
                out["s3"]["scan_mb_per_s"])
    return out
