"""The activation store: one root (local folder, file:// or s3://bucket/prefix) behind one small API.

Owns every byte refdir writes or reads: atomic object writes, Parquet tables with refdir metadata,
done-markers (data first, marker second), checksum verification, globbing, and DuckDB connections that
can read the store (on S3 through the fsspec filesystem: the DuckDB wheel has no httpfs offline).

    store = Store.open("s3://bucket/prefix")          # or "refdir-store", "file:///abs/path", a StoreSpec
    store.check_writable()                            # fail before any model loads
    receipt = store.commit(shard_rel, table, marker_rel, table_name="activations", run_id=rid, job_id=jid)
    done = store.done_jobs(layout.activation_markers_dir(rid, model), verify=True)

S3 credentials come from the StoreSpec, else AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY;
they are never logged and not part of repr(). Connection behaviour can be tuned with
REFDIR_S3_CONNECT_TIMEOUT (seconds, default 5) and REFDIR_S3_MAX_ATTEMPTS (default 3).
Readers list markers, never data files: a shard without a marker does not exist.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from refdir.schemas.jobs import Receipt
from refdir.schemas.spec import StoreSpec
from refdir.schemas.tables import TABLES, check_metadata, with_metadata

logger = logging.getLogger(__name__)

_FLOAT_BSS = (pa.float32(), pa.float64())  # DuckDB 2.0.1 cannot read byte-stream-split float16


_WARNED: set[str] = set()   # unreadable markers already named in this process (one line each, not one per read)


class StoreError(RuntimeError):
    """The store cannot be used: unreachable, refused credentials, missing bucket, not a folder, not writable."""


class CorruptFile(StoreError):
    """A stored file does not match the sha256 its marker or manifest recorded (truncated, edited, missing)."""


# ---------------------------------------------------------------- error classification

def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _error_code(exc: BaseException) -> str:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        return str(resp.get("Error", {}).get("Code", ""))
    return ""


def _classify(exc: BaseException) -> str | None:
    """'unreachable' | 'credentials' | 'no_bucket' | None for an exception raised by s3fs/botocore."""
    names = {type(e).__name__ for e in _chain(exc)}
    codes = {_error_code(e) for e in _chain(exc)}
    text = " ".join(str(e) for e in _chain(exc))
    unreachable = {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ClientConnectorError",
                   "ConnectionRefusedError", "ServerDisconnectedError", "FSTimeoutError", "gaierror"}
    if names & unreachable or "Could not connect to the endpoint" in text:
        return "unreachable"
    if codes & {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken", "403"} \
            or names & {"NoCredentialsError", "PartialCredentialsError", "PermissionError"}:
        return "credentials"
    if "NoSuchBucket" in codes or "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return "no_bucket"
    return None


# ---------------------------------------------------------------- the store

class Store:
    """A store root. Paths given to methods are store-relative ("runs/<id>/<model>/...")."""

    def __init__(self, uri: str, fs: fsspec.AbstractFileSystem, root: str, *, endpoint: str | None = None):
        self.uri = uri          # normalised root: an absolute local path, or s3://bucket/prefix
        self.fs = fs
        self._root = root       # the root as the filesystem names it: /abs/path or bucket/prefix
        self._endpoint = endpoint
        self.is_local = isinstance(fs, LocalFileSystem)
        self._journal: dict[str, str] | None = None

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    @contextmanager
    def recording(self) -> Iterator[dict[str, str]]:
        """Collect {path: sha256} of every object this Store object writes inside the block (for a manifest)."""
        outer, self._journal = self._journal, {}
        try:
            yield self._journal
        finally:
            self._journal = outer

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, spec: StoreSpec | str, *, create: bool = True) -> "Store":
        """Open a store from a StoreSpec or a URI string; StoreError when it cannot be used.

        `create` makes a missing local folder; an S3 bucket is never created (a missing one is an error).
        """
        if isinstance(spec, str):
            spec = StoreSpec(uri=spec)
        uri = spec.uri.strip()
        if not uri:
            raise StoreError("store URI is empty; set store.uri in the spec, REFDIR_STORE, or --store")
        if uri.startswith("s3://"):
            return cls._open_s3(spec, uri)
        if "://" in uri and not uri.startswith("file://"):
            raise StoreError(f"store URI {uri!r}: unsupported scheme; use a local folder, file://PATH or s3://BUCKET/PREFIX")
        return cls._open_local(uri.removeprefix("file://"), create=create)

    @classmethod
    def _open_local(cls, path: str, *, create: bool) -> "Store":
        root = os.path.abspath(os.path.expanduser(path)).rstrip("/") or "/"
        if os.path.exists(root) and not os.path.isdir(root):
            raise StoreError(f"store path {root} is a file, not a folder; point the store at a folder (or remove the file)")
        if not os.path.exists(root):
            if not create:
                raise StoreError(f"store folder {root} does not exist; run a stage that writes it first or fix the store path")
            try:
                os.makedirs(root, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create store folder {root}: {e.strerror or e}; choose a writable location") from None
        return cls(root, fsspec.filesystem("file"), root)

    @classmethod
    def _open_s3(cls, spec: StoreSpec, uri: str) -> "Store":
        import s3fs

        root = uri.removeprefix("s3://").strip("/")
        bucket = root.split("/", 1)[0]
        if not bucket:
            raise StoreError(f"store URI {uri!r} names no bucket; use s3://BUCKET/PREFIX")
        endpoint = spec.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        key = spec.key or os.environ.get("AWS_ACCESS_KEY_ID") or None
        secret = spec.secret.get_secret_value() if spec.secret else os.environ.get("AWS_SECRET_ACCESS_KEY") or None
        attempts = int(os.environ.get("REFDIR_S3_MAX_ATTEMPTS", "3"))
        config = {"connect_timeout": float(os.environ.get("REFDIR_S3_CONNECT_TIMEOUT", "5")), "read_timeout": 120,
                  "retries": {"max_attempts": attempts, "mode": "standard"}}
        fs = s3fs.S3FileSystem(key=key, secret=secret, endpoint_url=endpoint, config_kwargs=config,
                               skip_instance_cache=True, use_listings_cache=False)
        fs.retries = max(attempts, 1)
        store = cls(f"s3://{root}", fs, root, endpoint=endpoint)
        store._check_bucket(bucket)
        return store

    def _where(self) -> str:
        return f"{self.uri}" + (f" at endpoint {self._endpoint}" if self._endpoint else "")

    def _store_error(self, exc: BaseException, doing: str) -> StoreError:
        """Turn an s3fs/botocore/OS error into a StoreError that says what, where and how to fix."""
        kind = _classify(exc)
        bucket = self._root.split("/", 1)[0]
        if kind == "unreachable":
            msg = (f"cannot reach the S3 endpoint {self._endpoint or '(AWS default)'} while {doing} {self.uri}: {exc}; "
                   "check the endpoint URL (store.endpoint_url or AWS_ENDPOINT_URL) and that the server is running")
        elif kind == "credentials":
            msg = (f"S3 refused the credentials while {doing} {self._where()}: {exc}; set the right key and secret "
                   "(store.key/store.secret or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and check the bucket policy")
        elif kind == "no_bucket":
            msg = (f"bucket {bucket!r} does not exist ({self._where()}); create it (e.g. `aws s3 mb s3://{bucket}`) "
                   "or fix the store URI")
        elif isinstance(exc, PermissionError):
            msg = f"no permission while {doing} {self.uri}: {exc}; make the store location writable or choose another"
        else:
            msg = f"store error while {doing} {self._where()}: {type(exc).__name__}: {exc}"
        return StoreError(msg)

    def _check_bucket(self, bucket: str) -> None:
        try:
            self.fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)
        except Exception as e:  # noqa: BLE001 - every failure becomes a clear StoreError
            if isinstance(e, FileNotFoundError) and _classify(e) is None:
                raise self._store_error(RuntimeError("NoSuchBucket"), "opening") from None
            raise self._store_error(e, "opening") from None

    def check_writable(self) -> None:
        """Write and delete a probe object; StoreError (what, where, how to fix) when that fails."""
        rel = f".refdir-probe-{uuid.uuid4().hex}"
        try:
            self.write_bytes(rel, b"probe")
            if self.read_bytes(rel) != b"probe":
                raise StoreError(f"store {self._where()} returned different bytes than written for a probe object")
            self.delete(rel)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._store_error(e, "writing a probe object to") from None

    # ------------------------------------------------------------ paths

    def _path(self, rel: str) -> str:
        rel = rel.strip("/")
        if not rel or any(part in ("..", ".") for part in rel.split("/")):
            raise ValueError(f"store path {rel!r} must be a non-empty path relative to the store root, without '..'")
        return f"{self._root}/{rel}"

    def _rel(self, path: str) -> str:
        path = path.removeprefix("s3://") if not self.is_local else path
        return path[len(self._root):].lstrip("/") if path.startswith(self._root) else path

    def url(self, rel: str) -> str:
        """Full URI of a store-relative path (an absolute local path, or s3://bucket/prefix/rel)."""
        return self._path(rel) if self.is_local else f"s3://{self._path(rel)}"

    def path_for_duckdb(self, rel: str) -> str:
        """Path DuckDB reads (connections from duckdb_connect() know the s3 filesystem)."""
        return self.url(rel)

    # ------------------------------------------------------------ bytes and JSON

    def exists(self, rel: str) -> bool:
        try:
            return self.fs.exists(self._path(rel))
        except Exception as e:  # noqa: BLE001
            raise self._store_error(e, f"checking {rel} in") from None

    def write_bytes(self, rel: str, data: bytes) -> str:
        """The one commit path for every object: atomic write (local: a temp name in the same folder, then
        os.replace; S3: one PUT). Returns the sha256 of the bytes, for the caller's marker or manifest."""
        path = self._path(rel)
        digest = hashlib.sha256(data).hexdigest()
        if self._journal is not None:
            self._journal[rel.strip("/")] = digest
        if not self.is_local:
            try:
                self.fs.pipe_file(path, data if isinstance(data, (bytes, bytearray)) else bytes(data))
            except Exception as e:  # noqa: BLE001
                raise self._store_error(e, f"writing {rel} to") from None
            return digest
        folder = os.path.dirname(path)
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}.part")
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # the process umask applies
        except OSError as e:
            raise StoreError(f"cannot write {rel} in store {self.uri}: {e.strerror or e}; make the folder writable") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return digest

    def read_bytes(self, rel: str) -> bytes:
        """The object's bytes; FileNotFoundError when it does not exist."""
        try:
            return self.fs.cat_file(self._path(rel))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url(rel)} does not exist") from None
        except Exception as e:  # noqa: BLE001
            raise self._store_error(e, f"reading {rel} from") from None

    def write_json(self, rel: str, obj: Any) -> str:
        """Write JSON through the commit path; returns its sha256."""
        return self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def read_verified(self, rel: str, sha256: str) -> bytes:
        """The object's bytes, or CorruptFile when they are not the ones recorded."""
        try:
            data = self.read_bytes(rel)
        except FileNotFoundError:
            raise CorruptFile(f"{self.url(rel)} is missing (recorded sha256 {sha256[:12]}); rerun with --verify") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise CorruptFile(f"{self.url(rel)} does not match its recorded sha256 {sha256[:12]} (truncated or "
                              "edited); rerun with --verify to recompute it and what was derived from it")
        return data

    # ------------------------------------------------------------ Parquet

    def write_table(self, rel: str, table: pa.Table, *, table_name: str, run_id: str,
                    row_group_size: int | None = None) -> tuple[int, str]:
        """Write `table` as Parquet (zstd 1, BSS on float vectors, refdir metadata); returns (rows, sha256)."""
        _check_columns(table, table_name)
        if table_name == "activations":
            table = _layer_major(table)
        table = table.replace_schema_metadata(with_metadata(table.schema, table_name, run_id).metadata)
        if row_group_size is None:
            # activations: one layer per row group (single-layer scans skip the rest); small tables: one group
            row_group_size = _rows_per_layer(table) if table_name == "activations" else max(table.num_rows, 1)
        bss = _bss_columns(table.schema)
        plain = [f.name for f in table.schema if not pa.types.is_nested(f.type)]
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", compression_level=1, row_group_size=row_group_size,
                       use_byte_stream_split=bss or False, use_dictionary=plain or False)
        buf = sink.getvalue()
        digest = hashlib.sha256(memoryview(buf)).hexdigest()
        self.write_bytes(rel, memoryview(buf))
        return table.num_rows, digest

    def read_table(self, rel: str, columns: list[str] | None = None, sha256: str | None = None) -> pa.Table:
        """Read a refdir Parquet file; SchemaVersionError when its schema version is not this code's.

        With `sha256` (from the file's marker or manifest) the bytes are checked first (CorruptFile)."""
        if sha256 is not None:
            source: Any = pa.BufferReader(self.read_verified(rel, sha256))
        elif self.is_local:
            source: Any = self._path(rel)
            if not os.path.exists(source):
                raise FileNotFoundError(f"{source} does not exist")
        else:
            source = pa.BufferReader(self.read_bytes(rel))
        pf = pq.ParquetFile(source)
        check_metadata(pf.schema_arrow, self.url(rel))
        return pf.read(columns=columns)

    # ------------------------------------------------------------ commit protocol

    def commit(self, data_rel: str, table: pa.Table, marker_rel: str, *, table_name: str, run_id: str,
               job_id: str, **extra: Any) -> Receipt:
        """Write the data object, then its done-marker {job_id, data, rows, sha256, written_at, **extra}.

        `extra` carries the job's `input_digest` (what the marker vouches for) and further `<k>`/`<k>_sha256`
        pairs of objects the job wrote before (verify() checks them all)."""
        t0 = time.perf_counter()
        rows, digest = self.write_table(data_rel, table, table_name=table_name, run_id=run_id)
        self.write_marker(marker_rel, job_id=job_id, data=data_rel, rows=rows, sha256=digest, **extra)
        seconds = extra.get("seconds")   # the job's own time when the caller measured it, else the write's
        return Receipt(job_id=job_id, uri=self.url(data_rel), rows=rows, sha256=digest,
                       seconds=float(seconds) if seconds is not None else time.perf_counter() - t0)

    def write_marker(self, marker_rel: str, **fields: Any) -> str:
        """A done-marker or manifest, written last: the objects it names (with their sha256) are committed."""
        _WARNED.discard(self.url(marker_rel))
        journal, self._journal = self._journal, None    # a marker is never one of the files a manifest lists
        try:
            return self.write_json(marker_rel, {**fields, "written_at": datetime.now(timezone.utc).isoformat()})
        finally:
            self._journal = journal

    def receipt_if_done(self, marker_rel: str, job_id: str, input_digest: str | None = None) -> Receipt | None:
        """The receipt of a job whose done-marker exists and vouches for `input_digest` (it is skipped), else None."""
        done = self.marker(marker_rel)
        if done is None or (input_digest is not None and done.get("input_digest") != input_digest):
            return None
        return Receipt(job_id=job_id, uri=self.url(done["data"]), rows=done["rows"], sha256=done["sha256"], skipped=True)

    def marker(self, marker_rel: str) -> dict | None:
        """The marker's content, or None when there is none (or it is unreadable: one warning line)."""
        try:
            obj = self.read_json(marker_rel)
        except FileNotFoundError:
            return None
        except ValueError as e:
            if self.url(marker_rel) not in _WARNED:
                _WARNED.add(self.url(marker_rel))
                logger.warning("unreadable marker or manifest %s (truncated? %s); treating it as absent",
                               self.url(marker_rel), str(e).splitlines()[0][:80])
            return None
        return obj if isinstance(obj, dict) else None

    @staticmethod
    def recorded_files(m: dict) -> dict[str, str]:
        """{path: sha256} of every object a marker or manifest vouches for: its `files` and `<k>`/`<k>_sha256` pairs."""
        out = {rel: sha for rel, sha in (m.get("files") or {}).items() if isinstance(rel, str) and isinstance(sha, str)}
        for k, sha in m.items():
            key = "data" if k == "sha256" else k[:-7] if k.endswith("_sha256") else None
            if key and isinstance(m.get(key), str) and isinstance(sha, str):
                out[m[key]] = sha
        return out

    def bad_files(self, files: dict[str, str]) -> list[str]:
        """The paths among {path: sha256} that are missing or whose bytes differ (each named in one warning)."""
        bad = []
        for rel, want in sorted(files.items()):
            try:
                got = hashlib.sha256(self.read_bytes(rel)).hexdigest()
            except FileNotFoundError:
                logger.warning("corrupt: %s is missing", self.url(rel))
                bad.append(rel)
                continue
            if got != want:
                logger.warning("corrupt: %s has sha256 %s, recorded %s", self.url(rel), got[:12], want[:12])
                bad.append(rel)
        return bad

    def verify(self, marker_rel: str) -> bool:
        """True when the marker exists, names at least one object, and every object it names matches."""
        m = self.marker(marker_rel)
        if m is None:
            return False
        files = self.recorded_files(m)
        if not files:
            logger.warning("corrupt marker %s: it records no object with a sha256", self.url(marker_rel))
            return False
        return not self.bad_files(files)

    def done_jobs(self, markers_dir_rel: str, *, verify: bool = False) -> dict[str, dict]:
        """Marker file stem -> marker for every marker in a folder; with verify, corrupt ones are left out."""
        done: dict[str, dict] = {}
        corrupt: list[str] = []
        for rel in self.glob(f"{markers_dir_rel.rstrip('/')}/*.json"):
            stem = rel.rsplit("/", 1)[-1][: -len(".json")]
            if verify and not self.verify(rel):
                corrupt.append(stem)
                continue
            m = self.marker(rel)
            if m is not None:
                done[stem] = m
        if corrupt:
            logger.warning("%d corrupt shard(s) under %s will be recomputed: %s", len(corrupt),
                           self.url(markers_dir_rel), ", ".join(corrupt[:10]) + (" ..." if len(corrupt) > 10 else ""))
        return done

    # ------------------------------------------------------------ listing

    def glob(self, pattern_rel: str) -> list[str]:
        """Store-relative paths matching a glob (sorted); '*' does not cross '/'."""
        try:
            hits = self.fs.glob(self._path(pattern_rel))
        except FileNotFoundError:
            return []
        except Exception as e:  # noqa: BLE001
            raise self._store_error(e, f"listing {pattern_rel} in") from None
        return sorted(self._rel(h) for h in hits if not h.rsplit("/", 1)[-1].startswith(".tmp-"))

    def list_files(self, prefix_rel: str = "") -> list[str]:
        """Every file under a store-relative folder (one recursive listing), store-relative and sorted."""
        base = self._path(prefix_rel) if prefix_rel.strip("/") else self._root
        try:
            hits = self.fs.find(base)
        except FileNotFoundError:
            return []
        except Exception as e:  # noqa: BLE001
            raise self._store_error(e, f"listing {prefix_rel or '/'} in") from None
        return sorted(self._rel(h) for h in hits if not h.rsplit("/", 1)[-1].startswith(".tmp-"))

    def delete(self, rel: str, recursive: bool = False) -> None:
        """Remove an object (or a folder with recursive=True); missing paths are fine."""
        path = self._path(rel)
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            raise self._store_error(e, f"deleting {rel} from") from None

    # ------------------------------------------------------------ DuckDB

    def duckdb_connect(self):
        """A DuckDB connection that can read this store (s3: the fsspec filesystem is registered)."""
        import duckdb

        con = duckdb.connect()
        if not self.is_local:
            con.register_filesystem(self.fs)
        return con


# ---------------------------------------------------------------- Parquet helpers

def _check_columns(table: pa.Table, table_name: str) -> None:
    """Known tables must have exactly their schema's columns (names; sizes and dtypes may vary)."""
    if table_name not in TABLES:
        return
    factory = TABLES[table_name]
    want = (factory(1) if table_name == "activations" else factory()).names
    missing = [c for c in want if c not in table.column_names]
    extra = [c for c in table.column_names if c not in want]
    if missing or extra:
        raise ValueError(f"table {table_name!r}: missing columns {missing}, unexpected columns {extra}; "
                         f"build it with refdir.schemas.tables.{table_name}_schema()")


def _bss_columns(schema: pa.Schema) -> list[str]:
    """Leaf paths of float32/float64 list columns, e.g. 'vector.list.element' (not float16)."""
    out = []
    for f in schema:
        if (pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type) or pa.types.is_large_list(f.type)) \
                and f.type.value_type in _FLOAT_BSS:
            out.append(f"{f.name}.list.element")
    return out


def _layer_major(table: pa.Table) -> pa.Table:
    """Sort rows by layer (stable) unless they already are: single-layer scans then skip row groups."""
    layer = table.column("layer")
    if table.num_rows < 2 or pc.all(pc.greater_equal(layer[1:], layer[:-1])).as_py():
        return table
    return table.take(pc.sort_indices(table, sort_keys=[("layer", "ascending")]))


def _rows_per_layer(table: pa.Table) -> int | None:
    """Row-group size that puts one layer per row group in a layer-major table (None: pyarrow default)."""
    if "layer" not in table.column_names or table.num_rows == 0:
        return None
    counts = pc.value_counts(table.column("layer")).field("counts")
    return max(int(pc.max(counts).as_py()), 1)
