"""Liveness and failure records per model: a heartbeat while a stage runs, the traceback when it fails.

    with Heartbeat(store, run_id, "organism") as hb:
        hb.stage("extract"); ...                  # rewritten every `interval` s by a thread while it runs
    record_failure(store, run_id, "organism", "select", exc)    # error.log + heartbeat state "failed"
    health(store, run_id, "organism") -> {"state": "running" | "stale" | "failed" | "finished", ...} or None

`runs/RUN_ID/MODEL/_heartbeat.json` holds {state, stage, host, pid, started_at, updated_at} and, after a
failure, {error (first line), failed_at, log}; `error.log` next to it holds the full traceback. A heartbeat
that says "running" but has not been refreshed for `stale_after` seconds belongs to a driver that died.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import traceback
from datetime import datetime, timezone

from refdir.schemas import layout

logger = logging.getLogger(__name__)
STALE_AFTER_S = 600


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(s: str) -> datetime:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


class Heartbeat:
    """Context manager: a daemon thread rewrites the heartbeat every `interval` seconds until exit."""

    def __init__(self, store, run_id: str, model: str, interval: float = 30.0):
        self.store, self.rel, self.interval = store, layout.heartbeat(run_id, model), interval
        self.doc = {"state": "running", "stage": None, "host": socket.gethostname(), "pid": os.getpid(),
                    "started_at": _iso(_now())}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"refdir-heartbeat-{model}", daemon=True)

    @property
    def current(self) -> str | None:
        return self.doc["stage"]

    def stage(self, name: str) -> None:
        self.doc["stage"] = name
        self._write()

    def _write(self) -> None:
        try:
            self.store.write_json(self.rel, {**self.doc, "updated_at": _iso(_now())})
        except Exception as e:  # noqa: BLE001 - a missed beat must never fail the run
            logger.warning("heartbeat %s not written: %s", self.rel, e)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()

    def __enter__(self) -> "Heartbeat":
        self._write()
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if exc is None:
            self.doc["state"] = "finished"
            self._write()


def record_failure(store, run_id: str, model: str, stage: str | None, error: BaseException | str) -> str:
    """Write error.log (the full traceback, or the message) and mark the heartbeat failed; returns the log URL."""
    if isinstance(error, BaseException):
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        first = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    else:
        text, first = str(error), (str(error).strip().splitlines() or ["failed"])[0]
    log_rel = layout.error_log(run_id, model)
    at = _iso(_now())
    try:
        store.write_bytes(log_rel, f"{at} model {model} failed in stage {stage}\n\n{text}\n".encode())
        prev = store.read_json(layout.heartbeat(run_id, model)) if store.exists(layout.heartbeat(run_id, model)) else {}
        store.write_json(layout.heartbeat(run_id, model), {**prev, "state": "failed", "stage": stage, "error": first,
                                                           "failed_at": at, "updated_at": at, "log": store.url(log_rel)})
    except Exception as e:  # noqa: BLE001 - the failure itself is reported in the summary either way
        logger.warning("could not record the failure of %s in the store: %s", model, e)
    return store.url(log_rel)


def health(store, run_id: str, model: str, stale_after: float = STALE_AFTER_S, now: datetime | None = None) -> dict | None:
    """The model's heartbeat with `state` made honest: "stale" when a running beat is older than stale_after."""
    rel = layout.heartbeat(run_id, model)
    if not store.exists(rel):
        return None
    doc = store.read_json(rel)
    age = ((now or _now()) - _parse(doc["updated_at"])).total_seconds() if doc.get("updated_at") else None
    doc["age_s"] = age
    if doc.get("state") == "running" and age is not None and age > stale_after:
        doc["state"] = "stale"
    return doc
