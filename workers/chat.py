"""Chat formatting and the post-instruction ("end of instruction") positions.

Prompts are one user turn with no system prompt and the assistant turn opened. A `ChatFormat` says how
they are built, per model (`chat_format` in the spec; the default is the family's):

- "paper": the paper's exact format string for the family (Llama-2 `"[INST] {instruction} [/INST] "`,
  Llama-3, Gemma, Qwen/Yi ChatML), tokenized with the tokenizer's own special tokens
  (add_special_tokens=True: BOS where the tokenizer adds it), as the paper's code does. The
  post-instruction ids are the paper's `encode(template.split("{instruction}")[-1], add_special_tokens=False)`;
  their count is the number of positions. For Llama-2 that is 6 (`▁ ▁[ / INST ] ▁`) while a prompt ends
  with only 5 of them (in context the space before `[/INST]` is the `▁` of `▁[`), so the first of the
  6 positions is the instruction's last token, exactly as in the paper's code.
- "tokenizer": the tokenizer's own Jinja chat template (else the family's), rendered with the BOS the
  template writes and tokenized with add_special_tokens=False; a template that injects a default system
  prompt gives way to the family's template. The post-instruction ids are the template tokens after the
  instruction, as they appear in context.

Prompts are left padded, so the last positions of every row are the template's:

    fmt = resolve_format(tok, fam)                   # fam.default_chat_format unless given
    ids = eoi_token_ids(tok, fmt)                    # e.g. <|im_end|> \\n <|im_start|> assistant \\n
    batch = encode(tok, fmt, ["How do I bake bread?"])
    batch["input_ids"][:, -len(tail_token_ids(tok, fmt)):]   # the template's tokens in every row
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import BatchEncoding

from refdir.workers.families import FAMILIES, Family

logger = logging.getLogger(__name__)

# A plain word that ends cleanly at a token boundary in every tokenizer we know.
_PLACEHOLDER = "Describe the weather today"


class ChatTemplateError(ValueError):
    """No usable chat template, or prompts whose post-instruction tokens do not line up."""


@dataclass(frozen=True)
class ChatFormat:
    """How prompts are built for one model: the paper's format string or a Jinja chat template."""

    kind: str  # "paper" | "tokenizer"
    template: str  # paper: a string holding "{instruction}" once; tokenizer: a Jinja chat template
    add_special_tokens: bool  # paper: the tokenizer adds its BOS; tokenizer: the template writes it
    source: str  # where the format comes from, for doctor and logs


def resolve_format(tokenizer, family: Family, requested: str | None = None) -> ChatFormat:
    """The format in force for `family`: `requested` ("paper" | "tokenizer"), else the family's default."""
    kind = requested or family.default_chat_format
    if kind == "tokenizer":
        template, source = _pick_template(tokenizer, family)
        return ChatFormat("tokenizer", template, False, source)
    if kind != "paper":
        raise ChatTemplateError(f"chat_format must be 'paper' or 'tokenizer', got {kind!r}")
    paper = family.paper_format
    if paper is None:
        having = sorted(f.name for f in FAMILIES.values() if f.paper_format)
        raise ChatTemplateError(f"chat_format = 'paper' but family {family.name!r} has no format in the paper's code "
                                f"(families that do: {', '.join(having)}); use chat_format = 'tokenizer'")
    template = paper.template
    if paper.bos and tokenizer.bos_token and not _adds_bos(tokenizer):
        logger.warning("family %s: the tokenizer does not add its BOS %r itself (the paper's code relies on it); "
                       "refdir writes it at the start of every prompt", family.name, tokenizer.bos_token)
        template = tokenizer.bos_token + template
    return ChatFormat("paper", template, True, f"paper format {paper.name!r} (family {family.name})")


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer(_PLACEHOLDER, add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def injects_system_prompt(tokenizer, template: str) -> bool:
    """True when `template` renders a system turn for a user-only conversation (SmolLM2, Qwen2.5, Llama-3.1)."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _PLACEHOLDER}], chat_template=template,
                                             tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot render is reported when it is used
        return False
    return "system" in text.split(_PLACEHOLDER, 1)[0].lower()


def chat_template_for(tokenizer, family: Family) -> str:
    """The tokenizer's chat template, else the family's, else ChatTemplateError.

    The paper uses no system prompt. A tokenizer template that injects a default one for a user-only
    conversation gives way to the family's template when the family has one (else it is kept, with a
    warning), so every family is formatted the same way.
    """
    return _pick_template(tokenizer, family)[0]


def _pick_template(tokenizer, family: Family) -> tuple[str, str]:
    """(Jinja template, where it comes from); see chat_template_for."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    if template and injects_system_prompt(tokenizer, template):
        if family.chat_template:
            logger.info("the tokenizer's chat template adds a default system prompt; using family %s's template",
                        family.name)
            return family.chat_template, f"family {family.name}'s template (the tokenizer's adds a system prompt)"
        logger.warning("the tokenizer's chat template adds a default system prompt and family %s has no template "
                       "without one; prompts will carry it", family.name)
    if template:
        return template, "the tokenizer's chat template"
    if family.chat_template:
        return family.chat_template, f"family {family.name}'s template (the tokenizer has none)"
    raise ChatTemplateError(
        f"the tokenizer has no chat template and family {family.name!r} defines none. Fix: pick a chat/instruct "
        f"checkpoint whose tokenizer_config.json has `chat_template`, set `family` in the spec to a family with "
        f"a template (see `refdir families`), or add `chat_template` to family {family.name!r} in workers/families.py."
    )


def ensure_padding(tokenizer) -> None:
    """Left padding, and a pad token when the tokenizer has none: its EOS token, else (Qwen v1's
    tokenizer, which has neither) its `eod_id` token, as the paper's code pads Qwen."""
    if tokenizer.pad_token is None:
        eod = getattr(tokenizer, "eod_id", None)
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
            logger.debug("pad token set to EOS %r", tokenizer.eos_token)
        elif eod is not None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(eod)
            logger.debug("pad token set to the eod token %r (id %d)", tokenizer.pad_token, eod)
        else:
            raise ChatTemplateError("the tokenizer has neither a pad token, an EOS token nor an eod_id to pad with; "
                                    "set tokenizer.pad_token before encoding")
    tokenizer.padding_side = "left"


def format_instructions(tokenizer, fmt: ChatFormat, instructions: list[str]) -> list[str]:
    """Formatted prompt strings: one user turn each, no system prompt, the assistant turn opened."""
    if fmt.kind == "paper":
        return [fmt.template.replace("{instruction}", text) for text in instructions]
    out = []
    for text in instructions:
        try:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], chat_template=fmt.template,
                add_generation_prompt=True, tokenize=False,
            )
        except Exception as e:  # jinja errors come in many types; name the template source
            raise ChatTemplateError(f"chat template ({fmt.source}) failed to render: {e}") from e
        out.append(prompt)
    return out


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def eoi_token_ids(tokenizer, fmt: ChatFormat) -> list[int]:
    """The post-instruction token ids; their count is the number of positions directions are extracted at.

    Paper format: the paper's rule, encode(template after "{instruction}", add_special_tokens=False).
    Tokenizer format: the template's tokens after the instruction as they appear in context."""
    if fmt.kind == "paper":
        ids = _ids(tokenizer, fmt.template.split("{instruction}")[-1])
        if not ids:
            raise ChatTemplateError(f"{fmt.source}: nothing follows the instruction")
        return ids
    return tail_token_ids(tokenizer, fmt)


def tail_token_ids(tokenizer, fmt: ChatFormat) -> list[int]:
    """The template's tokens after the instruction as they appear in a tokenized prompt (every row ends so)."""
    (prompt,) = format_instructions(tokenizer, fmt, [_PLACEHOLDER])
    end = prompt.rfind(_PLACEHOLDER)
    if end < 0:
        raise ChatTemplateError(f"{fmt.source}: the chat template does not contain the instruction text")
    end += len(_PLACEHOLDER)
    full = _ids(tokenizer, prompt, fmt.add_special_tokens)
    prefix = _ids(tokenizer, prompt[:end], fmt.add_special_tokens)
    if full[: len(prefix)] != prefix:  # the instruction's last token merged with the template: keep the clean part
        common = next((i for i, (a, b) in enumerate(zip(full, prefix)) if a != b), min(len(full), len(prefix)))
        logger.warning("%s: instruction and template tokens merge at the boundary", fmt.source)
        prefix = prefix[:common]
    tail = full[len(prefix):]
    if not tail:
        raise ChatTemplateError(
            f"{fmt.source}: the chat template adds no tokens after the instruction, so there are no "
            f"post-instruction positions; the template must end with the assistant turn's header"
        )
    return tail


def encode(tokenizer, fmt: ChatFormat, instructions: list[str], device="cpu",
           tail_ids: list[int] | None = None) -> BatchEncoding:
    """Left-padded input_ids + attention_mask (batch, seq); each row must end with the template's tail tokens."""
    if not instructions:
        raise ValueError("encode() got no instructions")
    ensure_padding(tokenizer)
    tail = tail_ids if tail_ids is not None else tail_token_ids(tokenizer, fmt)
    prompts = format_instructions(tokenizer, fmt, instructions)
    batch = tokenizer(prompts, add_special_tokens=fmt.add_special_tokens, padding=True, padding_side="left",
                      return_tensors="pt")
    got = batch["input_ids"][:, -len(tail):]  # (batch, n_tail)
    bad = (got != torch.tensor(tail)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise ChatTemplateError(
            f"{fmt.source}: prompt {i} ({instructions[i][:60]!r}) does not end with the post-instruction "
            f"tokens {tokenizer.convert_ids_to_tokens(tail)} but with {tokenizer.convert_ids_to_tokens(got[i].tolist())}; "
            f"the instruction's last characters merge with the template (strip trailing whitespace) "
            f"or the template varies with the input"
        )
    return BatchEncoding({k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")})
