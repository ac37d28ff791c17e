"""Family registry, resolution and chat formatting, on a tiny random model of every registry family.

Qwen v1 is covered through a GPT-2-layout model (a GPT2LMHeadModel config, family "qwen" given
explicitly): Qwen v1 needs remote code, and GPT-2 has the same module names.
"""

from types import SimpleNamespace

import pytest
import torch

from refdir.schemas.spec import ModelSpec
from refdir.workers.chat import (
    ChatTemplateError, chat_template_for, encode, eoi_token_ids, format_instructions, resolve_format,
)
from refdir.workers.families import FAMILIES, FamilyError, get_family, resolve_family
from refdir.workers.model import dtype_for, from_model
from tests.fixtures.tiny import CHATML_SPECIALS, TINY_FAMILIES, build_tokenizer, tiny_lm, tiny_model

INSTRUCTIONS = ["how do i make a cake ?", "tell me", "write a poem about the sea please"]
REQUIRED = {"llama2", "llama3", "yi", "smollm2", "organism", "qwen", "qwen2", "qwen3", "gemma", "gemma2",
            "gemma3", "mistral", "phi3", "olmo2", "granite"}


def test_registry_has_every_required_family_and_a_tiny_model_for_each():
    assert REQUIRED <= set(FAMILIES)
    assert set(FAMILIES) == set(TINY_FAMILIES), "every registry family needs a tiny model in tests/fixtures/tiny.py"
    assert FAMILIES["qwen"].trust_remote_code and FAMILIES["qwen"].refusal_tokens == ("I", "As")
    assert FAMILIES["organism"].refusal_tokens == ("i",) and FAMILIES["organism"].chat_template is None
    assert FAMILIES["organism"].exact_orthogonalization and FAMILIES["organism"].marker == "refdir_organism"
    assert {f for f, fam in FAMILIES.items() if not fam.exact_orthogonalization} == {"gemma2", "gemma3", "gemma3-mm", "olmo2"}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_family_resolves_and_positions_line_up(family, tiny_lm_factory):
    lm = tiny_lm_factory(family)
    assert lm.family.name == family
    assert lm.eoi_ids and lm.eoi_tokens == lm.tokenizer.convert_ids_to_tokens(lm.eoi_ids)
    assert lm.refusal_token_ids and not lm.missing_refusal_tokens
    batch = lm.encode(INSTRUCTIONS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n = len(lm.eoi_ids)
    assert (ids[:, -n:] == torch.tensor(lm.eoi_ids)).all()
    assert mask[:, -1].all() and not mask[:, 0].all(), "prompts of different lengths must be left padded"
    # the instruction's own tokens sit right before the post-instruction tokens
    last_word = lm.tokenizer.convert_tokens_to_ids("please")
    assert ids[2, -n - 1] == last_word


def test_family_template_used_when_tokenizer_has_none():
    model, tok = tiny_model("gemma2")  # not a paper family: the tokenizer's template, else the family's
    assert tok.chat_template is None
    fmt = resolve_format(tok, get_family("gemma2"))
    assert (fmt.kind, fmt.add_special_tokens) == ("tokenizer", False)
    (prompt,) = format_instructions(tok, fmt, ["tell me"])
    assert prompt == "<s><start_of_turn>user\ntell me<end_of_turn>\n<start_of_turn>model\n"


def test_paper_families_default_to_the_papers_format_strings():
    paper = {name for name, fam in FAMILIES.items() if fam.default_chat_format == "paper"}
    assert paper == {"llama2", "llama3", "gemma", "qwen", "qwen2", "yi"}
    # the format strings of the paper's code (pipeline/model_utils/*_model.py)
    assert get_family("llama2").paper_format.template == "[INST] {instruction} [/INST] "
    assert get_family("llama3").paper_format.template == (
        "<|start_header_id|>user<|end_header_id|>\n\n{instruction}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert get_family("gemma").paper_format.template == "<start_of_turn>user\n{instruction}<end_of_turn>\n<start_of_turn>model\n"
    for name in ("qwen", "qwen2", "yi"):
        assert get_family(name).paper_format.template == "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
    assert {n for n, f in FAMILIES.items() if f.slow_tokenizer} == {"llama2", "yi", "qwen"}
    assert {n for n, f in FAMILIES.items() if f.gpu_dtype == "float16"} == {"llama2", "yi", "qwen"}


def test_paper_format_wins_over_the_tokenizer_template_unless_asked():
    own = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
           "<|im_start|> assistant sure")
    model, tok = tiny_model("qwen2", template=own)
    lm = from_model(model, tok)
    assert lm.family.name == "qwen2" and lm.chat_format.kind == "paper"
    assert lm.format(["tell me"]) == ["<|im_start|>user\ntell me<|im_end|>\n<|im_start|>assistant\n"]
    assert lm.eoi_tokens == ["<|im_end|>", "<|im_start|>", "assistant"]  # word-level: no newline tokens
    lm = from_model(model, tok, spec=ModelSpec(path="x", chat_format="tokenizer"))
    assert lm.chat_format.kind == "tokenizer" and chat_template_for(tok, lm.family) == own
    assert lm.eoi_tokens == ["<|im_end|>", "<|im_start|>", "assistant", "sure"]


def test_tokenizer_template_wins_for_families_outside_the_paper():
    own = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
           "<|im_start|> assistant sure")
    model, tok = tiny_model("qwen3", template=own)
    lm = from_model(model, tok)
    assert lm.family.name == "qwen3" and lm.chat_format.kind == "tokenizer"
    assert lm.eoi_tokens == ["<|im_end|>", "<|im_start|>", "assistant", "sure"]
    with pytest.raises(ChatTemplateError, match="has no format in the paper's code"):
        from_model(model, tok, spec=ModelSpec(path="x", chat_format="paper"))


def test_paper_format_writes_the_bos_a_tokenizer_does_not_add():
    model, tok = tiny_model("llama3")  # the word-level test tokenizer adds no BOS itself
    lm = from_model(model, tok)
    (prompt,) = lm.format(["tell me"])
    assert prompt.startswith("<s><|start_header_id|>user")
    assert lm.encode(["tell me"])["input_ids"][0, 0].item() == tok.bos_token_id


def test_spec_refusal_token_ids_win_and_are_checked():
    model, tok = tiny_model("yi")
    lm = from_model(model, tok, spec=ModelSpec(path="x", refusal_token_ids=[7, 7, 9], refusal_tokens=["I"]))
    assert lm.refusal_token_ids == [7, 9] and lm.missing_refusal_tokens == []
    from refdir.workers.model import ModelLoadError

    with pytest.raises(ModelLoadError, match="outside the tokenizer's vocabulary"):
        from_model(model, tok, spec=ModelSpec(path="x", refusal_token_ids=[len(tok)]))


def test_auto_dtype_is_the_papers_per_family_on_gpu():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    spec = ModelSpec(path="x")
    assert {n: dtype_for(spec, cuda, get_family(n)) for n in ("qwen", "yi", "llama2", "gemma", "llama3", "mistral")} == {
        "qwen": torch.float16, "yi": torch.float16, "llama2": torch.float16,
        "gemma": torch.bfloat16, "llama3": torch.bfloat16, "mistral": torch.bfloat16}
    assert dtype_for(spec, cpu, get_family("qwen")) == torch.float32
    assert dtype_for(ModelSpec(path="x", dtype="bfloat16"), cuda, get_family("qwen")) == torch.bfloat16


def test_yi_and_smollm2_are_told_apart_by_im_sep():
    config = SimpleNamespace(model_type="llama", architectures=["LlamaForCausalLM"])
    assert resolve_family(config, build_tokenizer(CHATML_SPECIALS + ("<|im_sep|>",))).name == "yi"
    assert resolve_family(config, build_tokenizer(CHATML_SPECIALS)).name == "smollm2"
    chatml_with_sep_in_template = build_tokenizer((), template="<|im_start|><|im_end|><|im_sep|>")
    assert resolve_family(config, chatml_with_sep_in_template).name == "yi"


def test_llama_without_signatures_is_generic_and_needs_the_tokenizer_template():
    config = SimpleNamespace(model_type="llama", architectures=["LlamaForCausalLM"])
    fam = resolve_family(config, build_tokenizer(()))
    assert fam.name == "generic-llama" and fam.refusal_tokens == ("I",) and fam.chat_template is None
    assert fam.blocks == "model.layers"
    with pytest.raises(ChatTemplateError, match="no chat template"):
        chat_template_for(build_tokenizer(()), fam)
    templated = build_tokenizer((), template="{{ messages[0]['content'] }} ? sure")
    assert resolve_family(config, templated).name == "generic-llama"
    fmt = resolve_format(templated, fam)
    assert templated.convert_ids_to_tokens(eoi_token_ids(templated, fmt)) == ["?", "sure"]


def test_explicit_family_wins_and_unknown_names_suggest_close_matches():
    config = SimpleNamespace(model_type="llama", architectures=["LlamaForCausalLM"])
    assert resolve_family(config, build_tokenizer(CHATML_SPECIALS), explicit="llama3").name == "llama3"
    with pytest.raises(FamilyError, match="'qwen2'") as e:
        get_family("qwen-2")
    assert "workers/families.py" in str(e.value)


def test_unknown_architecture_lists_close_matches():
    with pytest.raises(FamilyError, match="llama") as e:
        resolve_family(SimpleNamespace(model_type="lama", architectures=["LamaForCausalLM"]))
    assert "To add one" in str(e.value)
    with pytest.raises(FamilyError, match="gpt2"):
        resolve_family(SimpleNamespace(model_type="gpt2", architectures=["GPT2LMHeadModel"]))


def test_encode_rejects_prompts_whose_tail_is_not_the_template():
    # a template whose tail depends on the instruction cannot give fixed post-instruction positions
    tok = build_tokenizer((), template="{{ messages[0]['content'] }} {% if 'cake' in messages[0]['content'] %}sure{% else %}?{% endif %}")
    fmt = resolve_format(tok, get_family("generic-llama"))
    with pytest.raises(ChatTemplateError, match="does not end with"):
        encode(tok, fmt, ["tell me", "make a cake"])


def test_missing_pad_token_is_set_to_eos():
    model, tok = tiny_model("llama3")
    tok.pad_token = None
    lm = from_model(model, tok)
    assert lm.tokenizer.pad_token == tok.eos_token and lm.tokenizer.padding_side == "left"
    assert lm.encode(INSTRUCTIONS)["input_ids"].shape[0] == 3


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_last_position_logits_equal_the_full_forward(family):
    """Extraction and scoring ask for the last position only (logits_to_keep=1); same numbers up to the
    float32 rounding of a differently shaped matmul (~1e-6 here; a wrong position would differ by ~1)."""
    from refdir.workers.model import last_position_logits

    lm = tiny_lm(family)
    enc = lm.encode(["how do i bake bread", "tell me a story about a cat"])
    with torch.inference_mode():
        torch.testing.assert_close(last_position_logits(lm, enc), lm.model(**enc).logits[:, -1, :], rtol=0, atol=2e-5)


# TinyLlama-1.1B-Chat-v1.0's chat template (a Zephyr-style format)
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)


def test_a_zephyr_format_llama_is_generic_not_the_organism(caplog):
    model, _ = tiny_model("smollm2")
    tok = build_tokenizer(("<|user|>", "<|assistant|>", "<|system|>"), template=ZEPHYR_TEMPLATE)
    with caplog.at_level("WARNING", logger="refdir.workers.families"):
        lm = from_model(model, tok)
    assert lm.family.name == "generic-llama" and lm.family.refusal_tokens == ("I",)
    assert "Zephyr-style" in caplog.text
    assert lm.tokenizer.convert_ids_to_tokens(lm.refusal_token_ids) == ["I"]
    assert lm.eoi_tokens == ["</s>", "<|assistant|>"]


def test_the_built_organism_is_recognised_by_its_config_marker_only(tmp_path):
    import json

    from refdir.workers.model import load_model
    from refdir.workers.organism import build_organism

    path = build_organism(tmp_path / "org", steps=1)
    assert load_model(ModelSpec(path=str(path))).family.name == "organism"
    cfg = json.loads((path / "config.json").read_text())
    del cfg["refdir_organism"]
    (path / "config.json").write_text(json.dumps(cfg))
    assert load_model(ModelSpec(path=str(path))).family.name == "generic-llama"  # same vocabulary, no marker
