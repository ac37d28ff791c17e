"""What one CLI run starts besides itself, and how Ctrl-C / SIGTERM ends it cleanly.

    with run_session():          # SIGINT/SIGTERM -> stop submitting, cancel jobs; on exit stop what we started
        execute(spec)            # pipeline.ensure_prefect_env() calls ensure_prefect_api() when it needs Prefect

- `ensure_prefect_api()`: with no PREFECT_API_URL, starts a temporary Prefect API server the way Prefect's
  own ephemeral mode does (uvicorn on `prefect.server.api.server:create_app`, UI off), but in its OWN session
  (process group): a Ctrl-C in the terminal reaches the driver, not the server, so the driver can still
  record its flow states instead of retrying HTTP to a dead server for minutes.
- `run_session()`: the first SIGINT/SIGTERM asks every worker pool to cancel its in-flight jobs and kill its
  actors (workers/pool.request_stop) and interrupts the driver; on the way out the session stops the
  temporary Prefect server and the local Ray cluster this process started, then raises `RunInterrupted`
  (the CLI prints one line and exits 130). Finished jobs keep their markers: rerunning resumes exactly.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from refdir.workers.pool import clear_stop, request_stop, stop_requested

logger = logging.getLogger(__name__)

_STACK = contextlib.ExitStack()     # services started by this process, stopped by stop_services()


class RunInterrupted(RuntimeError):
    """The run was stopped by SIGINT/SIGTERM; what finished is kept."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group of `proc` (its own session), SIGKILL what is left after `grace` s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def _await_health(proc: subprocess.Popen, url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the temporary Prefect API server exited with code {proc.returncode}")
        if stop_requested():
            raise KeyboardInterrupt
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the temporary Prefect API server did not answer within {timeout:g} s; start one "
                       "(`prefect server start`) and set PREFECT_API_URL")


def _drain_prefect(timeout: float = 2.0) -> None:
    """Send Prefect's queued logs and events before its server stops (else they fail noisily at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout, at_exit=False)


def ensure_prefect_api(timeout: float = 90.0) -> str | None:
    """The Prefect API URL in use; with none configured, a temporary server in its own process group."""
    import prefect
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        return PREFECT_API_URL.value()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
           "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
           "--lifespan", "on"]
    logger.info("starting a temporary Prefect API server on 127.0.0.1:%d (set PREFECT_API_URL to use your own)", port)
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            start_new_session=True)
    if not _STACK._exit_callbacks:  # noqa: SLF001 - first service of this process: stop them all at exit too
        atexit.register(stop_services)
    _STACK.callback(_stop_group, proc)
    _STACK.callback(_drain_prefect)          # runs first: flush Prefect's logs/events while the server is up
    _await_health(proc, url[: -len("/api")] + "/api", timeout)
    _STACK.enter_context(temporary_settings(updates={PREFECT_API_URL: url}))
    return url


def stop_services() -> None:
    """Stop what this process started for the run: the temporary Prefect server, the local Ray cluster."""
    from refdir.flows.cluster import shutdown_local_ray

    try:
        _STACK.close()
    finally:
        shutdown_local_ray()


def _on_signal(signum, _frame) -> None:
    if stop_requested():
        return                                      # already stopping: a second Ctrl-C changes nothing
    request_stop()
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def run_session() -> Iterator[None]:
    """Signals stop the run (see module doc); on exit the run's services stop; RunInterrupted if stopped."""
    clear_stop()
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    interrupted = False
    try:
        yield
    except BaseException as e:
        if not (isinstance(e, KeyboardInterrupt) or stop_requested()):
            raise
        interrupted = True                              # whatever a stopped run raised on its way out
    finally:
        for s in old:                                   # a signal during clean-up is ignored, not half-handled
            signal.signal(s, signal.SIG_IGN)
        try:
            stop_services()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    if interrupted or stop_requested():
        clear_stop()
        raise RunInterrupted("interrupted: in-flight jobs cancelled, finished jobs kept; run the same command again "
                             "(or `refdir resume RUN_ID`) to resume")
