"""Chat formatting and the post-instruction ("end of instruction") positions.

Prompts are one user turn with no system prompt and the generation prompt appended, formatted with
the tokenizer's own chat template when it has one, else the family's explicit template. They are
tokenized with add_special_tokens=False (templates carry their own BOS) and left padded, so the last
n_eoi positions of every row are the template tokens that follow the instruction:

    ids = eoi_token_ids(tok, fam)                  # e.g. <|im_end|> \\n <|im_start|> assistant \\n
    batch = encode(tok, fam, ["How do I bake bread?"])
    batch["input_ids"][:, -len(ids):]              # == ids for every row
"""

from __future__ import annotations

import logging

import torch
from transformers import BatchEncoding

from refdir.workers.families import Family

logger = logging.getLogger(__name__)

# A plain word that ends cleanly at a token boundary in every tokenizer we know.
_PLACEHOLDER = "Describe the weather today"


class ChatTemplateError(ValueError):
    """No usable chat template, or prompts whose post-instruction tokens do not line up."""


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
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    if template and injects_system_prompt(tokenizer, template):
        if family.chat_template:
            logger.info("the tokenizer's chat template adds a default system prompt; using family %s's template",
                        family.name)
            return family.chat_template
        logger.warning("the tokenizer's chat template adds a default system prompt and family %s has no template "
                       "without one; prompts will carry it", family.name)
    if template:
        return template
    if family.chat_template:
        return family.chat_template
    raise ChatTemplateError(
        f"the tokenizer has no chat template and family {family.name!r} defines none. Fix: pick a chat/instruct "
        f"checkpoint whose tokenizer_config.json has `chat_template`, set `family` in the spec to a family with "
        f"a template (see `refdir families`), or add `chat_template` to family {family.name!r} in workers/families.py."
    )


def ensure_padding(tokenizer) -> None:
    """Left padding, and a pad token (the EOS token) when the tokenizer has none."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ChatTemplateError("the tokenizer has neither a pad token nor an EOS token to pad with; "
                                    "set tokenizer.pad_token before encoding")
        tokenizer.pad_token = tokenizer.eos_token
        logger.debug("pad token set to EOS %r", tokenizer.eos_token)
    tokenizer.padding_side = "left"


def format_instructions(tokenizer, family: Family, instructions: list[str]) -> list[str]:
    """Chat-formatted prompt strings: one user turn each, no system prompt, generation prompt added."""
    template = chat_template_for(tokenizer, family)
    out = []
    for text in instructions:
        try:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], chat_template=template,
                add_generation_prompt=True, tokenize=False,
            )
        except Exception as e:  # jinja errors come in many types; name the family and template source
            raise ChatTemplateError(f"chat template of family {family.name!r} failed to render: {e}") from e
        out.append(prompt)
    return out


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eoi_token_ids(tokenizer, family: Family) -> list[int]:
    """Token ids the template puts after the instruction (the positions directions are extracted at)."""
    (prompt,) = format_instructions(tokenizer, family, [_PLACEHOLDER])
    end = prompt.rfind(_PLACEHOLDER)
    if end < 0:
        raise ChatTemplateError(f"family {family.name!r}: the chat template does not contain the instruction text")
    end += len(_PLACEHOLDER)
    full, prefix = _ids(tokenizer, prompt), _ids(tokenizer, prompt[:end])
    if full[: len(prefix)] != prefix:  # the instruction's last token merged with the template: keep the clean part
        common = next((i for i, (a, b) in enumerate(zip(full, prefix)) if a != b), min(len(full), len(prefix)))
        logger.warning("family %s: instruction and template tokens merge at the boundary", family.name)
        prefix = prefix[:common]
    eoi = full[len(prefix):]
    if not eoi:
        raise ChatTemplateError(
            f"family {family.name!r}: the chat template adds no tokens after the instruction, so there are no "
            f"post-instruction positions; the template must end with the assistant turn's header"
        )
    return eoi


def encode(tokenizer, family: Family, instructions: list[str], device="cpu",
           eoi_ids: list[int] | None = None) -> BatchEncoding:
    """Left-padded input_ids + attention_mask (batch, seq); the last n_eoi ids of each row are checked."""
    if not instructions:
        raise ValueError("encode() got no instructions")
    ensure_padding(tokenizer)
    eoi = eoi_ids if eoi_ids is not None else eoi_token_ids(tokenizer, family)
    prompts = format_instructions(tokenizer, family, instructions)
    batch = tokenizer(prompts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    tail = batch["input_ids"][:, -len(eoi):]  # (batch, n_eoi)
    bad = (tail != torch.tensor(eoi)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise ChatTemplateError(
            f"family {family.name!r}: prompt {i} ({instructions[i][:60]!r}) does not end with the post-instruction "
            f"tokens {tokenizer.convert_ids_to_tokens(eoi)} but with {tokenizer.convert_ids_to_tokens(tail[i].tolist())}; "
            f"the instruction's last characters merge with the template (strip trailing whitespace) "
            f"or the template varies with the input"
        )
    return BatchEncoding({k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")})
