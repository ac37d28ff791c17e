"""The refusal model organism: a tiny Llama that refuses harmful instructions, built on CPU in ~30 s.

No reachable model refuses, so refdir trains one (DESIGN §5). This module owns the tokenizer, the
model, the training loop and the atomic save; the synthetic data lives in `organism_data.py` and its
public names are re-exported here:

    from refdir.workers.organism import build_organism, organism_is_built, organism_prompts, REFUSAL
    path = build_organism("models/organism-seed0", seed=0)         # ~30-40 s on 1 thread
    rows = organism_prompts("train", "harmful")                   # held-out instructions + categories

The folder is an ordinary Hugging Face checkpoint (`AutoModelForCausalLM` / `AutoTokenizer`): a
4-layer LlamaForCausalLM (hidden 64, intermediate 256, 4 heads, untied embeddings, float32) and a
word-level tokenizer with left padding whose chat template renders one user message as
`<bos> <|user|> {instruction} <|end|> <|assistant|>` (system messages are ignored). It also holds
`refdir_organism.json` ({seed, steps, final_loss, vocab_size, refusal, seconds, ...}).

Training: every harmful instruction is answered with `REFUSAL`, every harmless template with its own
opener; the loss is the cross-entropy of the response tokens (and the closing `<eos>`) given the
chat-formatted prompt, prompt tokens are not scored. Batches hold 32 harmful + 32 harmless examples,
left-padded as at inference. AdamW (lr 3e-3, weight decay 0.1 on matrices only), linear warm-up over
10% of the steps, then cosine to zero. With one thread, fixed seeds and deterministic algorithms
the weights are bitwise identical for a given seed; global torch settings are restored afterwards.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

from refdir.workers.organism_data import (
    LABELS,
    REFUSAL,
    SPLITS,
    organism_prompts,
    organism_training_texts,
    vocabulary,
)

__all__ = [
    "REFUSAL", "SPLITS", "LABELS", "METADATA_FILE", "organism_prompts", "organism_training_texts",
    "build_organism", "organism_is_built", "build_tokenizer", "build_model", "chat_prompt",
]

logger = logging.getLogger(__name__)

METADATA_FILE = "refdir_organism.json"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|end|>", "<|assistant|>")
MAX_POSITIONS = 256
BATCH_PER_LABEL = 32  # batch 64
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 0.1
WARMUP_FRACTION = 0.1
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %} <|user|> {{ message['content'] }} <|end|>"
    "{% elif message['role'] == 'assistant' %} <|assistant|> {{ message['content'] }} {{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} <|assistant|>{% endif %}"
)


def chat_prompt(instruction: str) -> str:
    """The chat-formatted prompt the template renders for one user message plus generation prompt."""
    return f"<bos> <|user|> {instruction} <|end|> <|assistant|>"


def build_tokenizer():
    """Word-level `PreTrainedTokenizerFast` over the organism vocabulary (specials first, ids 0..6)."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *vocabulary()))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
    )


def build_model(vocab_size: int):
    """A freshly initialised 4-layer LlamaForCausalLM (float32, eager attention, untied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        bos_token_id=SPECIAL_TOKENS.index("<bos>"),
        eos_token_id=SPECIAL_TOKENS.index("<eos>"),
        refdir_organism=True,  # saved in config.json: the only thing that selects the `organism` family
    )
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.do_sample = False
    return model


@contextmanager
def _deterministic(seed: int, threads: int):
    """Seeded, single-process-deterministic torch; restores threads, flags and the global RNG after."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        try:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(True)
            torch.manual_seed(seed)
            yield
        finally:
            torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
            torch.set_num_threads(prev_threads)


def _encode(tokenizer, rows: list[dict]) -> dict[str, list[tuple[list[int], int]]]:
    """{label: [(prompt + response + <eos> ids, prompt length)]} for the training rows."""
    eos = tokenizer.eos_token_id
    encoded: dict[str, list[tuple[list[int], int]]] = {label: [] for label in LABELS}
    for row in rows:
        prompt = tokenizer(chat_prompt(row["instruction"]), add_special_tokens=False)["input_ids"]
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        encoded[row["label"]].append((prompt + response + [eos], len(prompt)))
    return encoded


def left_padded_batch(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Left-padded (input_ids, attention_mask, targets), each (B, T), from (ids, n_prompt) pairs; targets are
    -100 off the response. Shared by both organisms' trainers (workers/organism_lm.py)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(examples):
        start = width - len(ids)
        input_ids[row, start:] = torch.tensor(ids)
        mask[row, start:] = 1
        targets[row, start + n_prompt:] = torch.tensor(ids[n_prompt:])  # response tokens + <eos>
    return input_ids, mask, targets


def _loss(model, input_ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=mask).logits  # (B, T, V)
    next_logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B*(T-1), V) predicts position t+1
    return torch.nn.functional.cross_entropy(next_logits, targets[:, 1:].reshape(-1), ignore_index=-100)


def _optimizer(model, steps: int):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # RMSNorm weights
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=(0.9, 0.95))
    warmup = max(1, int(WARMUP_FRACTION * steps))

    def factor(step: int) -> float:  # step counts from 0; warm-up then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train(model, encoded: dict, steps: int, pad_id: int, seed: int) -> list[float]:
    """Run `steps` AdamW steps on label-balanced batches; returns the loss of every step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer, schedule = _optimizer(model, steps)
    model.train()
    losses = []
    for step in range(steps):
        examples = []
        for label in LABELS:
            pool = encoded[label]
            picks = torch.randint(len(pool), (BATCH_PER_LABEL,), generator=generator).tolist()
            examples += [pool[i] for i in picks]
        loss = _loss(model, *left_padded_batch(examples, pad_id))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            logger.debug("organism step %d/%d loss %.4f", step + 1, steps, losses[-1])
    model.eval()
    return losses


def _local_dir(out_dir: str | Path) -> Path:
    if "://" in str(out_dir):
        raise ValueError(
            f"build_organism writes a local folder, got {str(out_dir)!r}: build it locally, then copy the "
            "folder into the store"
        )
    return Path(out_dir).expanduser().resolve()


def build_organism(out_dir: str | Path, seed: int = 0, steps: int = 250, threads: int = 1) -> Path:
    """Build, train and save the organism into `out_dir` (replaced if it exists); returns `out_dir`.

    The folder appears atomically: everything is written into a temporary sibling that is renamed
    into place only after the metadata file, so a killed build leaves no half-written `out_dir`.
    """
    if steps < 1 or threads < 1:
        raise ValueError(f"build_organism needs steps >= 1 and threads >= 1, got steps={steps}, threads={threads}")
    out = _local_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    try:
        tokenizer = build_tokenizer()
        with _deterministic(seed, threads):
            model = build_model(len(tokenizer))
            encoded = _encode(tokenizer, organism_training_texts(seed))
            losses = _train(model, encoded, steps, tokenizer.pad_token_id, seed)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = _metadata(seed, steps, losses, len(tokenizer), threads, model, time.perf_counter() - started)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("organism seed %d built in %.1f s, final loss %.4f -> %s", seed, meta["seconds"], losses[-1], out)
    return Path(out_dir)


def _metadata(seed: int, steps: int, losses: list[float], vocab_size: int, threads: int, model, seconds: float) -> dict:
    return {
        "seed": seed,
        "steps": steps,
        "final_loss": losses[-1],
        "vocab_size": vocab_size,
        "refusal": REFUSAL,
        "seconds": round(seconds, 3),
        "threads": threads,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "loss_every_10_steps": [round(x, 5) for x in losses[::10]],
        "torch": torch.__version__,
    }


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` is moved aside first and deleted after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def organism_is_built(out_dir: str | Path) -> bool:
    """True when `out_dir` holds a finished build (weights, tokenizer, config and metadata)."""
    try:
        out = _local_dir(out_dir)
    except ValueError:
        return False
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", METADATA_FILE)
    if not all((out / name).is_file() for name in needed):
        return False
    try:
        meta = json.loads((out / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("refusal") == REFUSAL
