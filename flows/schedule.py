"""Overnight schedules: a Prefect deployment of the run flow that makes a new run each night.

    schedule_spec(spec, "0 2 * * *", timezone="Europe/Berlin")              # serve here (blocks; Ctrl-C)
    schedule_spec(spec, "0 2 * * *", serve=False, work_pool="refdir")      # register; a worker runs it
    resolve_name(spec, when)      # "nightly-{date}" -> "nightly-2026-12-03" (the trigger's date)

A spec's `name` may hold {date} (YYYY-MM-DD), {time} (HHMM) or {datetime} (YYYY-MM-DDTHHMM): resolved
when a run is triggered (the scheduled start time, in the schedule's timezone), so each night is a new
run id. A plain name gives the same run id every night, which resumes (and so, once done, does nothing).
One trigger can also name its run outright: `prefect deployment run refdir-run/NAME -p run_name=redo-1`.

The production path is a deployment registered on a work pool (`--register-only --work-pool NAME`) and
run by a Prefect worker (`prefect worker start --pool NAME`, started by infra/compose); `refdir schedule`
without --register-only serves the deployment from this process, for a single machine.

The deployment's parameters hold the spec as JSON without store secrets: a scheduled run takes S3
credentials from the environment of the process that runs it (AWS_ACCESS_KEY_ID, ...). One run at a
time per deployment (concurrency limit 1), so a slow night never overlaps the next.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone as dt_timezone

from refdir.schemas.spec import RunSpec

logger = logging.getLogger(__name__)

NAME_FIELDS = {"date": "%Y-%m-%d", "time": "%H%M", "datetime": "%Y-%m-%dT%H%M"}


class ScheduleError(RuntimeError):
    """A schedule cannot be made (no Prefect API to register with, bad timezone, ...)."""


def is_template(name: str) -> bool:
    return any("{" + k + "}" in name for k in NAME_FIELDS)


def resolve_name(spec: RunSpec, when: datetime | None = None, run_name: str | None = None) -> RunSpec:
    """The spec with its run name for this trigger: `run_name` if given, else the template filled from `when`."""
    if run_name:
        name = run_name
    elif is_template(spec.name):
        when = when or datetime.now().astimezone()
        name = spec.name
        for k, fmt in NAME_FIELDS.items():
            name = name.replace("{" + k + "}", when.strftime(fmt))
    else:
        return spec
    return spec.model_copy(update={"name": name})


def trigger_time(when: str | datetime | None, tz: str | None) -> datetime:
    """The moment a run was triggered: `when` if given (ISO date or datetime), else the flow run's scheduled
    start (Prefect runtime), else now; in the schedule's timezone."""
    from zoneinfo import ZoneInfo

    zone = ZoneInfo(tz) if tz else dt_timezone.utc
    if isinstance(when, str):
        when = datetime.fromisoformat(when)
    if when is None:
        try:
            from prefect.runtime import flow_run

            when = flow_run.scheduled_start_time
        except Exception:  # noqa: BLE001 - outside a flow run there is no scheduled time
            when = None
    when = when or datetime.now(dt_timezone.utc)
    return when.replace(tzinfo=zone) if when.tzinfo is None else when.astimezone(zone)


def deployment_parameters(spec: RunSpec, tz: str | None = None) -> dict:
    if spec.store.secret is not None or spec.store.key is not None:
        logger.warning("store credentials in the spec are not stored in the deployment; "
                       "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY where the deployment runs")
    params = {"spec": spec.model_dump(mode="json", exclude={"store": {"secret", "key"}})}
    if tz:
        params["timezone"] = tz
    return params


def require_api() -> None:
    """Registering needs a running Prefect API (PREFECT_API_URL, from the environment or the Prefect profile)."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ScheduleError("--register-only needs a Prefect API to register with: set PREFECT_API_URL (e.g. "
                            "http://localhost:4200/api after `prefect server start`, or the compose file's server, "
                            "see infra/README.md); without --register-only the schedule is served here")


def _check_timezone(tz: str | None) -> None:
    if tz is None:
        return
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"timezone {tz!r} is not an IANA name (e.g. Europe/Berlin, America/New_York, UTC)") from None


def schedule_spec(spec: RunSpec, cron: str, name: str | None = None, serve: bool = True, timezone: str | None = None,
                  work_pool: str | None = None):
    """Serve the deployment here, or (serve=False) register it with the Prefect API and return its id."""
    _check_timezone(timezone)
    if not serve:
        require_api()
    from prefect import serve as prefect_serve
    from prefect.schedules import Cron

    from refdir.flows.pipeline import run_flow

    dep_name = name or spec.name.split("{", 1)[0].rstrip("-_") or "refdir"
    deployment = run_flow.to_deployment(name=dep_name, parameters=deployment_parameters(spec, timezone),
                                        schedule=Cron(cron, timezone=timezone), concurrency_limit=1,
                                        tags=["refdir", spec.name])
    when = f"{cron!r} ({timezone or 'UTC'})"
    if serve:
        logger.info("serving deployment %s/%s on %s (Ctrl-C to stop)", run_flow.name, deployment.name, when)
        prefect_serve(deployment)
        return None
    deployment_id = deployment.apply(work_pool_name=work_pool)
    where = f"work pool {work_pool!r} (run it: prefect worker start --pool {work_pool})" if work_pool else \
        "no work pool (serve it with `refdir schedule` or add --work-pool)"
    logger.info("registered deployment %s/%s (%s) on %s, %s", run_flow.name, deployment.name, deployment_id, when, where)
    return deployment_id
