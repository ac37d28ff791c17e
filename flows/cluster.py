"""Ray connection for the driver: join an existing cluster or start a local one.

    ensure_ray(spec.compute)      # idempotent; RAY_ADDRESS / spec / --ray-address decide where
    n = default_workers(spec.compute)

An address that cannot be reached is a RayUnavailable error before any worker starts.
"""

from __future__ import annotations

import logging
import os
import socket

from refdir.schemas.spec import ComputeSpec

logger = logging.getLogger(__name__)


class RayUnavailable(RuntimeError):
    pass


def resolve_address(compute: ComputeSpec) -> str | None:
    return compute.ray_address or os.environ.get("RAY_ADDRESS") or None


def check_address(address: str, timeout: float = 3.0) -> None:
    """Fail fast when host:port of a Ray address does not accept TCP connections."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailable(f"Ray address {address!r} is not host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise RayUnavailable(f"Ray address {address!r} is unreachable ({e}); start the cluster "
                             "(`ray start --head`, see infra/README.md) or unset compute.ray_address / RAY_ADDRESS "
                             "to start a local one") from None


def ensure_ray(compute: ComputeSpec, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = resolve_address(compute)
    if address:
        check_address(address)
        logger.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False)
    else:
        logger.info("starting a local Ray cluster")
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=False)


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def actor_resources(compute: ComputeSpec, model_key: str | None = None) -> tuple[int, float, float]:
    """(number of actors, GPUs each, CPUs each) for one model on the connected cluster.

    An actor with several GPUs shards its model over them (device_map="auto" in workers/model.py).
    """
    gpus = cluster_gpus()
    per = compute.gpus_per_model.get(model_key, compute.gpus_per_worker) if model_key else compute.gpus_per_worker
    if gpus > 0 and per > 0:
        if per > gpus:
            raise RayUnavailable(f"model {model_key!r} needs {per:g} GPUs per actor but the cluster has {gpus:g}")
        n = compute.num_workers or max(1, int(gpus // per) // compute.concurrent_models)
        return n, per, compute.cpus_per_worker
    return compute.num_workers or 1, 0.0, compute.cpus_per_worker
