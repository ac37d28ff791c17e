"""Candidate scoring job: bypass, induce and KL for a slice of candidate directions (DESIGN §4).

    receipt = run_score(lm, store, job, candidates, baseline)

For each candidate r at (position, layer), on the (filtered) validation prompts:
- bypass = mean refusal score on harmful val with r̂ ablated everywhere (lower is better);
- induce = mean refusal score on harmless val with raw r added at the input of its layer;
- kl     = mean KL(baseline || ablated) of the last-position distribution on harmless val.
Baseline harmless logits are computed once per model (`Baseline`) and reused by every job on that actor.
Scores are written as one shard per job, then its marker; a marked job is skipped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from refdir.schemas import layout
from refdir.schemas.jobs import Receipt, ScoreJob
from refdir.schemas.tables import scores_schema
from refdir.workers.directions import kl_div_last, refusal_scores
from refdir.workers.hooks import ablate, actadd
from refdir.workers.model import LoadedModel, last_position_logits
from refdir.workers.store import Store

logger = logging.getLogger(__name__)


def last_logits(lm: LoadedModel, instructions: list[str], batch_size: int) -> torch.Tensor:
    """Last-position logits (n, vocab) in float32 on the model's device, batched, sorted by length to cut padding."""
    order = sorted(range(len(instructions)), key=lambda i: len(instructions[i]))
    out: list[torch.Tensor] = []
    for start in range(0, len(order), batch_size):
        batch = [instructions[i] for i in order[start : start + batch_size]]
        with torch.inference_mode():
            out.append(last_position_logits(lm, lm.encode(batch)).float())
    logits = torch.cat(out)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return logits[inverse.to(logits.device)]


@dataclass
class Baseline:
    """What every scoring job on a model shares: baseline logits on harmless val."""

    harmless_logits: torch.Tensor   # (n_harmless, vocab) float32

    @classmethod
    def compute(cls, lm: LoadedModel, job: ScoreJob) -> "Baseline":
        return cls(last_logits(lm, [p.instruction for p in job.harmless_val], job.batch_size))


def score_candidate(lm: LoadedModel, r: torch.Tensor, layer: int, job: ScoreJob, base: Baseline) -> dict:
    harmful = [p.instruction for p in job.harmful_val]
    harmless = [p.instruction for p in job.harmless_val]
    with ablate(lm, r):
        bypass = refusal_scores(last_logits(lm, harmful, job.batch_size), lm.refusal_token_ids).mean().item()
        ablated = last_logits(lm, harmless, job.batch_size)
    kl = kl_div_last(base.harmless_logits, ablated).mean().item()
    with actadd(lm, r, layer, coeff=1.0):
        induce = refusal_scores(last_logits(lm, harmless, job.batch_size), lm.refusal_token_ids).mean().item()
    return {"bypass_score": bypass, "induce_score": induce, "kl_score": kl}


def run_score(lm: LoadedModel, store: Store, job: ScoreJob, vectors: dict[tuple[int, int], np.ndarray],
              base: Baseline) -> Receipt:
    """Score job.candidates ((position, layer) keys into `vectors`) unless the job's marker exists."""
    run, key = job.run_id, job.model.key
    marker_rel = layout.score_marker(run, key, job.index)
    if (done := store.receipt_if_done(marker_rel, job.job_id, job.input_digest)) is not None:
        return done
    t0 = time.perf_counter()
    rows = []
    for pos, layer in job.candidates:
        r = torch.as_tensor(vectors[(pos, layer)], dtype=torch.float32, device=lm.device)
        rows.append({"position": pos, "layer": layer, **score_candidate(lm, r, layer, job, base)})
    n = len(rows)
    table = pa.Table.from_pydict({
        "run_id": [run] * n, "model": [key] * n,
        "position": [r["position"] for r in rows], "layer": [r["layer"] for r in rows],
        "bypass_score": [r["bypass_score"] for r in rows], "induce_score": [r["induce_score"] for r in rows],
        "kl_score": [r["kl_score"] for r in rows], "drop_reason": [None] * n,
    }, schema=scores_schema())
    data_rel = layout.score_shard(run, key, job.index)
    receipt = store.commit(data_rel, table, marker_rel, table_name="scores", run_id=run, job_id=job.job_id,
                           input_digest=job.input_digest,
                           seconds=time.perf_counter() - t0)
    logger.info("%s %s: %d candidates in %.2fs", key, job.job_id, n, receipt.seconds)
    return receipt
