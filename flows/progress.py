"""Progress and log output of the CLI: rich bars in a terminal, log lines (text or JSON) to stderr always.

    setup_logging("text" | "json", tty=sys.stderr.isatty())   # once, in the CLI (never at import)
    with make_reporter() as rep:  set_progress(rep); ...
    rep.start("organism", "extract", planned=8, done=3); rep.advance("organism", "extract")

refdir's loggers (`refdir.*`) get their own stderr handler and do not propagate, so Prefect resetting the
root logger to WARNING on import cannot silence them. Stage start / finish lines come from the flows;
the reporter adds job counts with rate and ETA every `every` seconds (and at a stage's last job). On a
terminal the counts are rich bars instead; without one, tqdm bars (transformers, hub) are switched off.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime, timezone

logger = logging.getLogger("refdir.progress")

# records from these Prefect loggers at ERROR carry the full traceback a second and third time; refdir
# writes it to runs/RUN_ID/MODEL/error.log and prints one line per failed model instead
_PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
_QUIET = {"httpx": logging.WARNING, "urllib3": logging.WARNING, "botocore": logging.WARNING, "s3fs": logging.WARNING,
          "filelock": logging.WARNING,
          # Ray 2.60 turns on token auth for every new local cluster and says so on each start; a local
          # cluster needs nothing from the user (the token lands in ~/.ray/auth_token), see README "Clusters"
          "ray._private.authentication.authentication_token_setup": logging.ERROR}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now, so log lines go above rich's progress bars (which redirect it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, plus a record's `fields` (progress counts)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        doc.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class _DropRunTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith(_PREFECT_RUN_LOGGERS) and record.levelno >= logging.ERROR)


def setup_logging(fmt: str = "text", level: str | None = None, tty: bool | None = None) -> logging.Handler:
    """Give the `refdir` logger its own stderr handler (text or JSON); quiet chatty libraries; no tqdm off a TTY."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format {fmt!r}: use text or json")
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("refdir")
    for h in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level or os.environ.get("REFDIR_LOG", "INFO"))
    root.propagate = False
    for name, lvl in _QUIET.items():
        logging.getLogger(name).setLevel(lvl)
    if not (sys.stderr.isatty() if tty is None else tty) or fmt == "json":
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")   # transformers' bars follow the hub's switch
        os.environ.setdefault("TQDM_DISABLE", "1")                   # every other tqdm, Ray workers included
    return handler


def quiet_prefect_tracebacks() -> None:
    """After Prefect's import-time logging setup: keep its flow/task-run ERROR records (tracebacks) off the
    console handlers; they still reach the Prefect API, and refdir's own error.log has the traceback."""
    import prefect  # noqa: F401 - its import configures logging; the filter goes on the handlers it made

    for h in logging.getLogger().handlers:
        if not any(isinstance(f, _DropRunTracebacks) for f in h.filters):
            h.addFilter(_DropRunTracebacks())


def _fmt_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class LogReporter:
    """Job counts as log lines: 'organism extract: 4/8 jobs, 0.52 jobs/s, ETA 8s', every `every` seconds."""

    def __init__(self, every: float | None = None):
        self.every = float(os.environ.get("REFDIR_PROGRESS_EVERY", 30) if every is None else every)
        self._state: dict[tuple[str, str], dict] = {}

    def start(self, model: str, stage: str, planned: int, done: int) -> None:
        now = time.monotonic()
        self._state[(model, stage)] = {"done": done, "planned": planned, "first": done, "t0": now, "last": now}
        self._line(model, stage, self._state[(model, stage)], "jobs (already done)" if done else "jobs")

    def advance(self, model: str, stage: str) -> None:
        s = self._state.setdefault((model, stage), {"done": 0, "planned": 0, "first": 0, "t0": time.monotonic(),
                                                   "last": 0.0})
        s["done"] += 1
        now = time.monotonic()
        if s["done"] >= s["planned"] or now - s["last"] >= self.every:
            s["last"] = now
            self._line(model, stage, s, "jobs")

    def _line(self, model: str, stage: str, s: dict, what: str) -> None:
        elapsed = time.monotonic() - s["t0"]
        new = s["done"] - s["first"]
        rate = new / elapsed if elapsed > 0 and new > 0 else None
        eta = (s["planned"] - s["done"]) / rate if rate else None
        fields = {"model": model, "stage": stage, "done": s["done"], "planned": s["planned"],
                  "rate_jobs_per_s": None if rate is None else round(rate, 4),
                  "eta_s": None if eta is None else round(eta, 1)}
        tail = "" if rate is None else f", {rate:.2f} jobs/s, ETA {_fmt_eta(eta)}"
        logger.info("%s %s: %d/%d %s%s", model, stage, s["done"], s["planned"], what, tail, extra={"fields": fields})

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class RichReporter(LogReporter):
    def __init__(self):
        super().__init__()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), transient=False)
        self._tasks: dict[tuple[str, str], int] = {}

    def start(self, model: str, stage: str, planned: int, done: int) -> None:
        key = (model, stage)
        if key not in self._tasks:
            self._tasks[key] = self._progress.add_task(f"{model} {stage}", total=planned)
        self._progress.update(self._tasks[key], total=planned, completed=done)

    def advance(self, model: str, stage: str) -> None:
        if (model, stage) in self._tasks:
            self._progress.advance(self._tasks[(model, stage)])

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()


def make_reporter(plain: bool | None = None) -> LogReporter:
    if plain is None:
        plain = not sys.stderr.isatty()
    return LogReporter() if plain else RichReporter()
