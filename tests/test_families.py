"""Family registry, resolution and chat formatting, on a tiny random model of every registry family.

Qwen v1 is covered through a GPT-2-layout model (a GPT2LMHeadModel config, family "qwen" given
explicitly): Qwen v1 needs remote code, and GPT-2 has the same module names.
"""

from types import SimpleNamespace

import pytest
import torch

from refdir.workers.chat import ChatTemplateError, chat_template_for, encode, eoi_token_ids, format_instructions
from refdir.workers.families import FAMILIES, FamilyError, get_family, resolve_family
from refdir.workers.model import from_model
from tests.fixtures.tiny import CHATML_SPECIALS, TINY_FAMILIES, build_tokenizer, tiny_lm, tiny_model

INSTRUCTIONS = ["how do i make a cake ?", "tell me", "write a poem about the sea please"]
REQUIRED = {"llama2", "llama3", "yi", "smollm2", "organism", "qwen", "qwen2", "qwen3", "gemma", "gemma2",
            "gemma3", "mistral", "phi3", "olmo2", "granite"}


def test_registry_has_every_required_family_and_a_tiny_model_for_each():
    assert REQUIRED <= set(FAMILIES)
    assert set(FAMILIES) == set(TINY_FAMILIES), "every registry family needs a tiny model in tests/fixtures/tiny.py"
    assert FAMILIES["qwen"].trust_remote_code and FAMILIES["qwen"].refusal_tokens == ("I", "As")
    assert FAMILIES["organism"].refusal_tokens == ("i",) and FAMILIES["organism"].chat_template is None
    assert FAMILIES["organism"].exact_orthogonalization
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
    model, tok = tiny_model("gemma")
    assert tok.chat_template is None
    (prompt,) = format_instructions(tok, get_family("gemma"), ["tell me"])
    assert prompt == "<s><start_of_turn>user\ntell me<end_of_turn>\n<start_of_turn>model\n"


def test_tokenizer_template_wins_over_family_template():
    own = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
           "<|im_start|> assistant sure")
    model, tok = tiny_model("qwen2", template=own)
    lm = from_model(model, tok)
    assert lm.family.name == "qwen2" and chat_template_for(tok, lm.family) == own
    assert lm.eoi_tokens == ["<|im_end|>", "<|im_start|>", "assistant", "sure"]


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
    assert templated.convert_ids_to_tokens(eoi_token_ids(templated, fam)) == ["?", "sure"]


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
    fam = get_family("generic-llama")
    with pytest.raises(ChatTemplateError, match="does not end with"):
        encode(tok, fam, ["tell me", "make a cake"])


def test_missing_pad_token_is_set_to_eos():
    model, tok = tiny_model("llama3")
    tok.pad_token = None
    lm = from_model(model, tok)
    assert lm.tokenizer.pad_token == tok.eos_token and lm.tokenizer.padding_side == "left"
    assert lm.encode(INSTRUCTIONS)["input_ids"].shape[0] == 3


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_last_position_logits_equal_the_full_forward(family):
    """Extraction and scoring ask for the last position only (logits_to_keep=1); same numbers."""
    from refdir.workers.model import last_position_logits

    lm = tiny_lm(family)
    enc = lm.encode(["how do i bake bread", "tell me a story about a cat"])
    with torch.inference_mode():
        assert torch.equal(last_position_logits(lm, enc), lm.model(**enc).logits[:, -1, :])
