"""Cluster files against specs and against a real multi-node Ray cluster.

- every actor paper-13.toml asks for (GPUs per model, CPUs per worker) fits one worker node type of
  infra/ray/cluster.yaml and one worker group of infra/kuberay/raycluster.yaml;
- the images and nodes run Python 3.11 and the Ray version refdir is tested with (the installed one);
- (slow) `ray start --head` plus a second `ray start --address=...` node on this machine, token auth on,
  and a two-model run (organism + a tiny Qwen2) that joins it through compute.ray_address; afterwards the
  cluster's own processes are stopped by pid (what `ray stop` does, without touching other clusters).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from refdir.schemas.spec import parse_spec

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


def actor_sizes(spec_path: Path) -> dict[str, tuple[float, float]]:
    """{model key: (GPUs, CPUs) of one of its actors} as the spec asks (flows/cluster.py's rule)."""
    spec = parse_spec(tomllib.loads(spec_path.read_text()), str(spec_path))
    c = spec.compute
    return {m.key: (c.gpus_per_model.get(m.key, c.gpus_per_worker), c.cpus_per_worker) for m in spec.models}


def launcher_nodes(path: Path) -> dict[str, tuple[float, float]]:
    """Worker node types of a Ray cluster-launcher file: {name: (GPU, CPU)} from their `resources`."""
    doc = yaml.safe_load(path.read_text())
    head = doc["head_node_type"]
    return {name: (float(t["resources"].get("GPU", 0)), float(t["resources"].get("CPU", 0)))
            for name, t in doc["available_node_types"].items() if name != head}


def _cpu(q: str) -> float:
    return float(q[:-1]) / 1000 if str(q).endswith("m") else float(q)


def kuberay_groups(path: Path) -> dict[str, tuple[float, float]]:
    """Worker groups of a RayCluster: {group: (GPU, CPU)} from the ray container's resource limits."""
    doc = yaml.safe_load(path.read_text())
    out = {}
    for g in doc["spec"]["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        out[g["groupName"]] = (float(limits.get("nvidia.com/gpu", 0)), _cpu(limits["cpu"]))
    return out


def unplaceable(actors: dict[str, tuple[float, float]], nodes: dict[str, tuple[float, float]]) -> list[str]:
    return [f"{key} needs {g:g} GPU + {c:g} CPU" for key, (g, c) in actors.items()
            if not any(ng >= g and nc >= c for ng, nc in nodes.values())]


@pytest.mark.parametrize("cluster", ["ray/cluster.yaml", "kuberay/raycluster.yaml"])
def test_paper_spec_actors_fit_the_cluster_nodes(cluster):
    actors = actor_sizes(INFRA / "specs" / "paper-13.toml")
    assert max(g for g, _ in actors.values()) >= 4   # the 70B models: the check has something to bite on
    nodes = (launcher_nodes if cluster.startswith("ray/") else kuberay_groups)(INFRA / cluster)
    assert nodes and not unplaceable(actors, nodes), unplaceable(actors, nodes)


def test_the_fit_check_catches_a_node_too_small():
    """The old cluster.yaml nodes (g6e.xlarge: 1 GPU, 4 vCPU) could not hold paper-13's actors."""
    actors = actor_sizes(INFRA / "specs" / "paper-13.toml")
    assert len(unplaceable(actors, {"g6e.xlarge": (1.0, 4.0)})) == len(actors)


def test_images_and_nodes_run_python_311_and_the_tested_ray():
    import ray

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["requires-python"] == ">=3.11"
    pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray"))
    from packaging.requirements import Requirement

    assert Requirement(pin).specifier.contains(ray.__version__), (pin, ray.__version__)
    assert not Requirement(pin).specifier.contains("2.40.0")   # pinned, not open-ended
    assert re.search(r"^FROM python:3\.11", (INFRA / "compose" / "Dockerfile").read_text(), re.M)
    assert '".[gguf,hf]"' in (INFRA / "compose" / "Dockerfile").read_text()
    launcher = (INFRA / "ray" / "cluster.yaml").read_text()
    assert "--python 3.11" in launcher and launcher.count("[gguf,hf]") == 2
    kuberay = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
    assert kuberay["spec"]["rayVersion"] == ray.__version__


# ---- a real two-node Ray cluster on this machine ------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_node_ray(tmp_path):
    """`ray start --head` + `ray start --address=...` (a second node), token auth on both; `ray stop` after."""
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip(f"SKIPPED LOUDLY: no ray CLI next to {sys.executable}")
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    token = subprocess.run([str(ray_bin), "get-auth-token", "--generate"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert token.returncode == 0, token.stderr
    tmp = Path("/tmp") / f"rt{port}"   # Ray's socket paths must stay short
    start = [str(ray_bin), "start", "--disable-usage-stats"]
    try:   # the joining node takes the head's temp dir (so stop_ray_processes finds both)
        head = subprocess.run(start + ["--head", f"--port={port}", f"--temp-dir={tmp}", "--include-dashboard=false",
                                       "--num-cpus=1", "--resources={\"head\": 1}"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert head.returncode == 0, head.stdout + head.stderr
        node = subprocess.run(start + [f"--address=127.0.0.1:{port}", "--num-cpus=2", "--resources={\"second\": 1}"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert node.returncode == 0, node.stdout + node.stderr
        yield f"127.0.0.1:{port}", env
    finally:
        stop_ray_processes(str(tmp), f"127.0.0.1:{port}")
        shutil.rmtree(tmp, ignore_errors=True)


def stop_ray_processes(*marks: str) -> None:
    """What `ray stop` does, for this cluster only: every process whose command line names our temp dir or GCS
    address (gcs, raylets, agents) and their children, by pid. `ray stop` itself would end every Ray process of
    the user on the machine, including other clusters (other test sessions) that share it."""
    import psutil

    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(m in part for part in proc.info["cmdline"] or [] for m in marks):
                procs += [proc, *proc.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=20)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.slow
def test_two_model_run_joins_an_existing_two_node_cluster(two_node_ray, prefect_api, organism_dir, tmp_path):
    from tests.fixtures.tiny import save_tiny
    from tests.test_ops import organism_toml, refdir_cli

    address, env = two_node_ray
    tiny = save_tiny(tmp_path / "tiny-qwen2", "qwen2")
    store = tmp_path / "store"
    spec = tmp_path / "spec.toml"
    text = organism_toml("cluster", {"organism": str(organism_dir), "tiny-qwen2": str(tiny)}, str(store),
                         n_train=8, n_val=8, n_test=4, filter_train=False, filter_val=False)
    spec.write_text(text.replace("num_workers = 1", f'num_workers = 1\nray_address = "{address}"\n'
                                                    "concurrent_models = 2\ncpus_per_worker = 1"))
    res = refdir_cli(["run", str(spec), "--plain"], {**env, "PREFECT_API_URL": prefect_api}, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:]
    assert f"joining Ray cluster at {address}" in res.stdout
    assert "starting a local Ray cluster" not in res.stdout
    status = subprocess.run([str(Path(sys.executable).with_name("ray")), "status", f"--address={address}"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and status.stdout.count("node_") >= 2, status.stdout
