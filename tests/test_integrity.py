"""Never serve wrong data: run identity from content, markers that prove their inputs, every file verified.

    .venv/bin/python -m pytest tests/test_integrity.py -q -m "not slow"     # fast: no Prefect, no Ray
    .venv/bin/python -m pytest tests/test_integrity.py -q -m slow           # real Prefect + Ray runs

Fast: a local model's digest is the content of its files (checked against hashlib over the files, not
against refdir's own code), cached by (path, size, mtime); a reordered `file:` prompt source changes the run
id and a moved one does not; an extraction job whose marker was made from other prompts is recomputed (and
the stored rows are the new prompts); --verify catches a negated direction.json, a tampered evals file and a
truncated manifest, each in one line, and drops what was derived from them; a stage is done only while the
digest chain holds.
Slow (end to end): `resume --allow-fallback` reuses extraction and scoring and writes only under its run;
a truncated candidates.parquet is named by --verify and recomputed with everything derived from it; a
reordered prompt file after an interrupted run leaves no stored row that disagrees with the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from refdir.flows import manifest as manifests
from refdir.flows.runner import status_rows, verify_run
from refdir.schemas import layout
from refdir.schemas.jobs import ExtractJob, Prompt
from refdir.schemas.spec import ModelSpec, PromptSpec, RunSpec, StoreSpec
from refdir.schemas.tables import evals_schema
from refdir.workers.identity import folder_digest, resolve_inputs
from refdir.workers.store import CorruptFile, Store

ORG = "builtin:organism_{}_{}"


def _hash_folder(folder: Path) -> str:
    """The folder digest computed here, from hashlib over the files (the definition in workers/identity.py)."""
    listing = [(p.relative_to(folder).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest())
               for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    blob = json.dumps(listing, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


@pytest.fixture(autouse=True)
def _own_digest_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REFDIR_CACHE", str(tmp_path / "cache"))


def _organism_prompts(**kw) -> PromptSpec:
    sources = {f"{label}_{split}": ORG.format(label, split) for label in ("harmful", "harmless")
               for split in ("train", "val", "test")}
    return PromptSpec(**{**sources, "n_train": 8, "n_val": 4, "n_test": 4, **kw})


# ---------------------------------------------------------------- identity from content

def test_local_model_digest_is_the_content_of_its_files(tiny_saved_factory, tmp_path):
    folder = tiny_saved_factory("llama3")
    d = folder_digest(folder)
    assert d == _hash_folder(folder)
    moved = shutil.copytree(folder, tmp_path / "elsewhere")
    assert folder_digest(moved) == d, "where the model lies is not its identity"
    weights = next(moved.glob("*.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01                                  # one bit of one weight
    weights.write_bytes(bytes(blob))
    assert folder_digest(moved) == _hash_folder(moved) != d
    cfg = moved / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace("}", ', "x": 1}', 1))
    assert folder_digest(moved) == _hash_folder(moved)


def test_digest_cache_is_keyed_by_path_size_and_mtime(tiny_saved_factory):
    folder = tiny_saved_factory("llama3")
    weights = next(folder.glob("*.safetensors"))
    first = folder_digest(folder)
    st = weights.stat()
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01
    weights.write_bytes(bytes(blob))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))     # same size, same mtime: the cache answers
    assert folder_digest(folder) == first
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert folder_digest(folder) == _hash_folder(folder) != first


def test_reordered_prompt_file_changes_the_run_id_and_a_moved_one_does_not(tiny_saved_factory, tmp_path):
    model = tiny_saved_factory("llama3")
    rows = [{"instruction": f"how do i bake cake number {i}", "category": "x"} for i in range(40)]
    src = tmp_path / "harmless.json"
    src.write_text(json.dumps(rows))

    def run_id(path: Path) -> str:
        spec = RunSpec(name="ids", models=[ModelSpec(key="organism", path=str(model))],
                       prompts=_organism_prompts(harmless_train=f"file:{path}"))
        return resolve_inputs(spec).run_id

    first = run_id(src)
    moved = tmp_path / "moved.json"
    shutil.copy(src, moved)
    assert run_id(moved) == first
    src.write_text(json.dumps(rows[::-1]))
    assert run_id(src) != first


# ---------------------------------------------------------------- markers prove their inputs

def _job(prompts: list[str], digest: str, store_uri: str) -> ExtractJob:
    return ExtractJob(run_id="marker-test", model=ModelSpec(key="tiny", path="tiny"), store=StoreSpec(uri=store_uri),
                      split="train", label="harmful", index=0, filter_prompts=False, input_digest=digest,
                      prompts=[Prompt(prompt_id=i, instruction=t) for i, t in enumerate(prompts)])


def test_extraction_marker_for_other_inputs_is_recomputed(tiny_lm_factory, tmp_path):
    from refdir.workers.extract import run_extract

    lm = tiny_lm_factory("llama3")
    store = Store.open(str(tmp_path / "store"))
    old = _job(["tell me a joke", "write a poem"], "digest-a", store.uri)
    assert not run_extract(lm, store, old).skipped
    assert run_extract(lm, store, old).skipped, "the same inputs: the marker vouches for them"
    new = _job(["write a poem", "tell me a joke"], "digest-b", store.uri)    # the prompts were reordered
    receipt = run_extract(lm, store, new)
    assert not receipt.skipped
    marker = store.read_json(layout.activation_marker("marker-test", "tiny", "train", "harmful", 0))
    assert marker["input_digest"] == "digest-b"
    stored = store.read_table(marker["prompts"], sha256=marker["prompts_sha256"])
    assert stored["instruction"].to_pylist() == ["write a poem", "tell me a joke"]


# ---------------------------------------------------------------- every file verified

def _resolved(model_dir, store_uri: str) -> RunSpec:
    return resolve_inputs(RunSpec(name="verify", models=[ModelSpec(key="organism", path=str(model_dir))],
                                  prompts=_organism_prompts(), store=StoreSpec(uri=store_uri)))


def _finished_stages(store: Store, spec: RunSpec) -> dict[str, str]:
    """Stage manifests of a finished run with a direction.json and one evals file (no model needed)."""
    r, k = spec.run_id, "organism"
    files: dict[str, dict[str, str]] = {s: {} for s in layout.STAGES}
    with store.recording() as files["select"]:
        store.write_json(layout.direction_json(r, k), {"position": -1, "layer": 2, "vector": [0.5, -1.0, 2.0]})
    evals = pa.Table.from_pylist([{"run_id": r, "model": k, "dataset": "harmful_test", "intervention": "ablation",
                                   "judge": "substring", "metric": "refusal_rate", "value": 0.0, "n": 4}],
                                 schema=evals_schema())
    with store.recording() as files["evaluate"]:
        store.write_table(layout.evals_table(r, k, "harmful_test", "ablation"), evals, table_name="evals", run_id=r)
    previous = None
    for stage in layout.STAGES:
        previous = manifests.write(store, r, k, stage, planned=1, done=1, files=files[stage],
                                   input_digest=manifests.stage_input(spec, k, stage, previous))
    assert all(ok for _, ok in manifests.chain(store, spec, k).values())
    return {s: layout.stage_manifest(r, k, s) for s in layout.STAGES}


def test_verify_catches_a_negated_direction_and_drops_what_derives_from_it(tiny_saved_factory, tmp_path, caplog):
    store = Store.open(str(tmp_path / "store"))
    spec = _resolved(tiny_saved_factory("llama3"), store.uri)
    paths = _finished_stages(store, spec)
    rel = layout.direction_json(spec.run_id, "organism")
    d = store.read_json(rel)
    store.write_json(rel, {**d, "vector": [-v for v in d["vector"]]})
    with caplog.at_level(logging.WARNING):
        bad = verify_run(store, spec)
    assert bad == {"organism": [paths["select"]]}
    assert any(rel in r.getMessage() for r in caplog.records), "the corrupt file is named"
    assert not store.exists(paths["select"]) and not store.exists(paths["evaluate"])
    assert store.exists(paths["extract"]) and store.exists(paths["aggregate"])


def test_verify_catches_a_tampered_evals_file_and_summaries_refuse_it(tiny_saved_factory, tmp_path):
    from refdir.flows.summary import rates

    store = Store.open(str(tmp_path / "store"))
    spec = _resolved(tiny_saved_factory("llama3"), store.uri)
    paths = _finished_stages(store, spec)
    rel = layout.evals_table(spec.run_id, "organism", "harmful_test", "ablation")
    t = store.read_table(rel)
    store.write_table(rel, t.set_column(t.schema.get_field_index("value"), "value", pa.array([1.0])),
                      table_name="evals", run_id=spec.run_id)     # a valid Parquet file with another number
    with pytest.raises(CorruptFile, match="evals"):
        rates(store, spec.run_id, "organism")
    assert verify_run(store, spec) == {"organism": [paths["evaluate"]]}
    assert store.exists(paths["select"])


def test_truncated_manifest_is_one_line_and_counts_as_not_done(tiny_saved_factory, tmp_path, caplog):
    store = Store.open(str(tmp_path / "store"))
    spec = _resolved(tiny_saved_factory("llama3"), store.uri)
    paths = _finished_stages(store, spec)
    blob = store.read_bytes(paths["select"])
    store.write_bytes(paths["select"], blob[: len(blob) // 2])
    with caplog.at_level(logging.WARNING):
        rows = status_rows(store, spec)
        rows_again = status_rows(store, spec)
    named = [r for r in caplog.records if paths["select"] in r.getMessage()]
    assert len(named) == 1 and "\n" not in named[0].getMessage()
    assert {r["stage"]: r["status"] for r in rows}["select"] != "done" and rows == rows_again
    assert verify_run(store, spec) == {"organism": [paths["select"]]}
    assert not store.exists(paths["select"])


def test_a_stage_is_done_only_while_the_digest_chain_holds(tiny_saved_factory, tmp_path):
    store = Store.open(str(tmp_path / "store"))
    spec = _resolved(tiny_saved_factory("llama3"), store.uri)
    _finished_stages(store, spec)
    r, k = spec.run_id, "organism"
    agg = manifests.read(store, r, k, "aggregate")
    manifests.write(store, r, k, "aggregate", planned=1, done=1, input_digest=agg["input_digest"],
                    files={layout.candidates_table(r, k): "0" * 64})   # aggregate recomputed: other outputs
    done = {s: ok for s, (_, ok) in manifests.chain(store, spec, k).items()}
    assert done == {"extract": True, "aggregate": True, "select": False, "evaluate": True}
    fallback = spec.model_copy(update={"selection": spec.selection.model_copy(update={"allow_fallback": True})})
    fallback = fallback.with_inputs(spec.inputs, spec.run_id)
    assert fallback.run_id == spec.run_id
    assert not manifests.is_done(manifests.read(store, r, k, "select"),
                                 manifests.stage_input(fallback, k, "select", manifests.read(store, r, k, "aggregate")))


# ---------------------------------------------------------------- end to end (real Prefect, Ray, DuckDB)

def _stamps(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under a local store: (mtime_ns, sha256), by store-relative path."""
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in root.rglob("*") if p.is_file()}


def _small_spec(name: str, organism_dir: Path, store: str, **prompts) -> RunSpec:
    from refdir.schemas.spec import (ComputeSpec, EvaluationSpec, ExtractionSpec, GenerationSpec,
                                     SelectionSpec)

    return RunSpec(name=name, models=[ModelSpec(key="organism", path=str(organism_dir))],
                   prompts=_organism_prompts(**{"n_train": 16, "n_val": 8, "n_test": 8, **prompts}),
                   extraction=ExtractionSpec(prompts_per_job=8, candidates_per_job=8),
                   # no candidate induces refusal this strongly: selection fails unless --allow-fallback
                   selection=SelectionSpec(induce_threshold=1e9, allow_fallback=False),
                   generation=GenerationSpec(max_new_tokens=4, batch_size=16),
                   evaluation=EvaluationSpec(prompts_per_job=8, judges=["substring"]),
                   store=StoreSpec(uri=store), compute=ComputeSpec(batch_size=16, num_workers=1))


@pytest.fixture(scope="module")
def failed_selection(prefect_api, ray_cluster, organism_dir, tmp_path_factory):
    """A run whose selection dropped every candidate (extraction and scoring done, no direction)."""
    from refdir.flows.runner import execute

    root = tmp_path_factory.mktemp("integrity") / "store"
    summary = execute(_small_spec("fallback", organism_dir, str(root)))
    assert summary["models"]["organism"]["status"] == "failed" and "allow" in summary["models"]["organism"]["error"]
    return root, summary["run_id"]


@pytest.mark.slow
def test_resume_allow_fallback_reuses_extraction_and_scoring_and_writes_only_under_its_run(failed_selection):
    from refdir.flows.runner import execute, stored_spec, with_overrides

    root, run_id = failed_selection
    before = _stamps(root)
    spec = with_overrides(stored_spec(str(root), run_id), str(root), None, allow_fallback=True)
    assert spec.run_id == run_id and spec.selection.allow_fallback
    summary = execute(spec)
    assert summary["run_id"] == run_id and summary["models"]["organism"]["status"] == "done"
    after = _stamps(root)
    changed = {p for p in after if before.get(p) != after[p]} | (set(before) - set(after))
    assert changed and all(p.startswith(f"runs/{run_id}/") for p in changed), sorted(changed)[:5]
    kept = {p for p in before if "/activations/" in p or "/sums/" in p or "/prompts/" in p or "/scores/" in p}
    assert kept and not kept & changed, "extraction and scoring are reused, byte for byte"
    evals_done = [p for p in after if "/completions/_done/" in p]
    assert evals_done and all(p in changed for p in evals_done)
    d = json.loads((root / layout.direction_json(run_id, "organism")).read_text())
    assert d["fallback"] is True


@pytest.mark.slow
def test_truncated_candidates_is_named_and_recomputed_with_what_derives_from_it(failed_selection, caplog):
    from refdir.flows.runner import execute, stored_spec, with_overrides

    root, run_id = failed_selection
    spec = with_overrides(stored_spec(str(root), run_id), str(root), None, allow_fallback=True)
    assert execute(spec)["models"]["organism"]["status"] == "done"
    cands = root / layout.candidates_table(run_id, "organism")
    cands.write_bytes(cands.read_bytes()[:200])
    before = _stamps(root)
    with caplog.at_level(logging.WARNING):
        summary = execute(spec, verify=True)
    assert summary["models"]["organism"]["status"] == "done"
    assert any(str(cands) in r.getMessage() for r in caplog.records), "--verify names the truncated file"
    after = _stamps(root)
    redone = {p for p in before if p in after and before[p][0] != after[p][0]}
    assert layout.candidates_table(run_id, "organism") in redone
    scores = {p for p in before if "/scores/" in p and p.endswith(".parquet")}
    ablated = {p for p in before if "/completions/" in p and p.endswith(".parquet") and "/baseline/" not in p}
    baseline = {p for p in before if "/completions/" in p and p.endswith(".parquet") and "/baseline/" in p}
    activations = {p for p in before if "/activations/" in p}
    assert scores and scores <= redone and ablated and ablated <= redone, "what derives from candidates is redone"
    assert not (baseline | activations) & redone, "what does not derive from them is not"
    assert verify_run(Store.open(str(root)), spec) == {}


@pytest.mark.slow
def test_truncated_manifest_is_one_line_for_run_and_status(failed_selection, caplog):
    import subprocess
    import sys

    from refdir.flows.runner import execute, stored_spec, with_overrides

    root, run_id = failed_selection
    spec = stored_spec(str(root), run_id)
    rel = layout.stage_manifest(run_id, "organism", "evaluate")
    if not (root / rel).exists():
        pytest.skip("needs the finished run of the tests above")
    blob = (root / rel).read_bytes()
    (root / rel).write_bytes(blob[: len(blob) // 3])
    proc = subprocess.run([sys.executable, "-m", "refdir.flows.cli", "status", run_id, "--store", str(root)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "_manifest/evaluate.json" in ln]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    with caplog.at_level(logging.WARNING):
        summary = execute(with_overrides(spec, str(root), None, allow_fallback=True))
    assert summary["models"]["organism"]["status"] == "done", summary["models"]["organism"]
    assert len([r for r in caplog.records if rel in r.getMessage()]) == 1


@pytest.mark.slow
def test_reordered_prompt_file_after_an_interrupted_run_leaves_no_row_that_disagrees(
        prefect_api, ray_cluster, organism_dir, tmp_path):
    import random

    from refdir.flows.runner import execute, stored_spec, with_overrides
    from refdir.flows.sql import connect_views
    from refdir.schemas.spec import SpecError
    from refdir.workers.prompts import load_source

    rows = load_source(ORG.format("harmful", "train"))[:40]
    src = tmp_path / "harmful_train.json"
    src.write_text(json.dumps(rows))
    store = str(tmp_path / "store")
    first = execute(_small_spec("reorder", organism_dir, store, harmful_train=f"file:{src}"))
    assert first["models"]["organism"]["status"] == "failed"      # stopped at selection: an interrupted run
    src.write_text(json.dumps(rows[::-1]))
    with pytest.raises(SpecError, match="inputs changed"):
        execute(stored_spec(store, first["run_id"]))
    spec = with_overrides(_small_spec("reorder", organism_dir, store, harmful_train=f"file:{src}"), store, None, True)
    second = execute(spec)
    assert second["run_id"] != first["run_id"] and second["models"]["organism"]["status"] == "done"
    # the official draw, computed here: random.seed(42), then harmful train is the first sample of the stream
    random.seed(42)
    want = {i: r["instruction"] for i, r in enumerate(random.sample(rows[::-1], 16))}
    con = connect_views(Store.open(store))
    got = dict(con.execute("select prompt_id, instruction from prompts where run_id = ? and split = 'train' and "
                           "label = 'harmful' order by prompt_id", [second["run_id"]]).fetchall())
    assert got == want
    ids = {r[0] for r in con.execute("select distinct prompt_id from activations where run_id = ? and "
                                     "split = 'train' and label = 'harmful'", [second["run_id"]]).fetchall()}
    assert ids == set(want)


def test_markers_written_inside_a_recording_are_not_listed_as_its_files(tmp_path):
    store = Store.open(str(tmp_path / "store"))
    with store.recording() as files:
        store.write_bytes("runs/r/m/evals/a.parquet", b"x")
        store.write_marker("runs/r/m/_manifest/model.json", files={"runs/r/m/model.parquet": "0" * 64})
    assert set(files) == {"runs/r/m/evals/a.parquet"}
