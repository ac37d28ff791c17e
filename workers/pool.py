"""Feed jobs to a pool of model actors and tell infrastructure failures from application errors.

    results = run_jobs(actors, "extract", jobs, max_retries=2, on_done=progress)

Each actor gets at most `inflight` calls at a time. An infrastructure failure (the actor died, its node
was lost, an object was lost) resubmits the job — Ray may already have restarted the actor and retried
the call; jobs are idempotent so a repeat only finds its marker — up to `max_retries` times per job. An
application error (the job itself raised) is not retried: it is collected, the other jobs finish, and
`JobsFailed` names every failed job id with its first error line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)


class JobsFailed(RuntimeError):
    def __init__(self, stage: str, failures: dict[str, str]):
        self.failures = failures
        lines = "\n".join(f"  {job}: {err}" for job, err in sorted(failures.items()))
        super().__init__(f"{len(failures)} {stage} job(s) failed:\n{lines}")


def _infra_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rx

    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
             "ObjectLostError", "OwnerDiedError", "LocalRayletDiedError")
    return tuple(getattr(rx, n) for n in names if hasattr(rx, n))


def _first_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    text = f"{type(cause).__name__}: {cause}"
    return text.strip().splitlines()[0][:300] if text.strip() else type(cause).__name__


def run_jobs(actors: Sequence, method: str, jobs: Sequence, *, max_retries: int = 2, inflight: int = 1,
             on_done: Callable[[object], None] | None = None, args: tuple = ()) -> list:
    """Run `actor.<method>.remote(job, *args)` for every job; return results in job order."""
    import ray

    if not actors:
        raise ValueError("no actors to run jobs on")
    infra = _infra_errors()
    results: list = [None] * len(jobs)
    pending = list(range(len(jobs)))[::-1]
    attempts = [0] * len(jobs)
    failures: dict[str, str] = {}
    running: dict = {}                 # ObjectRef -> (job index, actor index)
    load = [0] * len(actors)

    def submit() -> None:
        while pending:
            free = [a for a in range(len(actors)) if load[a] < inflight]
            if not free:
                return
            a = min(free, key=lambda i: load[i])
            i = pending.pop()
            running[getattr(actors[a], method).remote(jobs[i], *args)] = (i, a)
            load[a] += 1

    submit()
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        i, a = running.pop(ready[0])
        load[a] -= 1
        job_id = getattr(jobs[i], "job_id", str(i))
        try:
            results[i] = ray.get(ready[0])
            if on_done:
                on_done(results[i])
        except infra as e:
            attempts[i] += 1
            if attempts[i] > max_retries:
                failures[job_id] = f"infrastructure failure after {max_retries} retries: {_first_line(e)}"
            else:
                logger.warning("%s: infrastructure failure (%s), retry %d/%d", job_id, _first_line(e), attempts[i], max_retries)
                pending.append(i)
        except Exception as e:  # noqa: BLE001 - application error inside the job: collected, named, not retried
            failures[job_id] = _first_line(e)
        submit()
    if failures:
        raise JobsFailed(method, failures)
    return results
