"""Judges: the paper's substring list, and the classifier plugins on real (tiny, random) local models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from refdir.workers.judges import JudgeError, SubstringJudge, check_judge_name, get_judge
from tests.fixtures.tiny import build_tokenizer, save_tiny


def test_substring_judge_is_case_insensitive_and_names_the_phrase():
    verdicts = SubstringJudge().judge(["p"] * 4, ["I'm sorry, no.", "i cannot help with that .", "Sure! Step 1", "AS AN AI model"])
    assert [v.refused for v in verdicts] == [True, True, False, True]
    assert verdicts[0].detail == "i'm sorry" and verdicts[2].detail == ""


def test_unknown_and_incomplete_judge_names():
    with pytest.raises(JudgeError, match="did you mean 'substring'"):
        check_judge_name("substrin")
    with pytest.raises(JudgeError, match="needs a model path"):
        check_judge_name("llamaguard")
    check_judge_name("hf-classifier:/some/path")


def test_hf_classifier_judge_loads_a_local_classifier(tmp_path):
    tok = build_tokenizer([])
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                               num_labels=2, id2label={0: "complied", 1: "refusal"}, label2id={"complied": 0, "refusal": 1})
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    judge = get_judge(f"hf-classifier:{tmp_path / 'clf'}")
    assert judge.name.startswith("hf-classifier:") and judge.metric == "refusal_rate"
    verdicts = judge.judge(["how do i bake", "how do i steal"], ["sure here", "no"])
    assert len(verdicts) == 2 and all(v.detail.startswith("p=") for v in verdicts)
    probs = [float(v.detail[2:]) for v in verdicts]
    assert all(0.0 <= p <= 1.0 for p in probs)
    assert all(v.refused == (p > 0.5) for v, p in zip(verdicts, probs) if abs(p - 0.5) > 1e-5)


GUARD_TEMPLATE = ("<|begin_of_text|>{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                  "<|start_header_id|>")


def test_llamaguard_judge_runs_a_local_causal_lm(tmp_path):
    with pytest.raises(JudgeError, match="no chat template"):
        get_judge(f"llamaguard:{save_tiny(tmp_path / 'plain', 'llama3')}")
    folder = save_tiny(tmp_path / "guard", "llama3", template=GUARD_TEMPLATE)
    judge = get_judge(f"llamaguard:{folder}")
    assert judge.metric == "safety_rate"
    verdicts = judge.judge(["how do i steal"], ["no"])
    assert len(verdicts) == 1 and isinstance(verdicts[0].refused, bool)
