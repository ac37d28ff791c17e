"""Ray for the driver: join an existing cluster or start a local one, check that actors fit, start pools.

    start_cluster(spec.compute, keys)   # once per run, before any model thread: Ray up, every actor fits a node
    pool = start_pool(spec, key)        # that model's supervised actors (workers/pool.py), each answered ping()

An address that cannot be reached, or an actor that asks for more CPUs/GPUs than any node of the cluster
has, is a RayUnavailable error (one line, CLI exit 2) before any worker starts; an actor that is not
scheduled or loaded within compute.actor_start_timeout is an ActorStartError.
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
        _LOCAL["started"] = True


_LOCAL = {"started": False}     # whether this process started the local Ray cluster it is connected to


def shutdown_local_ray() -> None:
    """Stop the local Ray cluster this process started (its raylet, GCS and workers); a joined one is left."""
    import ray

    if _LOCAL["started"] and ray.is_initialized():
        logger.info("stopping the local Ray cluster")
        ray.shutdown()
    _LOCAL["started"] = False


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def actor_resources(compute: ComputeSpec, model_key: str | None = None,
                    gpus: float | None = None) -> tuple[int, float, float]:
    """(number of actors, GPUs each, CPUs each) for one model on the connected cluster (or one with `gpus`).

    An actor with several GPUs shards its model over them (device_map="auto" in workers/model.py).
    """
    gpus = cluster_gpus() if gpus is None else gpus
    per = compute.gpus_per_model.get(model_key, compute.gpus_per_worker) if model_key else compute.gpus_per_worker
    if gpus > 0 and per > 0:
        if per > gpus:
            raise RayUnavailable(f"model {model_key!r} needs {per:g} GPUs per actor but the cluster has {gpus:g}")
        n = compute.num_workers or max(1, int(gpus // per) // compute.concurrent_models)
        return n, per, compute.cpus_per_worker
    return compute.num_workers or 1, 0.0, compute.cpus_per_worker


def _nodes() -> list[dict]:
    import ray

    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def _fmt(cpus: float, gpus: float) -> str:
    return f"{cpus:g} CPU(s) and {gpus:g} GPU(s)"


def check_resources(compute: ComputeSpec, keys: list[str], nodes: list[dict] | None = None) -> None:
    """RayUnavailable naming what is missing when an actor of some model fits no node of the cluster, or the
    actors of the models that run at once need more CPUs than the whole cluster has (`nodes`: each node's
    resources, default: the connected cluster's live nodes)."""
    nodes = _nodes() if nodes is None else nodes
    biggest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    total_cpu = sum(r.get("CPU", 0) for r in nodes)
    at_once = min(compute.concurrent_models, max(len(keys), 1))
    for key in keys:
        n, gpus, cpus = actor_resources(compute, key, sum(r.get("GPU", 0) for r in nodes))
        if not any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
            raise RayUnavailable(
                f"model {key!r}: an actor asks for {_fmt(cpus, gpus)} but no node of the Ray cluster has that much "
                f"(largest: {_fmt(biggest.get('CPU', 0), biggest.get('GPU', 0))}, {len(nodes)} node(s)); lower "
                "compute.cpus_per_worker / compute.gpus_per_worker (gpus_per_model) or add a bigger node")
        if n * cpus * at_once > total_cpu:
            raise RayUnavailable(
                f"model {key!r}: {n} actor(s) x {cpus:g} CPU(s) x {at_once} model(s) at once need "
                f"{n * cpus * at_once:g} CPUs, the Ray cluster has {total_cpu:g}; lower compute.num_workers, "
                "compute.cpus_per_worker or compute.concurrent_models")


def start_cluster(compute: ComputeSpec, keys: list[str]) -> None:
    """Ray started (or joined) once for the run, before model threads; every model's actors fit. For a local
    cluster the CPUs are checked before Ray starts (a second, not the ~10 s of a start)."""
    import ray

    if not ray.is_initialized() and not resolve_address(compute):
        check_resources(compute, keys, [{"CPU": float(os.cpu_count() or 1), "GPU": 0.0}])   # GPUs: after start
    ensure_ray(compute)
    check_resources(compute, keys)


def start_pool(spec, key: str):
    """(WorkerPool of `key`'s model actors, started; extraction jobs per actor at once)."""
    from refdir.workers.actors import remote_worker
    from refdir.workers.pool import WorkerPool

    compute = spec.compute
    ensure_ray(compute)
    n, gpus, cpus = actor_resources(compute, key)
    concurrency = compute.extract_concurrency if gpus > 0 else 1
    worker = remote_worker(num_gpus=gpus, num_cpus=cpus, max_restarts=compute.max_retries, max_concurrency=concurrency)
    threads = max(1, int(cpus)) if gpus == 0 else None
    model = spec.model(key)
    pool = WorkerPool(lambda: worker.remote(model, spec.store, None, threads), n, max_retries=compute.max_retries,
                      start_timeout=compute.actor_start_timeout, outage_seconds=compute.store_outage_seconds,
                      label=f"model {key}")
    pool.start()
    return pool, concurrency
