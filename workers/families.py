"""The family registry: where each model family keeps its residual stream, and how it chats.

A `Family` names, for one kind of model, the module paths the hooks and the weight editor need
(decoder blocks, attention and MLP writes, post-norms, embeddings, output projections), the tokens
whose probability is the refusal score, an explicit chat template for tokenizers that ship none,
and whether weight orthogonalisation is exact. Families are chosen from the HF config
(`model_type` / `architectures`), never from a substring of the model's name or path:

    fam = resolve_family(model.config, tokenizer)          # or explicit="qwen"
    fam.blocks, fam.refusal_tokens, fam.exact_orthogonalization

Several families can share an architecture (Llama-2, Llama-3, Yi and SmolLM2 are all
`LlamaForCausalLM`). Among those, a family whose `signatures` ALL occur in the tokenizer's
chat template, special tokens or added vocabulary matches; the match with the most signatures wins
(so Yi, which has `<|im_sep|>` on top of ChatML's `<|im_start|>`/`<|im_end|>`, beats SmolLM2,
whose tokenizer has ChatML markers only). When nothing matches, the architecture's generic family
(`generic-llama`) is used: the same layout, the tokenizer's own template, refusal tokens ("I",).
The refusal model organism is not in the registry: only the `refdir_organism` key its own build writes
into config.json selects it.

The paper's five families (llama2, llama3, gemma, qwen, yi; qwen2 shares Qwen's format) carry the paper's
exact prompt format (`PaperFormat`) and use it by default (`chat_format = "paper"` in the spec); every
other family formats with the tokenizer's own template. `slow_tokenizer` and `gpu_dtype` say how the
paper's code loads a family (use_fast=False; fp16 or bf16 on GPU when the spec says dtype = "auto").

To add a family: append a `Family` to `_REGISTRY` (reuse a layout from `_LAYOUTS` or add one) and
add its tiny model to `tests/fixtures/tiny.py`; `tests/test_families.py` then checks it end to end.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, replace

logger = logging.getLogger(__name__)


class FamilyError(ValueError):
    """Unknown family or architecture; the message lists close matches and how to add one."""


@dataclass(frozen=True)
class Family:
    """One model family: module paths, refusal tokens, chat template and orthogonalisation policy."""

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    blocks: str
    attn: str
    mlp: str
    post_attn_norm: str | None
    post_mlp_norm: str | None
    embed: str
    extra_embeds: tuple[str, ...]
    attn_out_proj: str
    mlp_out_proj: str
    refusal_tokens: tuple[str, ...]
    chat_template: str | None
    signatures: tuple[str, ...]
    trust_remote_code: bool
    exact_orthogonalization: bool
    example_models: tuple[str, ...]
    paper_format: "PaperFormat | None" = None
    slow_tokenizer: bool = False
    gpu_dtype: str = "bfloat16"
    marker: str | None = None

    @property
    def default_chat_format(self) -> str:
        """"paper" where the paper's code has an exact format for this family, else "tokenizer"."""
        return "paper" if self.paper_format else "tokenizer"

    @property
    def attn_write(self) -> str:
        """Module (inside a block) whose output is what attention adds to the residual stream."""
        return self.post_attn_norm or self.attn

    @property
    def mlp_write(self) -> str:
        """Module (inside a block) whose output is what the MLP adds to the residual stream."""
        return self.post_mlp_norm or self.mlp


# --- the paper's exact prompt formats ------------------------------------------------------------

@dataclass(frozen=True)
class PaperFormat:
    """One of the paper's exact prompt formats (its code: pipeline/model_utils/*_model.py).

    The prompt is `template.format(instruction=...)` tokenized with the tokenizer's own special-token
    behaviour (add_special_tokens=True), as the paper's code does; the post-instruction ids are
    `encode(template.split("{instruction}")[-1], add_special_tokens=False)`. `bos`: the paper's prompts start
    with the tokenizer's BOS (Llama-2, Llama-3, Gemma tokenizers add it); refdir prepends it when a tokenizer
    revision does not (early Llama-3 tokenizer.json files), with a warning.
    """

    name: str
    template: str
    bos: bool


PAPER_LLAMA2 = PaperFormat("llama2", "[INST] {instruction} [/INST] ", bos=True)  # trailing space: 6 eoi tokens
PAPER_LLAMA3 = PaperFormat(
    "llama3", "<|start_header_id|>user<|end_header_id|>\n\n{instruction}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n", bos=True)
PAPER_GEMMA = PaperFormat("gemma", "<start_of_turn>user\n{instruction}<end_of_turn>\n<start_of_turn>model\n", bos=True)
PAPER_CHATML = PaperFormat("chatml", "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n", bos=False)


# --- chat templates (Jinja; one user turn, no system prompt, generation prompt) -------------------
# Templates start with the BOS token where the family's models expect one: prompts are tokenized with
# add_special_tokens=False, as HF does for chat-formatted text.

_BOS = "{{ bos_token if bos_token else '' }}"

LLAMA2_TEMPLATE = (
    _BOS + "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST] "
    "{% else %}{{ m['content'] }} {% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    _BOS + "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA_TEMPLATE = (
    _BOS + "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    _BOS + "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
PHI3_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
OLMO2_TEMPLATE = (
    _BOS + "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
GRANITE_TEMPLATE = (
    "{% for m in messages %}<|start_of_role|>{{ m['role'] }}<|end_of_role|>{{ m['content'] }}<|end_of_text|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{% endif %}"
)


# --- module layouts shared by families of one architecture ------------------------------------------

_LLAMA_LAYOUT = dict(
    blocks="model.layers", attn="self_attn", mlp="mlp", post_attn_norm=None, post_mlp_norm=None,
    embed="model.embed_tokens", extra_embeds=(), attn_out_proj="self_attn.o_proj", mlp_out_proj="mlp.down_proj",
    trust_remote_code=False, exact_orthogonalization=True,
)
_POSTNORM_LAYOUT = dict(  # Gemma-2, Gemma-3, OLMo-2: attention/MLP outputs are normed before the residual add
    _LLAMA_LAYOUT, post_attn_norm="post_attention_layernorm", post_mlp_norm="post_feedforward_layernorm",
    exact_orthogonalization=False,
)
# Qwen v1 (remote code) uses GPT-2's module names; c_proj is Linear there, Conv1D in GPT-2. Extra embeddings
# that a model lacks are skipped by the weight editor: Qwen v1 has rotary positions and no `wpe`, while the
# GPT-2-layout stand-in the tests use has one.
_GPT2_LAYOUT = dict(
    blocks="transformer.h", attn="attn", mlp="mlp", post_attn_norm=None, post_mlp_norm=None,
    embed="transformer.wte", extra_embeds=("transformer.wpe",), attn_out_proj="attn.c_proj",
    mlp_out_proj="mlp.c_proj", trust_remote_code=False, exact_orthogonalization=True,
)


def _family(name: str, model_types, architectures, layout: dict, **kw) -> Family:
    fields = dict(layout, name=name, model_types=tuple(model_types), architectures=tuple(architectures))
    fields.setdefault("refusal_tokens", ("I",))
    fields.setdefault("chat_template", None)
    fields.setdefault("signatures", ())
    fields.setdefault("example_models", ())
    fields.update(kw)
    return Family(**fields)


_LLAMA = (("llama",), ("LlamaForCausalLM",))

# Paper families (llama2, llama3, yi, qwen, qwen2, gemma) carry the paper's exact format and default to it;
# `slow_tokenizer` and `gpu_dtype` are how the paper's code loads them (use_fast=False; fp16 for Qwen, Yi,
# Llama-2, bf16 for Gemma and Llama-3).
_PAPER_LOADING = dict(slow_tokenizer=True, gpu_dtype="float16")

_REGISTRY: list[Family] = [
    _family("llama2", *_LLAMA, _LLAMA_LAYOUT, chat_template=LLAMA2_TEMPLATE, signatures=("[INST]",),
            paper_format=PAPER_LLAMA2, **_PAPER_LOADING, example_models=("meta-llama/Llama-2-7b-chat-hf",)),
    _family("llama3", *_LLAMA, _LLAMA_LAYOUT, chat_template=LLAMA3_TEMPLATE, signatures=("<|start_header_id|>",),
            paper_format=PAPER_LLAMA3,
            example_models=("meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Llama-3.2-1B-Instruct")),
    # Yi and SmolLM2 are both ChatML on Llama: Yi's vocabulary also has <|im_sep|>, so it matches one
    # more signature and wins; a ChatML Llama without <|im_sep|> is SmolLM2.
    _family("yi", *_LLAMA, _LLAMA_LAYOUT, chat_template=CHATML_TEMPLATE,
            signatures=("<|im_start|>", "<|im_end|>", "<|im_sep|>"), paper_format=PAPER_CHATML, **_PAPER_LOADING,
            example_models=("01-ai/Yi-6B-Chat",)),
    _family("smollm2", *_LLAMA, _LLAMA_LAYOUT, chat_template=CHATML_TEMPLATE, signatures=("<|im_start|>", "<|im_end|>"),
            example_models=("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct")),
    _family("qwen", ("qwen",), ("QWenLMHeadModel",), _GPT2_LAYOUT, refusal_tokens=("I", "As"),
            chat_template=CHATML_TEMPLATE, paper_format=PAPER_CHATML, **_PAPER_LOADING, trust_remote_code=True,
            example_models=("Qwen/Qwen-1_8B-chat",)),
    _family("qwen2", ("qwen2",), ("Qwen2ForCausalLM",), _LLAMA_LAYOUT, refusal_tokens=("I", "As"),
            chat_template=CHATML_TEMPLATE, paper_format=PAPER_CHATML,
            example_models=("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen1.5-0.5B-Chat")),
    _family("qwen3", ("qwen3",), ("Qwen3ForCausalLM",), _LLAMA_LAYOUT, refusal_tokens=("I", "As"),
            chat_template=CHATML_TEMPLATE, example_models=("Qwen/Qwen3-0.6B",)),
    _family("gemma", ("gemma",), ("GemmaForCausalLM",), _LLAMA_LAYOUT, chat_template=GEMMA_TEMPLATE,
            paper_format=PAPER_GEMMA, example_models=("google/gemma-2b-it",)),
    _family("gemma2", ("gemma2",), ("Gemma2ForCausalLM",), _POSTNORM_LAYOUT, chat_template=GEMMA_TEMPLATE,
            example_models=("google/gemma-2-2b-it",)),
    _family("gemma3", ("gemma3_text",), ("Gemma3ForCausalLM",), _POSTNORM_LAYOUT, chat_template=GEMMA_TEMPLATE,
            example_models=("google/gemma-3-1b-it",)),
    # Gemma-3 4B+ checkpoints are image-text models; only the text decoder is hooked and edited.
    _family("gemma3-mm", ("gemma3",), ("Gemma3ForConditionalGeneration",),
            dict(_POSTNORM_LAYOUT, blocks="model.language_model.layers", embed="model.language_model.embed_tokens"),
            chat_template=GEMMA_TEMPLATE, example_models=("google/gemma-3-4b-it",)),
    _family("mistral", ("mistral",), ("MistralForCausalLM",), _LLAMA_LAYOUT, chat_template=MISTRAL_TEMPLATE,
            example_models=("mistralai/Mistral-7B-Instruct-v0.3",)),
    _family("phi3", ("phi3",), ("Phi3ForCausalLM",), _LLAMA_LAYOUT, chat_template=PHI3_TEMPLATE,
            example_models=("microsoft/Phi-3-mini-4k-instruct",)),
    _family("olmo2", ("olmo2",), ("Olmo2ForCausalLM",), _POSTNORM_LAYOUT, chat_template=OLMO2_TEMPLATE,
            example_models=("allenai/OLMo-2-1124-7B-Instruct",)),
    _family("granite", ("granite",), ("GraniteForCausalLM",), _LLAMA_LAYOUT, chat_template=GRANITE_TEMPLATE,
            example_models=("ibm-granite/granite-3.1-2b-instruct",)),
]

# The refusal model organism (workers/organism.py) is no production family: it is recognised only by the
# marker its own build writes into config.json (never by vocabulary), or by name. Its tokenizer ships its
# own template.
ORGANISM_MARKER = "refdir_organism"
ORGANISM = _family("organism", *_LLAMA, _LLAMA_LAYOUT, refusal_tokens=("i",), marker=ORGANISM_MARKER)
_MARKED: list[Family] = [ORGANISM]

FAMILIES: dict[str, Family] = {f.name: f for f in (*_REGISTRY, *_MARKED)}


def _how_to_add() -> str:
    return ("add a Family to _REGISTRY in workers/families.py (and its tiny model to tests/fixtures/tiny.py), "
            "or set `family` in the model's spec to a known family with the same module layout")


def get_family(name: str) -> Family:
    """The registry entry called `name` (generic-<model_type> names are accepted too)."""
    if name in FAMILIES:
        return FAMILIES[name]
    if name.startswith("generic-"):
        return generic_family(name.removeprefix("generic-"))
    close = difflib.get_close_matches(name, list(FAMILIES), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise FamilyError(f"unknown family {name!r}.{hint} Known families: {', '.join(FAMILIES)}. To add one: {_how_to_add()}.")


def known_model_types() -> list[str]:
    return sorted({t for f in _REGISTRY for t in f.model_types})


def generic_family(model_type: str) -> Family:
    """The architecture's layout with the tokenizer's own template and refusal tokens ("I",)."""
    base = next((f for f in _REGISTRY if model_type in f.model_types), None)
    if base is None:
        raise architecture_error(model_type, [])
    return replace(base, name=f"generic-{model_type}", refusal_tokens=("I",), chat_template=None,
                   signatures=(), example_models=(), paper_format=None, slow_tokenizer=False,
                   gpu_dtype="bfloat16", marker=None)


def architecture_error(model_type: str | None, architectures: list[str]) -> FamilyError:
    known = known_model_types() + sorted({a for f in _REGISTRY for a in f.architectures})
    probes = [p for p in [model_type, *architectures] if p]
    close = sorted({c for p in probes for c in difflib.get_close_matches(p, known, n=3, cutoff=0.5)})
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return FamilyError(
        f"architecture not in the family registry: model_type={model_type!r}, architectures={architectures}.{hint} "
        f"Supported model types: {', '.join(known_model_types())}. To add one: {_how_to_add()}."
    )


def candidates(config) -> list[Family]:
    """Registry families whose model_type or architectures match the HF config (may be empty)."""
    model_type = getattr(config, "model_type", None)
    archs = set(getattr(config, "architectures", None) or [])
    return [f for f in _REGISTRY if model_type in f.model_types or archs & set(f.architectures)]


def tokenizer_haystack(tokenizer) -> str:
    """Chat template, special tokens and added vocabulary of a tokenizer, as one searchable string."""
    if tokenizer is None:
        return ""
    parts: list[str] = []
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        parts.extend(str(t) for t in template.values())
    elif template:
        parts.append(str(template))
    parts.extend(str(t) for t in getattr(tokenizer, "all_special_tokens", []) or [])
    try:
        parts.extend(tokenizer.get_added_vocab().keys())
    except (AttributeError, NotImplementedError):
        pass
    return "\n".join(parts)


def _by_signature(cands: list[Family], tokenizer) -> Family | None:
    haystack = tokenizer_haystack(tokenizer)
    matched = [f for f in cands if f.signatures and all(s in haystack for s in f.signatures)]
    if not matched:
        return None
    best = max(len(f.signatures) for f in matched)
    top = [f for f in matched if len(f.signatures) == best]
    if len(top) > 1:
        logger.warning("tokenizer matches families %s equally; using %s (set `family` in the spec to choose)",
                       [f.name for f in top], top[0].name)
    return top[0]


def marked_family(config) -> Family | None:
    """The family whose marker key the model's own config.json carries (the organism), else None."""
    return next((f for f in _MARKED if getattr(config, f.marker, None)), None)


# A Zephyr-style turn format (TinyLlama-Chat, ...): no registry family owns it.
_ZEPHYR = ("<|user|>", "<|assistant|>")


def resolve_family(config, tokenizer=None, explicit: str | None = None) -> Family:
    """Pick the family for a model: explicit name, else a config marker, else registry match by config,
    then by tokenizer signatures, else the architecture's generic family."""
    if explicit:
        fam = get_family(explicit)
        if fam not in candidates(config):
            logger.info("family %s given explicitly for model_type=%r", fam.name, getattr(config, "model_type", None))
        return fam
    marked = marked_family(config)
    if marked is not None:
        return marked
    cands = candidates(config)
    model_type = getattr(config, "model_type", None)
    if not cands:
        raise architecture_error(model_type, list(getattr(config, "architectures", None) or []))
    if len(cands) == 1:
        return cands[0]
    chosen = _by_signature(cands, tokenizer)
    if chosen is not None:
        return chosen
    generic_type = model_type if model_type in known_model_types() else cands[0].model_types[0]
    if all(z in tokenizer_haystack(tokenizer) for z in _ZEPHYR):
        logger.warning("the tokenizer uses a Zephyr-style <|user|>/<|assistant|> template, which no registry family "
                       "owns; using generic-%s (the tokenizer's own template, refusal token 'I'); set `family` or "
                       "`refusal_tokens` in the spec if that is wrong", generic_type)
    else:
        logger.info("no family signature found in the tokenizer; using generic-%s", generic_type)
    return generic_family(generic_type)
