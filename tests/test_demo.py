"""`refdir demo` and `refdir sql` as a user runs them: CLI subprocesses on a local folder and on S3.

The organism from the session fixture is copied to where the demo keeps it, so the demo does not
train it again (its training is tested in test_organism.py); everything else is the real command:
its own local Ray cluster, the Prefect test API, Parquet shards, DuckDB.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from refdir.schemas import layout

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def refdir(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "refdir", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"refdir {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


def _env(prefect_api: str, **extra) -> dict:
    return {**os.environ, "PREFECT_API_URL": prefect_api, "REFDIR_LOG": "WARNING", **extra}


def _check_demo_output(stdout: str) -> None:
    assert "refusal rate by model x intervention" in stdout
    lines = {line.split("│")[3].strip(): line for line in stdout.splitlines() if line.count("│") > 6}
    assert set(lines) >= {"baseline", "ablation", "actadd", "orthogonalized", "random_ablation", "random_actadd"}


def _count(store: str, env: dict, where: str) -> int:
    out = refdir("sql", f"select count(*) as n from activations where {where}", "--store", store, "--format", "json",
                 env=env).stdout
    return json.loads(out)[0]["n"]


def test_demo_local_store_and_sql(prefect_api, organism_dir, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(organism_dir, store / layout.organism_dir(0))
    env = _env(prefect_api)
    run = refdir("demo", "--store", str(store), "--plain", env=env)
    _check_demo_output(run.stdout)
    # exactly n_prompts x n_layers x n_positions rows per split and label
    runs = json.loads(refdir("sql", "select run_id, n_layers, len(eoi_tokens) as n_pos from runs", "--store",
                             str(store), "--format", "json", env=env).stdout)
    assert len(runs) == 1
    n_layers, n_pos = runs[0]["n_layers"], runs[0]["n_pos"]
    spec = json.loads((store / layout.run_json(runs[0]["run_id"])).read_text())["spec"]
    n_train, n_val = spec["prompts"]["n_train"], spec["prompts"]["n_val"]
    assert _count(str(store), env, "split = 'train' and label = 'harmful'") == n_train * n_layers * n_pos
    assert _count(str(store), env, "split = 'val'") == 2 * n_val * n_layers * n_pos
    # the rerun answers from the manifests
    again = refdir("demo", "--store", str(store), "--plain", env=env)
    _check_demo_output(again.stdout)


@pytest.mark.s3
def test_demo_on_s3_store(prefect_api, organism_dir, s3_store_uri, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(organism_dir, cache / layout.organism_dir(0))
    env = _env(prefect_api, REFDIR_CACHE=str(cache))
    run = refdir("demo", "--store", s3_store_uri, "--plain", env=env)
    _check_demo_output(run.stdout)
    n = _count(s3_store_uri, env, "split = 'train'")
    assert n > 0
    from refdir.workers.store import Store

    st = Store.open(s3_store_uri)
    assert st.exists(f"{layout.organism_dir(0)}/config.json")      # the organism is kept in the store too
    assert st.glob("runs/*/organism/direction.json")


def test_bad_inputs_give_one_clear_line(tmp_path):
    env = {**os.environ, "REFDIR_LOG": "WARNING"}
    cases = [
        (["doctor", str(tmp_path / "nope")], "nope"),
        (["sql", "selec 1", "--store", str(tmp_path)], "syntax"),
        (["sql", "select * from activations", "--store", str(tmp_path)], "no activations stored yet"),
        (["run", str(tmp_path / "missing.toml")], "not found"),
        (["status", "no-such-run", "--store", str(tmp_path)], "no run 'no-such-run'"),
    ]
    (tmp_path / "afile").write_text("x")
    cases.append((["sql", "select 1", "--store", str(tmp_path / "afile")], "afile"))
    for args, needle in cases:
        proc = refdir(*args, env=env, check=False)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert needle.lower() in proc.stderr.lower(), (args, proc.stderr)
        assert "Traceback" not in proc.stderr, (args, proc.stderr)


def test_run_rejects_bad_store_and_ray_address_before_any_worker(organism_dir, tmp_path):
    env = {**os.environ, "REFDIR_LOG": "WARNING"}
    (tmp_path / "afile").write_text("x")
    base = f'name = "bad"\n[[models]]\npath = "{organism_dir}"\n'
    cases = [
        (base + f'[store]\nuri = "{tmp_path / "afile"}"\n', "afile"),
        (base + f'[store]\nuri = "{tmp_path / "s"}"\n[compute]\nray_address = "127.0.0.1:1"\n', "unreachable"),
        (base + "[prompts]\nn_train = -1\n", "n_train"),
        (base + "[prompts]\nbogus = 1\n", "prompts.bogus"),
        (base + f'[[models]]\npath = "{organism_dir}"\n', "duplicate model keys"),
        ('name = "bad"\n[[models]]\nkey = "x"\n', "models.0.path"),
    ]
    for i, (text, needle) in enumerate(cases):
        spec = tmp_path / f"spec{i}.toml"
        spec.write_text(text)
        proc = refdir("run", str(spec), "--plain", env=env, check=False)
        assert proc.returncode == 2, (text, proc.stderr)
        assert needle.lower() in proc.stderr.lower() and "Traceback" not in proc.stderr, (text, proc.stderr)
        assert "Started a local Ray instance" not in proc.stderr and "actor" not in proc.stderr
