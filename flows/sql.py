"""SQL over the whole store: one DuckDB connection with a view per table (all runs, all models).

Shard tables (activations, sums, prompts, score and completion shards) include only data files whose
done-marker exists, so a writer that died between data and marker adds nothing. Files that are not
shards (means.parquet, scores.parquet, ...) are included as they are. A table with no data gets no view;
`run_sql` turns a query against it into SqlError("no <table> stored yet in <store> — run ... first").
The files stay plain Parquet: any DuckDB/pyarrow/polars user can read them without refdir.

    print(run_sql(store, "SELECT model, layer, count(*) FROM activations GROUP BY ALL", fmt="table"))
    con = connect_views(store)          # a plain duckdb connection for programmatic use
    interactive(store)                  # `refdir sql` without a query: statements end with ';'
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import sys
from decimal import Decimal
from typing import Any, Callable

import duckdb
import pyarrow as pa

from refdir.schemas.layout import VIEW_GLOBS
from refdir.workers.store import Store

logger = logging.getLogger(__name__)

VIEWS = ("runs", "activations", "prompts", "means", "candidates", "scores", "directions", "completions", "evals", "sums")

MAX_TABLE_ROWS = 200   # rows printed in fmt="table" (csv/json print everything)
MAX_CELL = 48          # characters per printed cell

# Data file -> its done-marker (mirrors schemas.layout; tests check the two agree).
_MARKER_OF = {
    "activations": (re.compile(r"^(runs/[^/]+/[^/]+)/activations/split=([^/]+)/label=([^/]+)/part-(\d+)\.parquet$"),
                    r"\1/activations/_done/\2-\3-\4.json"),
    "sums": (re.compile(r"^(runs/[^/]+/[^/]+)/sums/part-(.+)\.parquet$"), r"\1/activations/_done/\2.json"),
    "prompts": (re.compile(r"^(runs/[^/]+/[^/]+)/prompts/part-(.+)\.parquet$"), r"\1/activations/_done/\2.json"),
    "scores": (re.compile(r"^(runs/[^/]+/[^/]+)/scores/part-(\d+)\.parquet$"), r"\1/scores/_done/\2.json"),
    "completions": (re.compile(r"^(runs/[^/]+/[^/]+)/completions/([^/]+)/([^/]+)/part-(\d+)\.parquet$"),
                    r"\1/completions/_done/\2-\3-\4.json"),
}

_HINTS = {
    "runs": "`refdir run SPEC`", "activations": "the extract stage (`refdir run SPEC`)",
    "sums": "the extract stage (`refdir run SPEC`)", "prompts": "the prompts stage (`refdir run SPEC`)",
    "means": "the aggregate stage (`refdir run SPEC`)", "candidates": "the aggregate stage (`refdir run SPEC`)",
    "scores": "the select stage (`refdir run SPEC`)", "directions": "the select stage (`refdir run SPEC`)",
    "completions": "the evaluate stage (`refdir run SPEC`)", "evals": "the evaluate stage (`refdir run SPEC`)",
}


class SqlError(RuntimeError):
    """A query failed: DuckDB's own message, or a table that has no data yet."""


def marker_for(table: str, data_rel: str) -> str | None:
    """The done-marker a shard's data file needs (None: not a shard, e.g. means.parquet or scores.parquet)."""
    if table not in _MARKER_OF:
        return None
    pattern, repl = _MARKER_OF[table]
    return pattern.sub(repl, data_rel) if pattern.match(data_rel) else None


def _glob_regex(pattern: str) -> re.Pattern:
    """A store glob ('*' stays inside one path segment) as a regex."""
    return re.compile("^" + "[^/]*".join(re.escape(part) for part in pattern.split("*")) + "$")


def view_files(store: Store) -> dict[str, list[str]]:
    """Table -> store-relative data files visible to SQL (one recursive listing of the store)."""
    files = store.list_files("runs")
    present = set(files)
    out: dict[str, list[str]] = {}
    for name in VIEWS:
        rx = _glob_regex(VIEW_GLOBS[name])
        hits = [f for f in files if rx.match(f)]
        hits = [f for f in hits if marker_for(name, f) in present or marker_for(name, f) is None]
        if hits:
            out[name] = hits
    return out


def _quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def connect_views(store: Store) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with one view per stored table; tables without data get no view."""
    con = store.duckdb_connect()
    con.execute("SET parquet_metadata_cache = true")
    views = view_files(store)
    for name, files in views.items():
        paths = ", ".join(_quote(store.path_for_duckdb(f)) for f in files)
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{paths}], hive_partitioning = false)")
    logger.debug("views over %s: %s", store.uri, {k: len(v) for k, v in views.items()})
    return con


def _view_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [r[0] for r in con.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1").fetchall()]


def _sql_error(store: Store, exc: duckdb.Error) -> SqlError:
    msg = str(exc)
    m = re.search(r"Table with name (\w+) does not exist", msg)
    if m and m.group(1).lower() in VIEWS:
        table = m.group(1).lower()
        return SqlError(f"no {table} stored yet in {store.uri} — run {_HINTS[table]} first")
    return SqlError(msg)


# ---------------------------------------------------------------- formatting

def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, list):
        head = ", ".join(_cell(x) for x in v[:4])
        return f"[{head}{', …' if len(v) > 4 else ''}] ({len(v)})" if len(v) > 4 else f"[{head}]"
    if isinstance(v, float):
        return f"{v:.6g}"
    s = str(v)
    return s if len(s) <= MAX_CELL else s[: MAX_CELL - 1] + "…"


def format_table(table: pa.Table, more: bool = False) -> str:
    """A plain-text grid; long lists show their first values and length."""
    cols = table.column_names
    rows = [[_cell(v) for v in r.values()] for r in table.to_pylist()]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    line = "-+-".join("-" * w for w in widths)
    out = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip(), line]
    out += [" | ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    n = len(rows)
    out.append(f"({n} row{'s' if n != 1 else ''}{', more not shown: use --format csv for all' if more else ''})")
    return "\n".join(out)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Decimal):   # DuckDB's sum() of integers is a HUGEINT -> decimal128
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def format_csv(table: pa.Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(table.column_names)
    for r in table.to_pylist():
        w.writerow([json.dumps(_jsonable(v)) if isinstance(v, (list, dict)) else ("" if v is None else v)
                    for v in r.values()])
    return buf.getvalue()


def format_json(table: pa.Table) -> str:
    return json.dumps([_jsonable(r) for r in table.to_pylist()], default=str)


# ---------------------------------------------------------------- running queries

def _run(con: duckdb.DuckDBPyConnection, store: Store, query: str, fmt: str) -> str:
    if fmt not in ("table", "csv", "json"):
        raise SqlError(f"unknown format {fmt!r}; use table, csv or json")
    try:
        rel = con.sql(query)
        if rel is None:
            return ""
        if fmt == "table":
            t = rel.limit(MAX_TABLE_ROWS + 1).to_arrow_table()
            return format_table(t.slice(0, MAX_TABLE_ROWS), more=t.num_rows > MAX_TABLE_ROWS)
        t = rel.to_arrow_table()
    except duckdb.Error as e:
        raise _sql_error(store, e) from None
    return format_csv(t) if fmt == "csv" else format_json(t)


def run_sql(store: Store, query: str, fmt: str = "table") -> str:
    """Run one query (or a ';'-separated script; the last result is shown) over the store's views."""
    con = connect_views(store)
    try:
        return _run(con, store, query, fmt)
    finally:
        con.close()


def interactive(store: Store, *, input_fn: Callable[[str], str] = input, out=None) -> None:
    """A small REPL: statements end with ';'; `.tables`, `.format table|csv|json`, `.quit`."""
    out = out or sys.stdout
    con = connect_views(store)
    fmt, buf = "table", []
    print(f"refdir sql on {store.uri}; views: {', '.join(_view_names(con)) or '(none yet)'}", file=out)
    try:
        while True:
            try:
                line = input_fn("refdir> " if not buf else "   ...> ")
            except (EOFError, KeyboardInterrupt):
                break
            cmd = line.strip()
            if not buf and cmd.startswith("."):
                if cmd in (".quit", ".exit", ".q"):
                    break
                if cmd == ".tables":
                    print("\n".join(_view_names(con)) or "(no tables yet)", file=out)
                elif cmd.startswith(".format") and cmd.split()[-1] in ("table", "csv", "json"):
                    fmt = cmd.split()[-1]
                else:
                    print("commands: .tables  .format table|csv|json  .quit", file=out)
                continue
            buf.append(line)
            if cmd.endswith(";"):
                try:
                    print(_run(con, store, "\n".join(buf), fmt), file=out)
                except SqlError as e:
                    print(f"Error: {e}", file=out)
                buf = []
    finally:
        con.close()
