"""Evaluation jobs: greedy completions under an intervention, judged, plus damage metrics.

    receipt = run_eval(lm, store, job, direction)     # EvalJob -> completions shard + marker
    metrics = damage_metrics(lm, direction, intervention, texts, completions)

Interventions (DESIGN §4): baseline; ablation (r̂ projected out of every block input and attention/MLP
output, generated tokens included); actadd (coeff * r at the input of layer l*: -1 on harmful prompts to
bypass, +1 on harmless to induce); orthogonalized (weights edited in place for the job, restored after);
random_ablation / random_actadd (a random direction of the same norm, the control).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import pyarrow as pa
import torch

from refdir.schemas import layout
from refdir.schemas.jobs import EvalJob, Receipt
from refdir.schemas.tables import completions_schema
from refdir.workers.directions import kl_div_last, refusal_scores
from refdir.workers.hooks import ablate, actadd
from refdir.workers.judges import get_judge
from refdir.workers.model import LoadedModel
from refdir.workers.hooks import module_at
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


def intervention(lm: LoadedModel, name: str, d: Direction, dataset_label: str):
    """The context manager that applies one intervention to `lm` (nullcontext for baseline)."""
    r = d.vector.to(lm.device)
    sign = -1.0 if dataset_label == "harmful" else 1.0
    if name == "baseline":
        return contextlib.nullcontext()
    if name == "ablation":
        return ablate(lm, r)
    if name == "actadd":
        return actadd(lm, r, d.layer, coeff=sign)
    if name == "orthogonalized":
        return orthogonalized(lm, r)
    rnd = d.random_like().to(lm.device)
    if name == "random_ablation":
        return ablate(lm, rnd)
    if name == "random_actadd":
        return actadd(lm, rnd, d.layer, coeff=sign)
    raise ValueError(f"unknown intervention {name!r}")


def generate(lm: LoadedModel, instructions: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions, batched with left padding, sorted by length to cut padding."""
    order = sorted(range(len(instructions)), key=lambda i: len(instructions[i]))
    out: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = lm.encode([instructions[i] for i in idx])
        with torch.inference_mode():
            gen = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                    pad_token_id=lm.tokenizer.pad_token_id)
        texts = lm.tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out.update(zip(idx, texts))
    return [out[i] for i in range(len(instructions))]


def label_of(dataset: str) -> str:
    return "harmful" if dataset.startswith("harmful") else "harmless"


def run_eval(lm: LoadedModel, store: Store, job: EvalJob, d: Direction) -> Receipt:
    """Generate, judge with every judge, write a completions shard and its marker."""
    run, key = job.run_id, job.model.key
    marker_rel = layout.completion_marker(run, key, job.dataset, job.intervention, job.index)
    if (done := store.receipt_if_done(marker_rel, job.job_id)) is not None:
        return done
    t0 = time.perf_counter()
    instructions = [p.instruction for p in job.prompts]
    with intervention(lm, job.intervention, d, label_of(job.dataset)):
        scores = refusal_scores(last_logits(lm, instructions, job.batch_size), lm.refusal_token_ids).tolist()
        responses = generate(lm, instructions, job.max_new_tokens, job.batch_size)
    cols: dict[str, list] = {k: [] for k in completions_schema().names}
    for judge in (get_judge(name) for name in job.judges):
        for p, resp, score, v in zip(job.prompts, responses, scores, judge.judge(instructions, responses)):
            for k, val in (("run_id", run), ("model", key), ("dataset", job.dataset), ("intervention", job.intervention),
                           ("prompt_id", p.prompt_id), ("category", p.category), ("prompt", p.instruction),
                           ("response", resp), ("refusal_score", score), ("judge", judge.name),
                           ("refused", v.refused), ("judge_detail", v.detail)):
                cols[k].append(val)
    table = pa.Table.from_pydict(cols, schema=completions_schema())
    data_rel = layout.completion_shard(run, key, job.dataset, job.intervention, job.index)
    receipt = store.commit(data_rel, table, marker_rel, table_name="completions", run_id=run, job_id=job.job_id,
                           seconds=time.perf_counter() - t0)
    logger.info("%s %s: %d completions in %.2fs", key, job.job_id, len(responses), time.perf_counter() - t0)
    return receipt


def _response_ce(lm: LoadedModel, prompts: list[str], responses: list[str], batch_size: int) -> float:
    """Mean CE (nats/token) of `responses` given chat-formatted `prompts`, response tokens only."""
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        enc = lm.encode(prompts[start : start + batch_size])
        resp = lm.tokenizer(responses[start : start + batch_size], add_special_tokens=False, padding=True,
                            padding_side="right", return_tensors="pt").to(lm.device)
        ids = torch.cat([enc["input_ids"], resp["input_ids"]], dim=1)
        mask = torch.cat([enc["attention_mask"], resp["attention_mask"]], dim=1)
        with torch.inference_mode():
            logits = lm.model(input_ids=ids, attention_mask=mask).logits.float()
        n_prompt = enc["input_ids"].shape[1]
        pred = logits[:, n_prompt - 1 : -1]                         # (batch, n_resp, vocab)
        nll = torch.nn.functional.cross_entropy(pred.transpose(1, 2), resp["input_ids"], reduction="none")
        total += (nll * resp["attention_mask"]).sum().item()
        count += int(resp["attention_mask"].sum().item())
    return total / max(count, 1)


def _text_ce(lm: LoadedModel, texts: list[str], batch_size: int) -> float:
    """Mean CE (nats/token) of plain text (no chat template), every token after the first."""
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        enc = lm.tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                           padding_side="right").to(lm.device)
        with torch.inference_mode():
            logits = lm.model(**enc).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), enc["input_ids"][:, 1:], reduction="none")
        m = enc["attention_mask"][:, 1:]
        total += (nll * m).sum().item()
        count += int(m.sum().item())
    return total / max(count, 1)


def damage_metrics(lm: LoadedModel, d: Direction, name: str, texts: list[str], prompts: list[str],
                   baseline_responses: list[str], batch_size: int) -> dict[str, float]:
    """CE on harmless text, CE on the model's own baseline harmless completions, first-token KL vs baseline."""
    base = last_logits(lm, prompts, batch_size)
    with intervention(lm, name, d, "harmful"):   # actadd damage is that of the bypass, -r
        out = {
            "ce_harmless_text": _text_ce(lm, texts, batch_size),
            "ce_own_completions": _response_ce(lm, prompts, baseline_responses, batch_size),
            "kl_first_token": kl_div_last(base, last_logits(lm, prompts, batch_size)).mean().item(),
        }
    return out
