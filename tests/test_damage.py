"""The paper's damage metrics (evaluate_loss.py): losses checked against transformers' own loss and a
per-sequence computation, sources checked for their filters and errors, preflight rejecting a bad source."""

from __future__ import annotations

import json

import pytest
import torch

from refdir.schemas.spec import EvaluationSpec, ModelSpec, RunSpec, SpecError
from refdir.workers.damage import (DamageSets, DamageSourceError, load_alpaca, load_damage_sets, load_pile, pile_ce,
                                   response_ce)
from refdir.workers.evaluate import Direction, damage_metrics

DOCS = ["how do i make a cake ?", "tell me the weather today please", "write a poem", "what is the sea"]
PAIRS = [("how do i bake bread", "sure here can you ."), ("write a poem", "the sea"), ("what is the weather", "sure")]


def test_pile_ce_equals_transformers_loss_per_document_and_weights_tokens(tiny_lm_factory):
    lm = tiny_lm_factory("llama3")
    per_doc = []
    for doc in DOCS:
        ids = lm.tokenizer(doc, return_tensors="pt")["input_ids"]
        with torch.no_grad():   # transformers' causal-LM loss: mean CE over every token after the first
            per_doc.append((lm.model(input_ids=ids, labels=ids).loss.item(), ids.shape[1] - 1))
    for doc, (loss, n) in zip(DOCS, per_doc):
        got, count = pile_ce(lm, [doc], 256, 4)
        assert count == n and got == pytest.approx(loss, rel=1e-5)
    got, count = pile_ce(lm, DOCS, 256, 3)   # padded batches: token-weighted mean of the documents
    assert count == sum(n for _, n in per_doc)
    assert got == pytest.approx(sum(loss * n for loss, n in per_doc) / count, rel=1e-5)
    assert pile_ce(lm, DOCS, 3, 4)[1] == 2 * len(DOCS)   # cut to 3 tokens: 2 predicted tokens each


def _response_loss_by_hand(lm, instruction: str, response: str) -> tuple[float, int]:
    """CE of the response tokens, one unpadded sequence: formatted prompt ids, then the response's ids."""
    (prompt,) = lm.format([instruction])
    special = lm.chat_format.add_special_tokens
    p = lm.tokenizer(prompt, add_special_tokens=special)["input_ids"]
    full = lm.tokenizer(prompt + response, add_special_tokens=special)["input_ids"]
    assert full[: len(p)] == p                    # a word-level vocabulary: no merge at the boundary
    ids = torch.tensor([full])
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0].double()
    targets = ids[0, len(p):]
    nll = torch.nn.functional.cross_entropy(logits[len(p) - 1 : -1], targets, reduction="sum")
    return nll.item(), len(targets)


def test_response_ce_scores_only_the_response_tokens(tiny_lm_factory):
    lm = tiny_lm_factory("llama3")
    by_hand = [_response_loss_by_hand(lm, i, r) for i, r in PAIRS]
    for pair, (nll, n) in zip(PAIRS, by_hand):
        got, count = response_ce(lm, [pair], 4)
        assert count == n and got == pytest.approx(nll / n, rel=1e-6)
    got, count = response_ce(lm, PAIRS, 2)
    assert count == sum(n for _, n in by_hand)
    assert got == pytest.approx(sum(nll for nll, _ in by_hand) / count, rel=1e-6)


def test_damage_metrics_for_the_interventions_and_the_random_control(tiny_lm_factory):
    lm = tiny_lm_factory("llama3")
    sets = DamageSets(DOCS, PAIRS)
    d = Direction(torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0)) * 3, 1, -1)
    own = [("how do i make a cake", "sure here"), ("what is the sea", "the sea")]
    got = {name: damage_metrics(lm, d, name, sets, own, 2) for name in ("baseline", "ablation", "actadd", "random_ablation")}
    assert set(got["baseline"]) == {"ce_pile", "ce_alpaca", "ce_on_distribution", "kl_first_token"}
    assert got["baseline"]["ce_alpaca"] == pytest.approx(response_ce(lm, PAIRS, 2))
    assert got["baseline"]["kl_first_token"] == (pytest.approx(0.0, abs=1e-12), 2)
    assert got["ablation"]["ce_pile"][0] != pytest.approx(got["baseline"]["ce_pile"][0])
    assert got["actadd"]["kl_first_token"][0] > 0
    # the control: the same-norm random direction (seed 0) the refusal-rate control ablates, through the hooks
    from refdir.workers.hooks import ablate

    with ablate(lm, d.random_like()):
        assert got["random_ablation"]["ce_pile"][0] == pytest.approx(pile_ce(lm, DOCS, 256, 2)[0], rel=1e-4)
    assert got["random_ablation"]["ce_pile"][0] != pytest.approx(got["ablation"]["ce_pile"][0])


def test_builtin_sets_are_refdirs_own_and_the_alpaca_filter(tmp_path):
    pile, alpaca = load_pile("builtin:pile_like", 1000), load_alpaca("builtin:alpaca_like", 1000)
    assert len(pile) == 40 and len(alpaca) == 40 and all(isinstance(t, str) and t for t in pile)
    assert load_pile("builtin:pile_like", 5) == pile[:5]
    f = tmp_path / "alpaca.json"   # the paper keeps only rows whose `input` is empty
    f.write_text(json.dumps([{"instruction": "a", "input": "x", "output": "b"}, {"instruction": "c", "input": " ",
                             "output": "d"}, {"instruction": "e", "output": "f"}]))
    assert load_alpaca(f"file:{f}", 10) == [("c", "d"), ("e", "f")]
    j = tmp_path / "docs.jsonl"
    j.write_text('{"text": "one"}\n\n{"text": ""}\n{"text": "two"}\n')
    assert load_pile(f"file:{j}", 10) == ["one", "two"]


def test_hf_source_from_a_local_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"instruction": [f"task {i}" for i in range(20)], "input": ["" if i % 2 else "ctx" for i in range(20)],
            "output": [f"answer {i}" for i in range(20)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "alp"))
    got = load_alpaca(f"hf:{tmp_path / 'alp'}", 5)
    # shuffled with seed 42 as the paper's code does, then rows with an input dropped
    expected = [(r["instruction"], r["output"]) for r in datasets.Dataset.from_dict(rows).shuffle(seed=42)
                if not r["input"]][:5]
    assert got == expected and len(got) == 5


@pytest.mark.parametrize("field,value,match", [
    ("ce_pile_source", "builtin:the_pile", "unknown builtin damage set 'the_pile'"),
    ("ce_alpaca_source", "file:/no/such/alpaca.json", "not found"),
    ("ce_pile_source", "pile", "unknown damage source 'pile'"),
])
def test_bad_sources_fail_in_preflight_before_any_model(field, value, match, tmp_path):
    from refdir.flows.runner import preflight

    with pytest.raises(DamageSourceError, match=match):
        load_damage_sets(EvaluationSpec(**{field: value}))
    spec = RunSpec(name="t", models=[ModelSpec(path=str(tmp_path / "no-model"))],
                   evaluation=EvaluationSpec(**{field: value}), store={"uri": str(tmp_path / "store")})
    with pytest.raises(SpecError, match=match) as e:
        preflight(spec)
    assert str(e.value).startswith("evaluation: ") and "\n" not in str(e.value)
    assert not (tmp_path / "store").exists()
