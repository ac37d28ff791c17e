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
