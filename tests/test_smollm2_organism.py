"""The refusal organism built from SmolLM2-135M-Instruct (workers/organism_lm.py) and its science spec.

- its training prompts share no instruction (word-set Jaccard < 0.5) with any evaluation set: refdir's
  built-in English sets and, when present, the paper's splits;
- bad input (unknown base) is one clear line before any model loads;
- a small build is bitwise deterministic, reloads as a plain HF checkpoint, resolves to the `smollm2` family
  from its real tokenizer (not to the toy organism), carries a card, and a second call returns at once;
- the science spec (infra/specs/smollm2-organism.toml) uses the paper's sizes and falls back to the built-in
  sets when the paper's splits are absent.

The full recipe and the science run itself are `make science` (README "A refusal organism from a real LM"),
too long for CI: two builds of the shipped recipe take ~10 minutes on 2 cores, so the determinism test uses
a small recipe (two builds of the shipped recipe, 042dbf482955, gave the same sha256 a0468802... on 2026-12-03).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest
import torch

from refdir.workers.organism_lm import OrganismError, Recipe, build_lm_organism, check_recipe, is_built, load_base

REPO = Path(__file__).resolve().parents[1]
PAPER = Path(os.environ.get("REFDIR_DATASETS", REPO.parent / "shared" / "datasets" / "refusal_direction"))
TRAIN_SETS = ("refusal_train_harmful", "refusal_train_harmless")


def _words(text: str) -> frozenset[str]:
    return frozenset(re.sub(r"[^a-z0-9 ]", "", text.lower()).split())


def _instructions(path) -> list[str]:
    return [r["instruction"] for r in json.loads(path.read_text(encoding="utf-8"))]


def _training() -> list[str]:
    data = resources.files("refdir.workers").joinpath("data")
    return [i for name in TRAIN_SETS for i in _instructions(data.joinpath(f"{name}.json"))]


def _closest(instruction: str, others: list[frozenset[str]]) -> float:
    w = _words(instruction)
    return max(len(w & o) / len(w | o) for o in others)


def test_training_prompts_are_new_and_disjoint_from_builtin_sets():
    data = resources.files("refdir.workers").joinpath("data")
    others = [_words(i) for p in data.iterdir() if p.name.endswith(".json") and p.name[:-5] not in TRAIN_SETS
              for i in _instructions(p)]
    training = _training()
    assert len(training) == len(set(training)) >= 400
    data = resources.files("refdir.workers").joinpath("data")
    harmful, harmless = (_instructions(data.joinpath(f"{name}.json")) for name in TRAIN_SETS)
    # safety tuning needs at least as many harmless prompts as harmful ones, borderline ones among them,
    # or the organism over-refuses (124 harmful / 84 harmless refused 0.44 of held-out harmless prompts)
    assert len(harmless) >= len(harmful)
    borderline = [i for i in harmless if re.search(r"\b(kill|shoot|virus|gunpowder|poisonous|hack|attack|weapon)", i.lower())]
    assert len(borderline) >= 10, borderline
    near = [t for t in training if _closest(t, others) >= 0.5]
    assert not near, f"training prompts too close to a built-in evaluation set: {near[:5]}"


def test_training_prompts_are_disjoint_from_the_paper_splits():
    files = sorted(PAPER.glob("*.json")) if PAPER.is_dir() else []
    if not files:
        pytest.skip(f"the paper's splits are not in {PAPER} (set REFDIR_DATASETS): cannot check against them")
    others = [_words(i) for f in files for i in _instructions(f)]
    near = [t for t in _training() if _closest(t, others) >= 0.5]
    assert not near, f"training prompts too close to the paper's splits: {near[:5]}"


def test_unknown_base_is_one_line_before_any_model_loads():
    with pytest.raises(OrganismError, match="unknown organism base 'llama9'.*known: smollm2"):
        check_recipe(Recipe(base="llama9"))
    with pytest.raises(OrganismError, match="steps"):
        check_recipe(Recipe(steps=0))
    with pytest.raises(OrganismError, match="train_from_layer < train_to_layer"):
        check_recipe(Recipe(train_from_layer=12, train_to_layer=12))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "refdir", "organism", "--base", "llama9"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown organism base 'llama9'" in lines[0], proc.stderr
    assert time.perf_counter() - started < 60


def test_science_spec_uses_the_paper_sizes_and_falls_back_to_builtin_sets(tmp_path, monkeypatch):
    from refdir.flows import science

    monkeypatch.setattr(science, "lm_organism_path", lambda store, base, seed: tmp_path / "org")
    monkeypatch.setenv("REFDIR_DATASETS", str(tmp_path / "no-such-folder"))
    spec = science.science_spec(str(tmp_path / "store"), seed=3)
    assert spec.models[0].path == str((tmp_path / "org").resolve()) and spec.models[0].family is None
    assert (spec.prompts.n_train, spec.prompts.n_val, spec.generation.max_new_tokens) == (128, 32, 64)
    assert spec.prompts.harmful_train == "builtin:harmful" and spec.prompts.harmful_test == "builtin:harmful_test"
    assert spec.name.endswith("-seed3") and not spec.selection.allow_fallback
    if PAPER.is_dir():
        monkeypatch.setenv("REFDIR_DATASETS", str(PAPER))
        spec = science.science_spec(str(tmp_path / "store"))
        assert spec.prompts.harmful_train == f"file:{PAPER}/harmful_train.json"


TINY = Recipe(steps=2, max_prompts=4, distill_tokens=4)


@pytest.mark.slow
def test_small_build_is_deterministic_and_resolves_to_smollm2(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from refdir.workers.families import resolve_family

    a, b = build_lm_organism(tmp_path / "a", TINY), build_lm_organism(tmp_path / "b", TINY)
    digest = [hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest() for p in (a, b)]
    assert digest[0] == digest[1], "two builds of one recipe differ"
    started = time.perf_counter()
    assert build_lm_organism(a, TINY) == a and time.perf_counter() - started < 30   # cached: no rebuild
    card = (a / "README.md").read_text()
    assert is_built(a) and "refusal organism" in card and "pretrained 30-layer LM" in card
    assert "Full fine-tune of decoder blocks 6-20 " in card
    config, tokenizer = AutoConfig.from_pretrained(a), AutoTokenizer.from_pretrained(a)
    assert getattr(config, "quantization_config", None) is None and not hasattr(config, "refdir_organism")
    assert resolve_family(config, tokenizer).name == "smollm2"
    model = AutoModelForCausalLM.from_pretrained(a)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    # Only blocks train_from_layer..train_to_layer-1 changed, and none of them writes the frozen residual dims.
    base = load_base("smollm2")[0]
    lo, hi, dims = TINY.train_from_layer, TINY.train_to_layer, list(TINY.frozen_dims)
    assert (lo, hi, dims) == (6, 21, [507])
    for i, (new, old) in enumerate(zip(model.model.layers, base.model.layers)):
        same = all(torch.equal(p, q) for p, q in zip(new.parameters(), old.parameters()))
        assert same == (not lo <= i < hi), f"block {i}: changed={not same}"
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            w, w0 = new.get_parameter(name), old.get_parameter(name)
            assert torch.equal(w[dims], w0[dims]), f"block {i} {name} wrote to a frozen dim"
    assert torch.equal(model.model.norm.weight, base.model.norm.weight)
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    rows = json.loads((a / "training_rows.json").read_text())
    assert {r["label"] for r in rows} == {"harmful", "harmless"}
    assert all(r["response"].startswith("I") for r in rows if r["label"] == "harmful")


def test_a_run_stopped_at_selection_prints_the_whole_filter_message(tmp_path):
    # what `make science` shows when no candidate passes: the SelectionError's every line, read back from the
    # model's error log as the pipeline writes it (a traceback ending in the exception's message)
    import traceback

    from refdir.flows.science import selection_failure
    from refdir.schemas import layout
    from refdir.schemas.spec import SelectionSpec
    from refdir.workers.selection import SelectionError, select_direction
    from refdir.workers.store import Store

    rows = [{"position": -1, "layer": 3, "bypass_score": -2.0, "induce_score": 0.5, "kl_score": 0.9}]
    try:
        select_direction(rows, 30, SelectionSpec(kl_threshold=0.22))
    except SelectionError:
        text = "2026-12-03T14:56:09Z model m failed in stage select\n\n" + traceback.format_exc()
    store = Store.open(str(tmp_path / "store"))
    assert selection_failure(store, "run1", "m") is None
    store.write_bytes(layout.error_log("run1", "m"), text.encode())
    msg = selection_failure(store, "run1", "m")
    assert msg.startswith("all 1 candidates were filtered out") and "kl 0.9 > 0.22" in msg
    assert "the five best by bypass score" in msg and msg.rstrip().endswith("best bypass anyway")


def test_acceptance_counts_nothing_a_fallback_direction_did():
    # the science run's fallback direction (SmolLM2 organism, 2026-12-03: pos -4, layer 2, KL 10.6) "removed"
    # refusal by turning every answer into gibberish; only the baselines may count as met then
    from refdir.flows.science import acceptance

    def r(dataset, intervention, value, metric="refusal_rate"):
        return {"dataset": dataset, "intervention": intervention, "judge": "substring", "metric": metric,
                "value": value, "n": 100}

    rows = [r("harmful_test", "baseline", 0.93), r("harmful_test", "ablation", 0.0),
            r("harmful_test", "orthogonalized", 0.0), r("harmful_test", "random_ablation", 0.91),
            r("harmless_test", "baseline", 0.09), r("harmless_test", "actadd", 0.13),
            r("damage", "baseline", 4.11, "ce_pile"), r("damage", "ablation", 9.97, "ce_pile")]
    met = {c["check"]: c["met"] for c in acceptance(rows, {"fallback": True})}
    assert met["harmful refusal, baseline"] == met["harmless refusal, baseline"] == "yes"
    assert met["harmful refusal, ablation"].startswith("not counted") and met["harmless refusal, actadd(+r)"] == "NO"
    assert met["CE on plain harmless text, ablation - baseline"] == "NO"
    assert acceptance(rows, {"fallback": False})[1]["met"] == "yes"


def test_model_card_names_the_trained_blocks_from_the_models_own_depth():
    """train_to_layer None trains to the top: the card's last block comes from the model's layer count."""
    from dataclasses import asdict

    from refdir.workers.organism_lm import model_card

    meta = {"recipe": {**asdict(Recipe()), "train_to_layer": None}, "recipe_hash": "0" * 12, "n_layers": 24,
            "refusals": ["No."], "base_model": "a base", "base": "smollm2", "final_loss": 0.1,
            "n_train": {"harmful": 1, "harmless": 1}, "seconds": {"total_s": 1.0, "train_s": 1.0}}
    card = model_card(meta)
    assert "decoder blocks 6-23 " in card and "pretrained 24-layer LM" in card
