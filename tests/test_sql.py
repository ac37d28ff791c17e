"""SQL view tests: a store with two runs x two models (different widths), on local and S3.

Views span every run and model; shard tables count only marked shards; table/csv/json output;
DuckDB errors become SqlError with DuckDB's text; a table with no data names itself; the REPL works.

    .venv/bin/python -m pytest tests/test_sql.py -q
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone
from typing import Iterator

import pyarrow as pa
import pytest

from refdir.flows.aggregate import aggregate_means
from refdir.flows.sql import SqlError, connect_views, interactive, marker_for, run_sql, view_files
from refdir.schemas import layout
from refdir.schemas.tables import runs_schema
from refdir.workers.store import Store
from tests.fixtures.s3 import drop_bucket, new_bucket
from tests.test_aggregate import build_store

RUNS = ("alpha-00000001", "beta-00000002")
MODELS = {"org-a": 8, "org-b": 12}          # model -> d_model
ROWS_PER_MODEL = (6 + 3 + 1 + 5 + 2 + 2 + 2) * 3 * 2   # marked prompts x layers x positions (see build_store)


def _model_row(store: Store, run_id: str, model: str, d: int) -> None:
    t = pa.table({"run_id": [run_id], "model": [model], "model_path": [f"/m/{model}"], "family": ["llama"],
                  "n_layers": [3], "d_model": [d], "eoi_tokens": [["<|end|>", "<|assistant|>"]],
                  "refusal_token_ids": [[7]], "spec_hash": ["abc"],
                  "created_at": [datetime(2026, 1, 1, tzinfo=timezone.utc)]}, schema=runs_schema())
    store.write_table(layout.model_row(run_id, model), t, table_name="runs", run_id=run_id)


@pytest.fixture(scope="module", params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def full_store(request, tmp_path_factory) -> Iterator[Store]:
    """Built once per backend; tests only read it."""
    bucket = None
    if request.param == "s3":
        ep = request.getfixturevalue("s3_server")
        bucket = new_bucket(ep)
        uri = f"s3://{bucket}/store"
    else:
        uri = str(tmp_path_factory.mktemp("sql") / "store")
    store = Store.open(uri)
    for i, run_id in enumerate(RUNS):
        for j, (model, d) in enumerate(MODELS.items()):
            build_store(store, model=model, seed=10 * i + j, d=d, run_id=run_id)
            aggregate_means(store, run_id, model)
            _model_row(store, run_id, model, d)
    yield store
    if bucket:
        drop_bucket(ep, bucket)


def test_views_over_all_runs_and_models(full_store):
    store = full_store
    assert run_sql(store, "SELECT count(*) AS n FROM activations", fmt="json") == json.dumps(
        [{"n": 4 * ROWS_PER_MODEL}])                        # the unmarked shards do not count
    per = json.loads(run_sql(store, "SELECT run_id, model, count(*) AS n, max(len(vector)) AS d FROM activations "
                                    "GROUP BY ALL ORDER BY ALL", fmt="json"))
    assert [(r["run_id"], r["model"], r["n"], r["d"]) for r in per] == [
        (r, m, ROWS_PER_MODEL, d) for r in RUNS for m, d in MODELS.items()]
    sums = json.loads(run_sql(store, "SELECT sum(n) AS n FROM sums WHERE split = 'train' AND layer = 0 "
                                     "AND position = -1", fmt="json"))
    assert sums == [{"n": 4 * (8 + 6)}]                     # kept prompts of marked shards only
    cand = json.loads(run_sql(store, "SELECT count(*) AS n, count(*) FILTER (skipped) AS s FROM candidates", "json"))
    assert cand == [{"n": 4 * 6, "s": 4 * 2}]
    assert "llama" in run_sql(store, "SELECT family FROM runs")
    kept = json.loads(run_sql(store, "SELECT count(*) FILTER (kept) AS k, count(*) AS n FROM prompts", "json"))
    assert kept == [{"k": 4 * (8 + 6 + 4), "n": 4 * (ROWS_PER_MODEL // 6)}]   # unmarked job's prompts hidden
    con = connect_views(store)
    assert con.sql("SELECT count(DISTINCT run_id) FROM means").fetchall() == [(2,)]
    con.close()


def test_formats(full_store):
    q = "SELECT model, layer, position, n, vector FROM means WHERE run_id = 'alpha-00000001' AND label = 'harmful' " \
        "ORDER BY model, layer, position"
    rows = list(csv.reader(io.StringIO(run_sql(full_store, q, fmt="csv"))))
    assert rows[0] == ["model", "layer", "position", "n", "vector"] and len(rows) == 1 + 2 * 6
    assert len(json.loads(rows[1][4])) == 8 and rows[1][3] == "8"
    js = json.loads(run_sql(full_store, q, fmt="json"))
    assert len(js) == 12 and len(js[-1]["vector"]) == 12 and js[0]["n"] == 8
    table = run_sql(full_store, q, fmt="table")
    lines = table.splitlines()
    assert lines[0].split(" | ")[0].strip() == "model" and "(8)" in lines[2] and lines[-1] == "(12 rows)"
    with pytest.raises(SqlError, match="unknown format"):
        run_sql(full_store, q, fmt="xml")


def test_errors(full_store):
    with pytest.raises(SqlError, match="(?i)syntax error") as e:
        run_sql(full_store, "SELEC count(*) FROM activations")
    assert "Traceback" not in str(e.value) and e.value.__cause__ is None
    with pytest.raises(SqlError, match=r"no scores stored yet in .* run the select stage"):
        run_sql(full_store, "SELECT * FROM scores")
    with pytest.raises(SqlError, match="(?i)column"):
        run_sql(full_store, "SELECT no_such_column FROM means")


def test_empty_store_and_repl(tmp_path):
    store = Store.open(str(tmp_path / "empty"))
    assert view_files(store) == {}
    with pytest.raises(SqlError, match=f"no activations stored yet in {store.uri}"):
        run_sql(store, "SELECT count(*) FROM activations")
    build_store(store, model="org")
    lines = iter([".tables", "SELECT count(*) AS n", "FROM activations;", "SELEC 1;", ".format json",
                  "SELECT 1 AS x;", ".quit", "SELECT 2;"])
    out = io.StringIO()
    interactive(store, input_fn=lambda _prompt: next(lines), out=out)
    text = out.getvalue()
    assert "activations\nprompts\nsums\n" in text and "means" not in text      # only tables with data
    assert str(ROWS_PER_MODEL) in text and "Error:" in text and '[{"x": 1}]' in text and "2" not in text.split('[{"x": 1}]')[1]


def test_marker_mapping_matches_layout():
    r, m = "run-1", "mod"
    assert marker_for("activations", layout.activation_shard(r, m, "val", "harmless", 7)) == \
        layout.activation_marker(r, m, "val", "harmless", 7)
    assert marker_for("sums", layout.sums_shard(r, m, "train", "harmful", 3)) == \
        layout.activation_marker(r, m, "train", "harmful", 3)
    assert marker_for("scores", layout.score_shard(r, m, 12)) == layout.score_marker(r, m, 12)
    assert marker_for("completions", layout.completion_shard(r, m, "jbb", "ablation", 2)) == \
        layout.completion_marker(r, m, "jbb", "ablation", 2)
    assert marker_for("prompts", layout.prompts_shard(r, m, "val", "harmful", 5)) == \
        layout.activation_marker(r, m, "val", "harmful", 5)
    assert marker_for("means", layout.means_table(r, m)) is None
    assert marker_for("scores", layout.scores_table(r, m)) is None


# ---------------------------------------------------------------- read-only and bad files

def _snapshot(store: Store) -> dict[str, str]:
    import hashlib

    return {rel: hashlib.sha256(store.read_bytes(rel)).hexdigest() for rel in store.list_files("")}


WRITES = {
    "COPY": "COPY (SELECT 1 AS v, 'x' AS model) TO '{root}/runs' (FORMAT parquet, PARTITION_BY (model), OVERWRITE)",
    "COPY ": "COPY (SELECT 1 AS v) TO '{means}' (FORMAT parquet)",
    "ATTACH": "ATTACH '{root}/evil.duckdb' AS evil",
    "INSTALL": "INSTALL httpfs",
    "CREATE": "CREATE TABLE t AS SELECT * FROM means",
    "EXPORT": "EXPORT DATABASE '{root}/dump'",
    "SET": "SET enable_external_access = true",
    "EXPLAIN": "EXPLAIN ANALYZE COPY (SELECT 1) TO '{root}/x.csv'",
}


def test_read_only_refuses_writes(full_store, caplog):
    store = full_store
    before = _snapshot(store)
    root = store.uri
    means = store.url(layout.means_table(RUNS[0], "org-a"))
    for word, q in WRITES.items():
        with pytest.raises(SqlError) as e:
            run_sql(store, "SELECT 1; " + q.format(root=root, means=means))
        msg = str(e.value)
        assert msg.startswith(f"refdir sql is read-only: {word.strip()} is not allowed") and "\n" not in msg, msg
    assert _snapshot(store) == before                     # not one byte of the store changed
    # reads and temp objects still work; the refusal comes before any statement of a script runs
    assert json.loads(run_sql(store, "CREATE TEMP TABLE t AS SELECT 1 AS x; SELECT x + 1 AS y FROM t", "json")) == [{"y": 2}]
    assert "physical_plan" in run_sql(store, "EXPLAIN SELECT count(*) FROM means")


def test_connection_itself_is_locked(full_store):
    """Even a statement that skipped the check cannot write: DuckDB's own settings and a read-only store."""
    store = full_store
    before = _snapshot(store)
    con = connect_views(store)
    try:
        target = store.url(layout.means_table(RUNS[0], "org-a"))
        for q in (f"COPY (SELECT 1 AS v) TO '{target}' (FORMAT parquet)", "SET enable_external_access = true",
                  "SELECT * FROM read_csv('/etc/hostname')", f"ATTACH '{store.uri}/evil.duckdb'"):
            with pytest.raises(Exception):
                con.execute(q)
        assert con.sql("SELECT count(*) FROM means").fetchall() == [(4 * 2 * 6,)]
    finally:
        con.close()
    assert _snapshot(store) == before


def _evals_row(store: Store, run_id: str, model: str) -> None:
    from refdir.schemas.tables import evals_schema

    row = {"run_id": run_id, "model": model, "dataset": "harmful_test", "intervention": "baseline",
           "judge": "substring", "metric": "refusal_rate", "value": 1.0, "n": 4}
    store.write_table(layout.evals_table(run_id, model, "harmful_test", "baseline"),
                      pa.Table.from_pylist([row], schema=evals_schema()), table_name="evals", run_id=run_id)


def test_truncated_file_is_skipped(any_store_uri, caplog):
    store = Store.open(any_store_uri)
    for model in ("org-a", "org-b"):
        build_store(store, model=model)
        aggregate_means(store, "demo-0123abcd", model)
        _evals_row(store, "demo-0123abcd", model)
    bad = layout.candidates_table("demo-0123abcd", "org-a")
    blob = store.read_bytes(bad)
    store.write_bytes(bad, blob[: len(blob) // 2])
    with caplog.at_level("WARNING", logger="refdir.flows.sql"):
        assert run_sql(store, "SELECT count(*) AS n FROM evals", "json") == '[{"n": 2}]'
    warned = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert len(warned) == 1 and store.url(bad) in warned[0]
    assert run_sql(store, "SELECT count(*) AS n FROM candidates", "json") == '[{"n": 6}]'   # org-b's only


@pytest.mark.parametrize("ext", ["csv", "parquet", "json"])
def test_export_result(full_store, tmp_path, ext):
    import pyarrow.parquet as pq

    from refdir.flows.sql import export_result

    q = "SELECT run_id, model, count(*) AS n FROM activations GROUP BY ALL ORDER BY ALL"
    out = tmp_path / f"out.{ext}"
    assert export_result(full_store, q, out) == 4
    if ext == "parquet":
        rows = pq.read_table(out).to_pylist()
    elif ext == "json":
        rows = json.loads(out.read_text())
    else:
        rows = [dict(r, n=int(r["n"])) for r in csv.DictReader(io.StringIO(out.read_text()))]
    assert rows == [{"run_id": r, "model": m, "n": ROWS_PER_MODEL} for r in RUNS for m in MODELS]
    with pytest.raises(SqlError, match="read-only"):
        export_result(full_store, "COPY (SELECT 1) TO 'x.csv'", out)
    if full_store.is_local:
        with pytest.raises(SqlError, match="inside the store"):
            export_result(full_store, q, f"{full_store.uri}/x.{ext}")


def test_shell_line_editing_in_a_terminal(tmp_path):
    """In a real terminal (a pty), an arrow key before `.quit` is line editing, not part of the command."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time
    from pathlib import Path

    (tmp_path / "store").mkdir()
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "refdir.flows.cli", "sql", "--store", str(tmp_path / "store")],
                            stdin=child, stdout=child, stderr=child, cwd=Path(__file__).resolve().parents[1],
                            start_new_session=True)
    os.close(child)
    out, deadline = b"", time.time() + 120
    try:
        while b"refdir> " not in out and time.time() < deadline:
            if select.select([main], [], [], 0.5)[0]:
                out += os.read(main, 4096)
        assert b"refdir> " in out, out[-2000:]
        os.write(main, b"\x1b[A\x1b[D\x1b[C.quit\r")         # up, left, right, then .quit
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)


# ---------------------------------------------------------------- views follow the store between queries

def _write_parquet(path, values: list[int]) -> None:
    """A file written by pyarrow (not refdir), atomically, as a writer replaces a file."""
    import os

    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-test"
    pq.write_table(pa.table({"v": pa.array(values, pa.int64())}), tmp, compression="none", use_dictionary=False)
    os.replace(tmp, path)


def test_each_query_sees_the_store_as_it_is_now(tmp_path, caplog):
    """Connections share the process's DuckDB instance (footers parsed once), yet every query sees the store as
    it is: a shard counts once its done-marker exists, a rewritten file is read anew (same size and a new
    size), a file truncated after it was read is left out with its warning, temp objects stay per connection."""
    from refdir.flows.sql import close_databases

    store = Store.open(str(tmp_path / "store"))
    run, model = "demo-0123abcd", "org-a"
    shard = layout.completion_shard(run, model, "harmful_test", "baseline", 0)
    marker = layout.completion_marker(run, model, "harmful_test", "baseline", 0)
    evals = store.url(layout.evals_table(run, model, "harmful_test", "baseline"))
    _write_parquet(store.url(shard), [1, 2, 3])
    _write_parquet(evals, [10, 20])

    def one(q: str):
        return json.loads(run_sql(store, q, "json"))

    close_databases()                                   # start from a fresh instance, like a new process
    with pytest.raises(SqlError, match="no completions stored yet"):
        run_sql(store, "SELECT count(*) FROM completions")   # data without its marker: not served
    store.write_bytes(marker, b'{"job_id": "x"}')
    assert one("SELECT sum(v) AS s FROM completions") == [{"s": 6}]
    assert one("SELECT sum(v) AS s FROM evals") == [{"s": 30}]
    _write_parquet(evals, [11, 21])                    # same size, other values
    assert one("SELECT sum(v) AS s FROM evals") == [{"s": 32}]
    _write_parquet(evals, [1, 2, 3, 4])                # other size
    assert one("SELECT sum(v) AS s, count(*) AS n FROM evals") == [{"s": 10, "n": 4}]
    blob = open(evals, "rb").read()
    open(evals, "wb").write(blob[: len(blob) // 2])   # truncated after DuckDB parsed its footer
    with caplog.at_level("WARNING", logger="refdir.flows.sql"):
        with pytest.raises(SqlError, match="no evals stored yet"):
            run_sql(store, "SELECT count(*) FROM evals")
    assert [r for r in caplog.records if "skipping unreadable" in r.getMessage() and evals in r.getMessage()]
    assert one("SELECT sum(v) AS s FROM completions") == [{"s": 6}]   # the other views still answer
    a, b = connect_views(store), connect_views(store)
    try:
        a.execute("CREATE TEMP TABLE mine AS SELECT 1 AS x")
        with pytest.raises(Exception, match="mine"):
            b.execute("SELECT * FROM mine")
    finally:
        a.close()
        b.close()


def test_local_reader_is_read_only_and_fast_path_agrees(tmp_path):
    """The local store's read-only filesystem answers DuckDB's per-file calls like fsspec's LocalFileSystem does,
    and refuses every write, delete and folder creation."""
    import os

    from fsspec.implementations.local import LocalFileSystem

    from refdir.flows.sql import _read_only_fs

    store = Store.open(str(tmp_path / "s"))
    store.write_bytes("runs/a/b.bin", b"0123456789")
    fs, ref = _read_only_fs(store), LocalFileSystem()
    path = store.url("runs/a/b.bin")
    ro = "refdirro://" + path
    assert fs.glob(ro) == ref.glob(path) == [path]
    assert fs.glob("refdirro://" + store.url("runs/a/nothing.bin")) == []
    assert fs.size(ro) == ref.size(path) == 10 and fs.exists(ro) and not fs.exists(ro + "x")
    assert fs.modified(ro) == ref.modified(path)
    with fs.open(ro, "rb") as f:
        f.seek(-4, 2)
        assert f.read() == b"6789" and f.tell() == 10
        f.seek(2)
        assert f.read(3) == b"234" and not f.writable()
    for call in (lambda: fs.open(ro, "wb"), lambda: fs.open(ro, "ab"), lambda: fs.open(ro, "r+b"),
                 lambda: fs.rm(ro), lambda: fs.mkdir("refdirro://" + store.url("runs/new")),
                 lambda: fs.mv(ro, ro + ".moved"), lambda: fs.touch(ro)):
        with pytest.raises(PermissionError):
            call()
    assert open(path, "rb").read() == b"0123456789" and sorted(os.listdir(os.path.dirname(path))) == ["b.bin"]


def test_forked_children_neither_free_nor_share_the_parents_duckdb(tmp_path):
    """Ray starts its GCS and raylet with a preexec_fn, so Python's at-fork hooks run in the child before exec.
    With a DuckDB instance cached (a query ran), such a fork must not crash the child (it segfaulted freeing
    the parent's instance, and `ray.init` then timed out waiting for the GCS port); a child that queries the
    store gets its own instance and the same answer, and the parent's instance still serves."""
    import os
    import subprocess

    store = Store.open(str(tmp_path / "store"))
    run = "fork-0123abcd"
    _write_parquet(store.url(layout.evals_table(run, "org-a", "harmful_test", "baseline")), [1, 2, 3])
    assert json.loads(run_sql(store, "SELECT sum(v) AS s FROM evals", "json")) == [{"s": 6}]
    for _ in range(3):
        assert subprocess.run(["true"], preexec_fn=lambda: None).returncode == 0   # -11: the child segfaulted
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: query through its own instance, report, exit without cleanup
        try:
            os.write(w, run_sql(store, "SELECT sum(v) AS s FROM evals", "json").encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        child = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and json.loads(child) == [{"s": 6}]
    assert json.loads(run_sql(store, "SELECT sum(v) AS s FROM evals", "json")) == [{"s": 6}]
