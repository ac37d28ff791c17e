"""Ctrl-C in a terminal: SIGINT to the process group of `refdir run` mid-extraction.

The CLI (a real subprocess, its own local Ray cluster and temporary Prefect API) must exit 130 within 10 s
with one line, leave no process behind (Ray's raylet/GCS/workers, the Prefect server), and a rerun must
finish with every row exactly once, reusing every job that had finished.

    .venv/bin/python -m pytest tests/test_sigint.py -q          # slow: two organism runs
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SRC = "builtin:organism_{}_{}"


def _spec(tmp_path: Path, organism_dir: Path) -> Path:
    sources = "\n".join(f'{label}_{split} = "{SRC.format(label, split)}"'
                        for label in ("harmful", "harmless") for split in ("train", "val", "test"))
    text = f'''name = "sigint"
[[models]]
key = "organism"
path = "{organism_dir}"
[prompts]
{sources}
n_train = 32
n_val = 16
n_test = 16
[extraction]
prompts_per_job = 1
candidates_per_job = 4
[selection]
allow_fallback = true
[generation]
max_new_tokens = 6
batch_size = 16
[evaluation]
prompts_per_job = 8
[store]
uri = "{tmp_path / 'store'}"
[compute]
batch_size = 16
num_workers = 1
'''
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAY_ADDRESS")}
    return {**env, "REFDIR_LOG": "INFO", "PYTHONUNBUFFERED": "1"}


def _markers(store: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in store.glob("runs/*/organism/activations/_done/*.json")}


def _alive(pids: list[int]) -> list[str]:
    import psutil

    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigint_mid_run_exits_130_cleans_up_and_resumes_exactly(organism_dir, tmp_path):
    import psutil

    spec = _spec(tmp_path, organism_dir)
    store = tmp_path / "store"
    log = open(tmp_path / "run1.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "refdir.flows.cli", "run", str(spec), "--plain"], cwd=REPO,
                            env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and len(_markers(store)) < 3 and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None and len(_markers(store)) >= 3, open(tmp_path / "run1.log").read()[-3000:]
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(family) > 3, "expected Ray's processes and the Prefect server under the driver"
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)                 # what Ctrl-C in the terminal does
        rc = proc.wait(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = open(tmp_path / "run1.log").read()
    assert rc == 130, out[-3000:]
    assert took < 10, f"exit took {took:.1f} s"
    assert "Traceback" not in out, out[-3000:]
    assert out.strip().splitlines()[-1].startswith("interrupted:"), out[-1000:]
    time.sleep(2)
    assert not _alive(family), f"left behind: {_alive(family)}"

    before = _markers(store)
    time.sleep(1.1)
    rerun = subprocess.run([sys.executable, "-m", "refdir.flows.cli", "run", str(spec), "--plain"], cwd=REPO,
                           env=_env(), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    after = _markers(store)
    assert all(after[p] == t for p, t in before.items()), "jobs finished before the interrupt were redone"
    _check_exact(store, len(after))


def _check_exact(store_dir: Path, n_markers: int) -> None:
    """Every drawn prompt's activations exactly once; the expected count comes from the prompts drawn and the
    organism's own config and chat template (not from refdir)."""
    import json

    import duckdb
    from transformers import AutoTokenizer

    n_prompts = 2 * 32 + 2 * 16                         # train + val, harmful + harmless; one prompt per job
    assert n_markers == n_prompts
    shards = [str(p) for p in store_dir.glob("runs/*/organism/activations/split=*/label=*/*.parquet")]
    rows, distinct = duckdb.sql(
        f"select count(*), count(distinct (split, label, prompt_id, layer, position)) from read_parquet({shards!r}, "
        "hive_partitioning = true)").fetchall()[0]
    path = json.loads(next(store_dir.glob("runs/*/run.json")).read_text())["spec"]["models"][0]["path"]
    n_layers = json.loads((Path(path) / "config.json").read_text())["num_hidden_layers"]
    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template([{"role": "user", "content": "QQQ"}], tokenize=False, add_generation_prompt=True)
    n_positions = len(tok.encode(text.split("QQQ")[-1], add_special_tokens=False))
    assert rows == distinct == n_prompts * n_layers * n_positions, (rows, distinct, n_prompts, n_layers, n_positions)
