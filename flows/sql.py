"""SQL over the whole store: one DuckDB connection with a view per table (all runs, all models).

Shard tables (activations, sums, prompts, score and completion shards) include only data files whose
done-marker exists, so a writer that died between data and marker adds nothing. Files that are not
shards (means.parquet, scores.parquet, ...) are included as they are. A table with no data gets no view;
`run_sql` turns a query against it into SqlError("no <table> stored yet in <store> — run ... first").
The files stay plain Parquet: any DuckDB/pyarrow/polars user can read them without refdir.

Read-only, twice over. Only read statements run (DuckDB's own statement types: SELECT, EXPLAIN of a
SELECT, CREATE TEMP ...); COPY, ATTACH, INSTALL/LOAD, EXPORT, SET/PRAGMA, persistent CREATE, INSERT ...
are refused with one line before anything executes. And the DuckDB instance itself is locked down before
any view exists: DuckDB reads the store only through a read-only filesystem (writes, deletes and folder
creation raise; a local file is opened O_RDONLY), `enable_external_access = false` with the store as the
only allowed directory, and `lock_configuration = true`, so a statement that slipped past the check still
could not write. One such instance per store serves the process: each connect_views is a new connection
to it with its own temp views, built from the store as it is then (listing, done-markers, footer checks);
only DuckDB's parsed footers carry over, re-read when a file changes.
A Parquet file whose footer is unreadable (truncated, empty) is left out of its view with one warning
naming it; every other view still answers. Results are exported by refdir (`export_result`), never
by DuckDB into the store.

    print(run_sql(store, "SELECT model, layer, count(*) FROM activations GROUP BY ALL", fmt="table"))
    con = connect_views(store)          # a locked-down duckdb connection for programmatic use
    export_result(store, query, "out.parquet")   # csv / parquet / json by extension
    interactive(store)                  # `refdir sql` without a query: statements end with ';'
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import duckdb
import pyarrow as pa

from refdir.schemas.layout import VIEW_GLOBS
from refdir.workers.store import Store

logger = logging.getLogger(__name__)

VIEWS = ("runs", "activations", "prompts", "means", "candidates", "scores", "directions", "completions", "evals", "sums",
         "trials")

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
    "trials": "the optimize stage (`[optimize] enabled = true` in the spec)",
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


# ---------------------------------------------------------------- read-only access

_RO_PROTOCOL = "refdirro"      # the store as DuckDB sees it: read-only, through fsspec
_MUTATORS = ("rm", "_rm", "rm_file", "_rm_file", "rmdir", "_rmdir", "mkdir", "_mkdir", "makedirs", "_makedirs",
             "mv", "_mv", "mv_file", "copy", "_copy", "cp_file", "_cp_file", "put", "_put", "put_file", "_put_file",
             "pipe", "_pipe", "pipe_file", "_pipe_file", "touch", "_touch", "write_bytes", "write_text")


def _refuse(*_args, **_kwargs):
    raise PermissionError("refdir sql opens the store read-only")


class _SharedReader:
    """A read-only remote file that several DuckDB threads may share (DuckDB's fsspec bridge reads one handle
    from many threads): each thread keeps its own position, and every seek+read is one step under a lock."""

    def __init__(self, f):
        self._f, self._lock, self._local = f, threading.Lock(), threading.local()
        self._size = None

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2:
            if self._size is None:
                with self._lock:
                    self._size = self._f.seek(0, 2)
            offset += self._size
        elif whence == 1:
            offset += self.tell()
        self._local.pos = offset
        return offset

    def tell(self) -> int:
        return getattr(self._local, "pos", 0)

    def read(self, n: int = -1) -> bytes:
        with self._lock:
            self._f.seek(self.tell())
            data = self._f.read(n)
        self._local.pos = self.tell() + len(data)
        return data

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


class _LocalReader:
    """A local file opened O_RDONLY that DuckDB's threads share: os.pread at each thread's own position (no
    lock, the reads run in parallel outside the GIL). There is no write method: the descriptor cannot write."""

    def __init__(self, path: str):
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._size, self._local = os.fstat(self._fd).st_size, threading.local()

    def seek(self, offset: int, whence: int = 0) -> int:
        pos = offset + (self._size if whence == 2 else self.tell() if whence == 1 else 0)
        self._local.pos = pos
        return pos

    def tell(self) -> int:
        return getattr(self._local, "pos", 0)

    def read(self, n: int = -1) -> bytes:
        pos = self.tell()
        data = os.pread(self._fd, self._size - pos if n is None or n < 0 else n, pos)
        self._local.pos = pos + len(data)
        return data

    def writable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _LocalCalls:
    """The calls DuckDB makes for every file of every query (glob, exists, size, modified, open), straight to
    the OS for a local store: fsspec's generic paths cost ~0.1 s of CPU per query over 80 shards."""

    @staticmethod
    def _os_path(path: str) -> str:
        return str(path).removeprefix(f"{_RO_PROTOCOL}://")

    def open(self, path, mode="rb", *args, **kwargs):
        if mode != "rb":
            _refuse()
        return _LocalReader(self._os_path(path))

    def glob(self, path, **kwargs):
        p = self._os_path(path)
        if any(c in p for c in "*?["):
            return super().glob(path, **kwargs)
        return [p] if os.path.exists(p) else []

    def exists(self, path, **kwargs) -> bool:
        return os.path.exists(self._os_path(path))

    def size(self, path) -> int:
        return os.stat(self._os_path(path)).st_size

    def modified(self, path):
        from datetime import datetime, timezone

        return datetime.fromtimestamp(os.stat(self._os_path(path)).st_mtime, tz=timezone.utc)


def _read_only_fs(store: Store):
    """A copy of the store's filesystem under the `refdirro://` protocol that refuses every write."""
    base = type(store.fs)

    def _open(self, path, mode="rb", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            _refuse()
        return _SharedReader(base._open(self, path, mode, *args, **kwargs))

    attrs = {name: _refuse for name in _MUTATORS if hasattr(base, name)}
    bases = (_LocalCalls, base) if store.is_local else (base,)
    ro = type("ReadOnlyStoreFS", bases, {"protocol": _RO_PROTOCOL, "cachable": False, "_open": _open, **attrs})
    return ro(**store.fs.storage_options)


def _ro_path(store: Store, rel: str) -> str:
    """What DuckDB reads for a store-relative path: refdirro:///abs/path or refdirro://bucket/prefix/rel."""
    url = store.url(rel)
    return f"{_RO_PROTOCOL}://{url.removeprefix('s3://')}"


def _lock_down(con: duckdb.DuckDBPyConnection, store: Store) -> None:
    """No file access but the read-only store, and no way to change that afterwards."""
    root = _ro_path(store, "x")[: -len("x")]
    con.execute(f"SET allowed_directories = [{_quote(root)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")


_READ_TYPES = {"SELECT"}
_EXPLAIN = re.compile(r"^\s*explain\s+(analy[sz]e\s+)?", re.I)
_CREATE_TEMP = re.compile(r"^\s*create\s+(or\s+replace\s+)?(temp|temporary)\s+(table|view|macro|function)\b", re.I)


def check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> None:
    """SqlError (one line) unless every statement of `query` only reads: SELECT (incl. SHOW, DESCRIBE,
    SUMMARIZE, VALUES, FROM ...), EXPLAIN [ANALYZE] of one, or CREATE TEMP TABLE/VIEW/MACRO."""
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as e:
        raise SqlError(_first_line(str(e))) from None
    for st in statements:
        kind = st.type.name
        text = st.query.strip()
        if kind == "EXPLAIN":
            inner = con.extract_statements(_EXPLAIN.sub("", text, count=1))
            if all(i.type.name in _READ_TYPES for i in inner):
                continue
        elif kind in _READ_TYPES or (kind == "CREATE" and _CREATE_TEMP.match(text)):
            continue
        word = text.split(None, 1)[0].upper() if text else kind
        raise SqlError(f"refdir sql is read-only: {word} is not allowed (only SELECT, EXPLAIN and CREATE TEMP "
                       "statements run); use --out FILE to export a result")


def _first_line(text: str, limit: int = 500) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ---------------------------------------------------------------- views

def _footer_problem(size: int, tail: bytes) -> str | None:
    """Why a file of `size` bytes ending in `tail` (its last 8 bytes) has no readable Parquet footer, or None."""
    if size < 12:
        return f"{size} bytes, too short for Parquet"
    if tail[4:] != b"PAR1":
        return "no Parquet footer (truncated?)"
    if int.from_bytes(tail[:4], "little") > size - 12:
        return "footer length larger than the file (truncated?)"
    return None


def _readable_local(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            return _footer_problem(size, os.pread(fd, 8, size - 8) if size >= 12 else b"")
        finally:
            os.close(fd)
    except OSError as e:
        return f"{type(e).__name__}: {_first_line(str(e), 200)}"


def _readable(store: Store, rel: str) -> str | None:
    """None when the file ends in a Parquet footer (magic + a length that fits), else why not."""
    if store.is_local:
        return _readable_local(store.url(rel))
    try:
        with store.fs.open(store.url(rel), "rb") as f:
            size = f.seek(0, 2)
            tail = b""
            if size >= 12:
                f.seek(size - 8)
                tail = f.read(8)
    except Exception as e:  # noqa: BLE001 - any failure to read means the view goes without it
        return f"{type(e).__name__}: {_first_line(str(e), 200)}"
    return _footer_problem(size, tail)


def _drop_unreadable(store: Store, views: dict[str, list[str]]) -> dict[str, list[str]]:
    """The same views without files whose footer cannot be read; one warning per bad file. Local files are
    checked in turn (a few system calls each: a thread pool costs more); remote ones 16 at a time."""
    files = [f for fs in views.values() for f in fs]
    if store.is_local:
        why = {f: _readable(store, f) for f in files}
    else:
        with ThreadPoolExecutor(min(16, max(1, len(files)))) as pool:
            why = dict(zip(files, pool.map(lambda f: _readable(store, f), files)))
    for f, reason in why.items():
        if reason:
            logger.warning("skipping unreadable file %s (%s); the other files and views still answer",
                           store.url(f), reason)
    out = {name: [f for f in fs if not why[f]] for name, fs in views.items()}
    return {name: fs for name, fs in out.items() if fs}


def _create_view(con: duckdb.DuckDBPyConnection, store: Store, name: str, files: list[str]) -> None:
    paths = ", ".join(_quote(_ro_path(store, f)) for f in files)
    con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * FROM read_parquet([{paths}], hive_partitioning = false)")


# One locked-down DuckDB instance per store, per process. A forked child (Ray starts its GCS and raylet with a
# preexec_fn, so the parent's Python state runs on in the child until exec) must neither use nor free the
# parent's instances: freeing one runs DuckDB's destructor on threads and locks that do not exist in the child
# (it segfaulted there). So the cache is keyed by pid, and a child sets its parent's aside, never freed.
_DATABASES: dict = {"pid": os.getpid(), "dbs": {}, "lock": threading.Lock()}
_INHERITED: list[dict] = []    # the parents' caches in a forked child: kept referenced so no destructor runs


def _databases() -> dict:
    if _DATABASES["pid"] != os.getpid():
        _INHERITED.append(dict(_DATABASES["dbs"]))
        _DATABASES.update(pid=os.getpid(), dbs={}, lock=threading.Lock())
    return _DATABASES


def _database(store: Store) -> duckdb.DuckDBPyConnection:
    """The process's DuckDB instance for this store: the read-only filesystem registered, locked down once.

    Starting an instance costs ~30 ms and parsing 80 shard footers about as much again; every connect_views
    after the first opens a new connection to it (its own temp views and settings) and shares the parsed
    footers, which DuckDB re-reads when a file's size or modification time changes. File bytes are not
    cached (enable_external_file_cache = false): each query reads what it needs from the store."""
    key = (store.uri, type(store.fs).__name__, repr(getattr(store.fs, "storage_options", None)))
    state = _databases()
    with state["lock"]:
        db = state["dbs"].get(key)
        if db is None:
            db = duckdb.connect()
            db.register_filesystem(_read_only_fs(store))
            db.execute("SET GLOBAL parquet_metadata_cache = true")   # GLOBAL: the connections get it too
            db.execute("SET GLOBAL enable_external_file_cache = false")
            # DuckDB prefetches a remote (here: fsspec) Parquet file from the first column chunk it needs to the
            # end: a one-layer query then read half the shard. Without it DuckDB reads exactly the row groups and
            # columns the query needs (on S3, s3fs's own block cache still coalesces small reads).
            db.execute("SET GLOBAL disable_parquet_prefetching = true")
            _lock_down(db, store)
            state["dbs"][key] = db
        return db.cursor()


def close_databases() -> None:
    """Close this process's DuckDB instances (the next connect_views starts a fresh one)."""
    state = _databases()
    with state["lock"]:
        for db in state["dbs"].values():
            db.close()
        state["dbs"].clear()


def connect_views(store: Store) -> duckdb.DuckDBPyConnection:
    """A locked-down DuckDB connection with one (temp) view per stored table; tables without data get no view.

    The views are built from the store as it is now (marked shards, readable footers); close the connection
    when done. Connections to one store share the process's locked-down DuckDB instance (`_database`)."""
    views = _drop_unreadable(store, view_files(store))
    con = _database(store)
    for name, files in views.items():
        try:
            _create_view(con, store, name, files)
        except duckdb.Error as e:   # a file DuckDB cannot read after all: the other views still answer
            logger.warning("view %s left out: %s", name, _first_line(str(e), 300))
    logger.debug("views over %s: %s", store.uri, {k: len(v) for k, v in views.items()})
    return con


def _view_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [r[0] for r in con.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1").fetchall()]


def _sql_error(store: Store, exc: duckdb.Error) -> SqlError:
    msg = str(exc).replace(f"{_RO_PROTOCOL}://", "" if store.is_local else "s3://")
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

def _relation(con: duckdb.DuckDBPyConnection, store: Store, query: str):
    check_read_only(con, query)
    try:
        return con.sql(query)
    except duckdb.Error as e:
        raise _sql_error(store, e) from None


def _run(con: duckdb.DuckDBPyConnection, store: Store, query: str, fmt: str) -> str:
    if fmt not in ("table", "csv", "json"):
        raise SqlError(f"unknown format {fmt!r}; use table, csv or json")
    rel = _relation(con, store, query)
    if rel is None:
        return ""
    try:
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


EXPORT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".json": "json"}


def export_result(store: Store, query: str, out_path: str | Path) -> int:
    """Write the query's result to a local file (csv / parquet / json by extension); returns its rows.

    refdir writes the file (pyarrow), not DuckDB, and never into a local store."""
    path = Path(out_path).expanduser().resolve()
    kind = EXPORT_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise SqlError(f"--out {out_path}: unknown extension; use one of {', '.join(EXPORT_FORMATS)}")
    if store.is_local and (path == Path(store.uri) or Path(store.uri) in path.parents):
        raise SqlError(f"--out {out_path} is inside the store {store.uri}; write the export somewhere else")
    con = connect_views(store)
    try:
        rel = _relation(con, store, query)
        if rel is None:
            raise SqlError("the statement returns no result to export")
        try:
            table = rel.to_arrow_table()
        except duckdb.Error as e:
            raise _sql_error(store, e) from None
    finally:
        con.close()
    _write_export(table, path, kind)
    return table.num_rows


def _write_export(table: pa.Table, path: Path, kind: str) -> None:
    import pyarrow.parquet as pq

    if not path.parent.is_dir():
        raise SqlError(f"--out {path}: folder {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if kind == "parquet":
            pq.write_table(table, tmp, compression="zstd")
        else:
            tmp.write_text(format_csv(table) if kind == "csv" else format_json(table))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def interactive(store: Store, *, input_fn: Callable[[str], str] = input, out=None) -> None:
    """A small REPL: statements end with ';'; `.tables`, `.format table|csv|json`, `.quit`."""
    out = out or sys.stdout
    if input_fn is input:
        try:
            import readline  # noqa: F401 - line editing and history for input(): arrows no longer garble `.quit`
        except ImportError:
            pass
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
