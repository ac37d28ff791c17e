"""Supervised model actors: start them with a timeout, feed them jobs, replace the dead, stop on request.

    pool = WorkerPool(lambda: Worker.remote(model, store), n=2, max_retries=2, start_timeout=600)
    info = pool.start()                              # every actor answered ping() (or ActorStartError)
    results = pool.run("extract", jobs, inflight=2, on_done=progress)
    pool.close()                                     # kills its actors; a later run() starts fresh ones

Supervision, datatrove-style (infrastructure failures are retried, application errors are not):
- an infrastructure failure (the actor died and Ray's own restarts are spent, its node was lost, an object
  was lost) replaces that actor with a NEW one (fresh restart budget) and resubmits the job after a backoff
  (0.5 s, 1 s, 2 s, ... capped at 10 s) to a live actor, up to `max_retries` times per job; jobs are
  idempotent, so a repeat only finds its marker;
- an application error (the job itself raised) is collected; the other jobs finish and `JobsFailed` names
  every failed job with its first error line;
- a store error (`StoreError`: the store is unreachable or refuses) stops new submissions; the failed job
  is retried with backoff for at most `outage_seconds`, then the stage fails with ONE line (`StoreOutage`)
  and its in-flight jobs are cancelled, instead of every remaining job failing one by one over minutes;
- `request_stop()` (SIGINT/SIGTERM in the CLI) makes every running pool cancel its in-flight jobs, kill its
  actors and raise `Interrupted` within about a second.
When run() raises, the pool has closed itself, so a stage retry starts fresh actors.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)

_STOP = threading.Event()
_POLL = 0.5    # seconds between checks of the stop flag while jobs run


class JobsFailed(RuntimeError):
    def __init__(self, stage: str, failures: dict[str, str]):
        self.failures = failures
        lines = "\n".join(f"  {job}: {err}" for job, err in sorted(failures.items())[:20])
        more = f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else ""
        super().__init__(f"{len(failures)} {stage} job(s) failed:\n{lines}{more}")


class StoreOutage(RuntimeError):
    """The store stayed unusable for the whole retry window; one line says which store error."""


class ActorStartError(RuntimeError):
    """An actor did not start: its constructor raised, or it was not scheduled within the timeout."""


class Interrupted(RuntimeError):
    """request_stop() was called (SIGINT/SIGTERM): in-flight jobs were cancelled, actors killed."""


def request_stop() -> None:
    """Ask every running pool to cancel its jobs and stop (thread-safe; the CLI's signal handler calls it)."""
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


def clear_stop() -> None:
    _STOP.clear()


def _infra_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rx

    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
             "ObjectLostError", "OwnerDiedError", "LocalRayletDiedError")
    return tuple(getattr(rx, n) for n in names if hasattr(rx, n))


def _first_line(e: BaseException, limit: int = 300) -> str:
    cause = getattr(e, "cause", None) or e
    text = f"{type(cause).__name__}: {cause}".strip()
    return text.splitlines()[0][:limit] if text else type(cause).__name__


def _root_line(e: BaseException, limit: int = 1000) -> str:
    """The original exception's line inside a Ray error that quotes a remote traceback ('XError: ...')."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    hits = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): ", ln)]
    return (hits[-1] if hits else _first_line(e, limit))[:limit]


def _is_store_error(e: BaseException) -> bool:
    from refdir.workers.store import StoreError

    return isinstance(e, StoreError) or isinstance(getattr(e, "cause", None), StoreError)


def backoff(attempt: int, base: float = 0.5, cap: float = 10.0) -> float:
    """Seconds to wait before retry `attempt` (1, 2, ...): 0.5, 1, 2, 4, 8, 10, 10, ..."""
    return min(cap, base * 2 ** max(attempt - 1, 0))


class WorkerPool:
    """`n` actors made by `factory()`, supervised (see module doc)."""

    def __init__(self, factory: Callable[[], object], n: int, *, max_retries: int = 2, start_timeout: float = 600.0,
                 outage_seconds: float = 60.0, label: str = "workers"):
        if n < 1:
            raise ValueError("a pool needs at least one actor")
        self.factory, self.n, self.label = factory, n, label
        self.max_retries, self.start_timeout, self.outage_seconds = max_retries, start_timeout, outage_seconds
        self.handles: list = []
        self.info: dict | None = None
        self.replaced = 0          # actors replaced after dying (for logs and tests)

    # ---- life cycle ---------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return not self.handles

    def start(self) -> dict:
        """Create the actors and wait (at most start_timeout s) until each answers ping(); its first answer."""
        if self.handles:
            return self.info or {}
        handles = [self.factory() for _ in range(self.n)]
        try:
            infos = self._await_ping(handles)
        except BaseException:
            _kill(handles)
            raise
        self.handles, self.info = handles, infos[0]
        return self.info

    def _await_ping(self, handles: list) -> list[dict]:
        import ray

        refs = [h.ping.remote() for h in handles]
        deadline = time.monotonic() + self.start_timeout
        pending = list(refs)
        while pending:
            _check_stop()
            left = deadline - time.monotonic()
            if left <= 0:
                raise ActorStartError(
                    f"{self.label}: {len(pending)} of {len(refs)} actor(s) did not start within {self.start_timeout:g} s "
                    "(not enough free CPUs/GPUs on the cluster, or the model loads slowly: see compute.cpus_per_worker, "
                    "compute.gpus_per_worker and compute.actor_start_timeout)")
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(_POLL, left))
        try:
            return ray.get(refs)
        except Exception as e:  # noqa: BLE001 - the constructor (model load) raised: say what, not where in Ray
            raise ActorStartError(f"{self.label}: an actor failed to start: {_root_line(e)}") from None

    def close(self) -> None:
        _kill(self.handles)
        self.handles = []

    def replace(self, index: int) -> None:
        """Kill actor `index` (dead or not) and start a new one in its place (fresh restart budget)."""
        _kill([self.handles[index]])
        new = self.factory()
        self._await_ping([new])
        self.handles[index] = new
        self.replaced += 1
        logger.warning("%s: actor %d replaced by a new one (%d replaced so far)", self.label, index, self.replaced)

    # ---- running jobs -------------------------------------------------------------------------
    def call(self, method: str, *args):
        """`actor.<method>.remote(*args)` once on a live actor, supervised like run() (per-model work: damage)."""
        return self.run(method, [args], unpack=True)[0]

    def run(self, method: str, jobs: Sequence, *, inflight: int = 1, on_done: Callable[[object], None] | None = None,
            args: tuple = (), unpack: bool = False) -> list:
        """`actor.<method>.remote(job, *args)` (`*job, *args` with unpack) for every job on live actors;
        results in job order."""
        self.start()
        try:
            return _Run(self, method, jobs, inflight, on_done, args, unpack).loop()
        except BaseException:
            self.close()      # a stage retry (or the next stage) starts fresh actors
            raise


class _Run:
    """The bookkeeping of one WorkerPool.run()."""

    def __init__(self, pool: WorkerPool, method: str, jobs: Sequence, inflight: int, on_done, args: tuple, unpack: bool):
        self.pool, self.method, self.jobs, self.inflight = pool, method, jobs, max(1, inflight)
        self.on_done, self.args, self.unpack = on_done, args, unpack
        self.results: list = [None] * len(jobs)
        self.pending = list(range(len(jobs)))[::-1]
        self.attempts = [0] * len(jobs)
        self.not_before = [0.0] * len(jobs)       # monotonic time before which a retried job waits
        self.failures: dict[str, str] = {}
        self.running: dict = {}                   # ObjectRef -> (job index, actor index, actor handle)
        self.load = [0] * pool.n
        self.outage_since: float | None = None
        self.probe: int | None = None             # the job that retries the store during an outage
        self.infra = _infra_errors()

    def _job_id(self, i: int) -> str:
        return getattr(self.jobs[i], "job_id", None) or f"{self.method}[{i}]"

    def submit(self) -> None:
        now = time.monotonic()
        ready = [i for i in self.pending if self.not_before[i] <= now]
        if self.outage_since is not None:        # during an outage only the last failed job probes the store
            ready = [self.probe] if not self.running and self.probe in ready else []
        for i in ready[::-1]:
            free = [a for a in range(self.pool.n) if self.load[a] < self.inflight]
            if not free:
                return
            a = min(free, key=lambda k: self.load[k])
            self.pending.remove(i)
            handle = self.pool.handles[a]
            payload = tuple(self.jobs[i]) if self.unpack else (self.jobs[i],)
            ref = getattr(handle, self.method).remote(*payload, *self.args)
            self.running[ref] = (i, a, handle)
            self.load[a] += 1
            if self.outage_since is not None:
                return

    def loop(self) -> list:
        import ray

        self.submit()
        while self.running or self.pending:
            _check_stop(self.running)
            if not self.running:
                waiting = [self.probe] if self.outage_since is not None else self.pending
                time.sleep(min(_POLL, max(0.0, min(self.not_before[i] for i in waiting) - time.monotonic())))
                self.submit()
                continue
            ready, _ = ray.wait(list(self.running), num_returns=1, timeout=_POLL)
            for ref in ready:
                self.finish(ref)
            self.submit()
        if self.failures:
            raise JobsFailed(self.method, self.failures)
        return self.results

    def finish(self, ref) -> None:
        import ray

        i, a, handle = self.running.pop(ref)
        self.load[a] -= 1
        try:
            self.results[i] = ray.get(ref)
        except self.infra as e:
            self.infra_failure(i, a, handle, e)
            return
        except Exception as e:  # noqa: BLE001 - job errors: store outages wait, the rest is collected
            if _is_store_error(e):
                self.store_failure(i, e)
            else:
                self.failures[self._job_id(i)] = _first_line(e)
            return
        self.outage_since = self.probe = None
        if self.on_done:
            self.on_done(self.results[i])

    def infra_failure(self, i: int, a: int, handle, e: BaseException) -> None:
        self.attempts[i] += 1
        if self.pool.handles[a] is handle:        # first news of this actor's death: replace it once
            self.pool.replace(a)
        if self.attempts[i] > self.pool.max_retries:
            self.failures[self._job_id(i)] = f"infrastructure failure after {self.pool.max_retries} retries: {_first_line(e)}"
            return
        wait = backoff(self.attempts[i])
        logger.warning("%s: infrastructure failure (%s); retry %d/%d on a live actor in %.1f s", self._job_id(i),
                       _first_line(e), self.attempts[i], self.pool.max_retries, wait)
        self.not_before[i] = time.monotonic() + wait
        self.pending.append(i)

    def store_failure(self, i: int, e: BaseException) -> None:
        now = time.monotonic()
        self.outage_since = self.outage_since or now
        if now - self.outage_since >= self.pool.outage_seconds:
            _cancel(self.running)
            undone = len(self.pending) + len(self.running) + 1
            raise StoreOutage(f"{self.pool.label}: the store failed for {now - self.outage_since:.0f} s during "
                              f"{self.method} ({undone} job(s) not done; rerun to resume): {_first_line(e)}")
        self.attempts[i] += 1
        self.probe = i
        wait = backoff(self.attempts[i], base=1.0)
        logger.warning("%s: store error (%s); holding new jobs, retry in %.0f s (gives up after %g s)",
                       self._job_id(i), _first_line(e, 200), wait, self.pool.outage_seconds)
        self.not_before[i] = now + wait
        self.pending.append(i)


def _check_stop(running: dict | None = None) -> None:
    if _STOP.is_set():
        if running:
            _cancel(running)
        raise Interrupted("stopped on request (SIGINT/SIGTERM); finished jobs are kept, rerun to resume")


def _cancel(running: dict) -> None:
    import ray

    for ref in list(running):
        try:
            ray.cancel(ref)
        except Exception:  # noqa: BLE001 - already finished or its actor is gone
            pass


def _kill(handles: Sequence) -> None:
    import ray

    for h in handles:
        try:
            ray.kill(h, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
