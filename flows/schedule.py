"""Overnight schedules: a Prefect deployment of the run flow with a cron schedule.

    schedule_spec(spec, "0 2 * * *")                 # serves it (blocks; Ctrl-C to stop)
    schedule_spec(spec, "0 2 * * *", serve=False)    # registers it with the Prefect API and returns its id

The deployment's parameters hold the spec as JSON without store secrets: a scheduled run takes S3
credentials from the environment of the process that serves it (AWS_ACCESS_KEY_ID, ...). One run at
a time per deployment (global concurrency limit 1), so a slow night never overlaps the next.
"""

from __future__ import annotations

import logging

from refdir.schemas.spec import RunSpec

logger = logging.getLogger(__name__)


def deployment_parameters(spec: RunSpec) -> dict:
    if spec.store.secret is not None or spec.store.key is not None:
        logger.warning("store credentials in the spec are not stored in the deployment; "
                       "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY where the deployment is served")
    return {"spec": spec.model_dump(mode="json", exclude={"store": {"secret", "key"}})}


def schedule_spec(spec: RunSpec, cron: str, name: str | None = None, serve: bool = True):
    from prefect import serve as prefect_serve

    from refdir.flows.pipeline import run_flow

    deployment = run_flow.to_deployment(name=name or spec.name, parameters=deployment_parameters(spec),
                                        cron=cron, concurrency_limit=1,
                                        tags=["refdir", spec.run_id])
    if serve:
        logger.info("serving deployment %s/%s on %r (Ctrl-C to stop)", run_flow.name, deployment.name, cron)
        prefect_serve(deployment)
        return None
    deployment_id = deployment.apply()
    logger.info("registered deployment %s/%s (%s) on %r", run_flow.name, deployment.name, deployment_id, cron)
    return deployment_id
