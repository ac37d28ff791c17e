"""Evaluation jobs: greedy completions under an intervention, judged, plus damage metrics.

    receipt = run_eval(lm, store, job, direction, judges)   # EvalJob -> completions shard + marker
    metrics = damage_metrics(lm, direction, intervention, sets, own_completions, batch_size)

Interventions (DESIGN §4): baseline; ablation (r̂ projected out of every block input and attention/MLP
output, generated tokens included); actadd (coeff * r at the input of layer l*: -1 on harmful prompts to
bypass, +1 on harmless to induce); orthogonalized (weights edited in place for the job, restored after);
random_ablation / random_actadd (a random direction of the same norm, the control).

Every intervention runs as plain generation where that is exact (no hooks: HF's decode step pays one
launch per hook per layer): ablation through the orthogonalised weights (`orthogonalized`, exact for every
family whose attention/MLP outputs reach the residual un-normed), activation addition as a bias on the
last module writing the residual before layer l (`hooks.actadd_bias`: block l-1's MLP output projection).
The hooks (`hooks.ablate`, `hooks.actadd`: the paper's definition) run only where the edit is not exact:
post-norm families (Gemma-2/3, OLMo-2) and activation addition at layer 0; one log line per model says so.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, replace

import pyarrow as pa
import torch

from refdir.schemas import layout
from refdir.schemas.jobs import EvalJob, Receipt
from refdir.schemas.tables import completions_schema
from refdir.workers import batching
from refdir.workers.damage import DamageSets, pile_ce, response_ce
from refdir.workers.directions import kl_div_last, refusal_scores
from refdir.workers.hooks import ablate, actadd, actadd_bias, actadd_bias_point, module_at
from refdir.workers.judges import Judge, get_judge
from refdir.workers.model import LoadedModel, _takes_logits_to_keep
from refdir.workers.orthogonalize import orthogonalize_, untie_embeddings_
from refdir.workers.scoring import last_logits
from refdir.workers.store import Store

logger = logging.getLogger(__name__)


def _writer_params(lm: LoadedModel) -> list[torch.nn.Parameter]:
    """Every parameter orthogonalize_ edits: embeddings, attention-out and MLP-down weights and biases."""
    fam, mods = lm.family, [module_at(lm.model, lm.family.embed)]
    for path in fam.extra_embeds:
        try:
            mods.append(module_at(lm.model, path))
        except Exception:  # noqa: BLE001 - optional embeddings absent in this model (orthogonalize_ skips them too)
            continue
    for block in lm.blocks():
        mods += [module_at(block, fam.attn_out_proj), module_at(block, fam.mlp_out_proj)]
    return [p for m in mods for p in (m.weight, getattr(m, "bias", None)) if p is not None]


def _snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Copies of `params`: on their own GPU when it has room (a device-to-device copy takes milliseconds),
    else in host memory."""
    need: dict[torch.device, int] = {}
    for p in params:
        need[p.device] = need.get(p.device, 0) + p.numel() * p.element_size()
    room = {d: d.type == "cuda" and torch.cuda.mem_get_info(d)[0] > 1.25 * n + 2**30 for d, n in need.items()}
    return [p.detach().clone() if room[p.device] else p.detach().to("cpu", copy=True) for p in params]


@contextlib.contextmanager
def orthogonalized(lm: LoadedModel, direction: torch.Tensor):
    """The model with its weights orthogonalised for the block; original weights restored bitwise after.

    Snapshots only the edited parameters (embeddings, attention-out, MLP-down), so an actor serves every
    intervention with one copy of the model. Tied embeddings stay untied afterwards (same values).
    """
    untie_embeddings_(lm)
    params = _writer_params(lm)
    saved = _snapshot(params)
    try:
        orthogonalize_(lm, direction)
        yield lm
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s.to(p.device))


@dataclass(frozen=True)
class Direction:
    vector: torch.Tensor   # (d,) raw r = mean harmful - mean harmless at (position, layer)
    layer: int
    position: int

    def random_like(self, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(self.vector.shape, generator=g, dtype=torch.float64)
        return (v / v.norm() * self.vector.double().norm()).to(self.vector.dtype)


_FELL_BACK: set[tuple[str, str, str]] = set()


def _hooks_because(lm: LoadedModel, what: str, why: str) -> None:
    """One log line per (model, intervention, reason) per process: this one runs under hooks."""
    key = (lm.spec.key, what, why)
    if key not in _FELL_BACK:
        _FELL_BACK.add(key)
        logger.info("%s: %s runs under hooks, not as plain generation: %s", lm.spec.key, what, why)


def ablation(lm: LoadedModel, direction: torch.Tensor):
    """Directional ablation: the orthogonalised weights where the family makes them exact, else hooks.ablate."""
    if lm.family.exact_orthogonalization:
        return orthogonalized(lm, direction)
    _hooks_because(lm, "ablation", f"family {lm.family.name} norms attention/MLP outputs before the residual "
                                   "add, so orthogonalised weights only approximate it")
    return ablate(lm, direction)


def activation_addition(lm: LoadedModel, vector: torch.Tensor, layer: int, coeff: float):
    """coeff * vector at the input of block `layer`: a bias (hooks.actadd_bias) where exact, else hooks.actadd."""
    mod, _, why = actadd_bias_point(lm, layer)
    if mod is not None:
        return actadd_bias(lm, vector, layer, coeff)
    _hooks_because(lm, f"actadd at layer {layer}", why)
    return actadd(lm, vector, layer, coeff=coeff)


def intervention(lm: LoadedModel, name: str, d: Direction, dataset_label: str):
    """The context manager that applies one intervention to `lm` (nullcontext for baseline)."""
    r = d.vector.to(lm.device)
    sign = -1.0 if dataset_label == "harmful" else 1.0
    if name == "baseline":
        return contextlib.nullcontext()
    if name == "ablation":
        return ablation(lm, r)
    if name == "actadd":
        return activation_addition(lm, r, d.layer, sign)
    if name == "orthogonalized":
        return orthogonalized(lm, r)
    rnd = d.random_like().to(lm.device)
    if name == "random_ablation":
        return ablation(lm, rnd)
    if name == "random_actadd":
        return activation_addition(lm, rnd, d.layer, sign)
    if name == "optimized":
        raise ValueError("intervention 'optimized' is a trial's weighted orthogonalisation: the optimize stage "
                         "runs it (workers/optimize.run_trial_eval), not an EvalJob")
    raise ValueError(f"unknown intervention {name!r}")


def generate(lm: LoadedModel, instructions: list[str], max_new_tokens: int, batch_size: int,
             max_batch_size: int | None = None) -> list[str]:
    """Greedy completions (whitespace-stripped) in the order given, batched with left padding.

    Prompts are sorted by token length (stable) before batching, so a batch pads to its own longest
    prompt; the completions are put back in the caller's order. Batches hold `batch_size` prompts, or, with
    `max_batch_size` on a CUDA device, as many as its free memory holds (workers/batching.py) up to it."""
    lengths = lm.encode(instructions)["attention_mask"].sum(dim=1).tolist() if instructions else []
    order = sorted(range(len(instructions)), key=lambda i: lengths[i])
    sizes = _batch_sizes(lm, sorted(lengths), max_new_tokens, batch_size, max_batch_size)
    out: dict[int, str] = {}
    for start, size in zip(itertools.accumulate(sizes, initial=0), sizes):
        idx = order[start : start + size]
        enc = lm.encode([instructions[i] for i in idx])
        with torch.inference_mode():
            gen = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                    pad_token_id=lm.tokenizer.pad_token_id)
        texts = lm.tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out.update(zip(idx, (t.strip() for t in texts)))   # stripped, as the paper stores and judges them
    return [out[i] for i in range(len(instructions))]


def _batch_sizes(lm: LoadedModel, lengths: list[int], max_new_tokens: int, batch_size: int,
                 max_batch_size: int | None) -> list[int]:
    """Fixed `batch_size` batches, or on CUDA with `max_batch_size` batches sized from free memory: the least
    free memory of the GPUs holding decoder blocks, each counted as if it held the most blocks any one holds."""
    free = batching.cuda_free_for(lm.blocks()) if max_batch_size else None
    if free is None:
        return batching.fixed_batches(len(lengths), batch_size)
    free_bytes, layers = free
    shape = replace(batching.GenShape.of(lm.model.config, lm.dtype, _takes_logits_to_keep(type(lm.model))),
                    layers=layers)
    sizes = batching.plan_batches(lengths, free_bytes, shape, max_new_tokens, max_batch_size)
    logger.info("%s: generation batches %s from %.1f GB free", lm.spec.key, sizes, free_bytes / 1e9)
    return sizes


def label_of(dataset: str) -> str:
    return "harmful" if dataset.startswith("harmful") else "harmless"


def _judge(lm: LoadedModel, cache: dict[str, Judge] | None, name: str) -> Judge:
    """A judge from the actor's cache, loaded on first use (model judges in lm's dtype on lm's device)."""
    cache = {} if cache is None else cache
    if name not in cache:
        cache[name] = get_judge(name, device=str(lm.device), dtype=lm.dtype)
    return cache[name]


def run_eval(lm: LoadedModel, store: Store, job: EvalJob, d: Direction, judges: dict[str, Judge] | None = None) -> Receipt:
    """Generate, judge with every judge that applies to the dataset, write a completions shard and its marker.

    `judges` is the actor's judge cache (name -> loaded judge), so a judge model loads once per actor."""
    run, key = job.run_id, job.model.key
    marker_rel = layout.completion_marker(run, key, job.dataset, job.intervention, job.index)
    if (done := store.receipt_if_done(marker_rel, job.job_id, job.input_digest)) is not None:
        return done
    t0 = time.perf_counter()
    instructions = [p.instruction for p in job.prompts]
    with intervention(lm, job.intervention, d, label_of(job.dataset)):
        scores = refusal_scores(last_logits(lm, instructions, job.batch_size), lm.refusal_token_ids).tolist()
        responses = generate(lm, instructions, job.max_new_tokens, job.batch_size, job.max_batch_size)
    cols: dict[str, list] = {k: [] for k in completions_schema().names}
    for judge in (_judge(lm, judges, name) for name in job.judges):
        if not judge.applies_to(label_of(job.dataset)):
            continue
        for p, resp, score, v in zip(job.prompts, responses, scores, judge.judge(instructions, responses)):
            for k, val in (("run_id", run), ("model", key), ("dataset", job.dataset), ("intervention", job.intervention),
                           ("prompt_id", p.prompt_id), ("category", p.category), ("prompt", p.instruction),
                           ("response", resp), ("refusal_score", score), ("judge", judge.name),
                           ("refused", v.refused), ("jailbroken", v.jailbroken), ("judge_detail", v.detail)):
                cols[k].append(val)
    table = pa.Table.from_pydict(cols, schema=completions_schema())
    data_rel = layout.completion_shard(run, key, job.dataset, job.intervention, job.index)
    receipt = store.commit(data_rel, table, marker_rel, table_name="completions", run_id=run, job_id=job.job_id,
                           input_digest=job.input_digest,
                           seconds=time.perf_counter() - t0)
    logger.info("%s %s: %d completions in %.2fs", key, job.job_id, len(responses), time.perf_counter() - t0)
    return receipt


def damage_metrics(lm: LoadedModel, d: Direction, name: str, sets: DamageSets, own: list[tuple[str, str]],
                   batch_size: int) -> dict[str, tuple[float, int]]:
    """metric -> (value, n) under intervention `name` (actadd is the bypass, -r, as in the paper's loss evals):
    ce_pile, ce_alpaca, ce_on_distribution (n = tokens scored) and kl_first_token (n = prompts). The
    intervention is applied as `intervention` applies it: plain forwards (edited weights / a bias) where exact."""
    prompts = [p for p, _ in own]
    base = last_logits(lm, prompts, batch_size)
    with intervention(lm, name, d, "harmful"):
        return {
            "ce_pile": pile_ce(lm, sets.pile, sets.max_tokens, batch_size),
            "ce_alpaca": response_ce(lm, sets.alpaca, batch_size),
            "ce_on_distribution": response_ce(lm, own, batch_size),
            "kl_first_token": (kl_div_last(base, last_logits(lm, prompts, batch_size)).mean().item(), len(prompts)),
        }
