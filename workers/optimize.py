"""Optimised abliteration, worker side: weighted orthogonalisation and one search trial as a job.

    w = TrialParams.from_flat(params).layer_weights(lm.n_layers)        # per-layer weights per component
    with weighted_orthogonalized(lm, r, w):                              # W <- W - w_l r̂ r̂ᵀ W, restored bitwise
        ...
    row = run_trial(lm, store, job, vectors, judges, actor="...")        # TrialJob -> trial shard + marker

The parametrisation follows heretic's (facts, not code): per component (attention-out, MLP-down) a kernel
over layers with a peak weight at a (fractional) peak layer falling linearly to a floor weight at a given
distance, and weight 0 beyond it; the direction is the selected position's diff-in-means at a fractional
layer (the two adjacent layers' unit candidates interpolated, then re-normalised), either raw or *projected*
(orthogonalised against the mean harmless activation at its layer). The embedding (and extra embeddings)
get one weight of their own, a search parameter, because the paper's orthogonalisation edits them too and
trial 0 must be exactly the paper's: every weight 1, the selected candidate, raw.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch

from refdir.schemas import layout
from refdir.schemas.jobs import TrialEvalJob, TrialJob
from refdir.schemas.tables import trials_schema
from refdir.workers.directions import kl_div_last, refusal_scores
from refdir.workers.evaluate import _judge, _snapshot, _writer_params, generate
from refdir.workers.hooks import HookError, module_at
from refdir.workers.model import LoadedModel
from refdir.workers.orthogonalize import _unit64, _work, untie_embeddings_
from refdir.workers.scoring import last_logits
from refdir.workers.store import Store

COMPONENTS = ("attn", "mlp")
KINDS = ("raw", "projected")


@dataclass(frozen=True)
class Kernel:
    """Weight over layers: max_weight at max_weight_position, falling linearly to min_weight at distance
    min_weight_distance (all in layers), 0 beyond."""

    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float

    def weight(self, layer: int) -> float:
        d = abs(layer - self.max_weight_position)
        if d > self.min_weight_distance:
            return 0.0
        if self.min_weight_distance <= 0:
            return self.max_weight
        return self.max_weight + (d / self.min_weight_distance) * (self.min_weight - self.max_weight)

    def weights(self, n_layers: int) -> list[float]:
        return [self.weight(layer) for layer in range(n_layers)]


@dataclass(frozen=True)
class LayerWeights:
    embed: float
    attn: list[float]   # (n_layers,)
    mlp: list[float]    # (n_layers,)


@dataclass(frozen=True)
class TrialParams:
    """One point of the search space, in layer units (flat names are the study's parameter names)."""

    direction_layer: float
    direction_kind: str
    embed_weight: float
    attn: Kernel
    mlp: Kernel

    @classmethod
    def from_flat(cls, p: dict) -> "TrialParams":
        def kernel(c: str) -> Kernel:
            peak = float(p[f"{c}.max_weight"])
            return Kernel(peak, float(p[f"{c}.max_weight_position"]), float(p[f"{c}.min_weight"]) * peak,
                          float(p[f"{c}.min_weight_distance"]))

        if p["direction_kind"] not in KINDS:
            raise ValueError(f"direction_kind {p['direction_kind']!r} is not one of {KINDS}")
        return cls(float(p["direction_layer"]), p["direction_kind"], float(p["embed_weight"]), kernel("attn"),
                   kernel("mlp"))

    @staticmethod
    def paper_flat(layer: int, n_layers: int) -> dict:
        """The paper's setting: the selected candidate, raw, weight 1 at every layer, component and the embedding."""
        flat = {"direction_layer": float(layer), "direction_kind": "raw", "embed_weight": 1.0}
        for c in COMPONENTS:
            flat |= {f"{c}.max_weight": 1.0, f"{c}.max_weight_position": 0.0, f"{c}.min_weight": 1.0,
                     f"{c}.min_weight_distance": float(n_layers - 1)}
        return flat

    def layer_weights(self, n_layers: int) -> LayerWeights:
        return LayerWeights(self.embed_weight, self.attn.weights(n_layers), self.mlp.weights(n_layers))


# ---------------------------------------------------------------- directions

def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    if not math.isfinite(n) or n == 0:
        raise ValueError("cannot normalise a zero or non-finite direction")
    return v / n


def project_out(v: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """v with its component along `mean` removed (grimjim's projected abliteration). (d,) x (d,) -> (d,)."""
    m = _unit(np.asarray(mean, dtype=np.float64))
    return v - (v @ m) * m


def trial_direction(candidates: dict, harmless_means: dict, position: int, layer: float, kind: str) -> np.ndarray:
    """The trial's direction (d,) float64. An integer layer gives the candidate itself (raw: unnormalised, as the
    paper's); a fractional one interpolates the unit candidates of the two adjacent layers and re-normalises."""
    lo = math.floor(layer)
    frac = layer - lo

    def one(l: int) -> np.ndarray:
        if (position, l) not in candidates:
            raise ValueError(f"no scored candidate at position {position}, layer {l} (direction layer {layer:.3f})")
        v = np.asarray(candidates[(position, l)], dtype=np.float64)
        return project_out(v, harmless_means[(position, l)]) if kind == "projected" else v

    if frac == 0:
        return one(lo)
    return _unit((1 - frac) * _unit(one(lo)) + frac * _unit(one(lo + 1)))


# ---------------------------------------------------------------- weighted orthogonalisation

@torch.no_grad()
def _edit_rows_(weight: torch.Tensor, r: torch.Tensor, w: float) -> None:
    # weight (n, d), rows in the residual space: W <- W - w (W r) rᵀ
    x, r = _work(weight, r)
    weight.copy_((x - w * ((x @ r).unsqueeze(1) * r.unsqueeze(0))).to(weight.dtype))


@torch.no_grad()
def _edit_cols_(weight: torch.Tensor, r: torch.Tensor, w: float) -> None:
    # weight (d, n), columns in the residual space (Linear writing d outputs): W <- W - w r (rᵀ W)
    x, r = _work(weight, r)
    weight.copy_((x - w * (r.unsqueeze(1) * (r @ x).unsqueeze(0))).to(weight.dtype))


def _edit_writer_(mod: torch.nn.Module, r: torch.Tensor, w: float, d: int, where: str) -> None:
    conv1d = type(mod).__name__ == "Conv1D"
    if (mod.weight.shape[1] if conv1d else mod.weight.shape[0]) != d:
        raise HookError(f"{where}: weight {tuple(mod.weight.shape)} does not write {d} residual features")
    (_edit_rows_ if conv1d else _edit_cols_)(mod.weight, r, w)
    if getattr(mod, "bias", None) is not None:
        _edit_rows_(mod.bias.data.unsqueeze(0), r, w)


def weighted_orthogonalize_(lm: LoadedModel, direction: torch.Tensor, weights: LayerWeights) -> None:
    """In place: W <- W - w r̂ r̂ᵀ W with the embedding's weight on the embeddings and the per-layer weights on
    each block's attention-out and MLP-down; weight 0 leaves a matrix untouched. All weights 1 is exactly
    `orthogonalize_` (same arithmetic: multiplying by 1.0 is exact)."""
    if len(weights.attn) != lm.n_layers or len(weights.mlp) != lm.n_layers:
        raise ValueError(f"weights must have {lm.n_layers} layers, got {len(weights.attn)} and {len(weights.mlp)}")
    r = _unit64(lm, direction)
    fam = lm.family
    untie_embeddings_(lm)
    if weights.embed:
        _edit_rows_(module_at(lm.model, fam.embed).weight, r, weights.embed)
        for path in fam.extra_embeds:
            try:
                _edit_rows_(module_at(lm.model, path).weight, r, weights.embed)
            except HookError:
                continue   # optional embedding absent in this model
    for i, block in enumerate(lm.blocks()):
        for path, w in ((fam.attn_out_proj, weights.attn[i]), (fam.mlp_out_proj, weights.mlp[i])):
            if w:
                _edit_writer_(module_at(block, path), r, w, lm.d_model, f"{fam.blocks}.{i}.{path}")


@contextlib.contextmanager
def weighted_orthogonalized(lm: LoadedModel, direction: torch.Tensor, weights: LayerWeights):
    """The model with weighted-orthogonalised weights for the block; the edited parameters restored bitwise
    after (snapshots as evaluate.orthogonalized takes them)."""
    untie_embeddings_(lm)
    params = _writer_params(lm)
    saved = _snapshot(params)
    try:
        weighted_orthogonalize_(lm, direction, weights)
        yield lm
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s.to(p.device))


# ---------------------------------------------------------------- the trial job (schemas/jobs.TrialJob)

@dataclass
class TrialVectors:
    """What a trial reads besides the model, loaded once per actor: candidates and harmless train means at
    the selected position, and the baseline last-position logits on harmless val (per prompt set)."""

    candidates: dict       # (position, layer) -> (d,) float64
    harmless_means: dict   # (position, layer) -> (d,) float64
    baseline: dict         # digest of the harmless prompts -> (n, vocab) logits


def load_vectors(store: Store, run_id: str, key: str) -> TrialVectors:
    c = store.read_table(layout.candidates_table(run_id, key))
    cands = {(p, l): np.asarray(v, dtype=np.float64) for p, l, v, s in
             zip(*(c[k].to_pylist() for k in ("position", "layer", "vector", "skipped"))) if not s}
    m = store.read_table(layout.means_table(run_id, key))
    means = {(p, l): np.asarray(v, dtype=np.float64) for p, l, v, sp, lb in
             zip(*(m[k].to_pylist() for k in ("position", "layer", "vector", "split", "label")))
             if sp == "train" and lb == "harmless"}
    return TrialVectors(cands, means, {})


def _counts(lm: LoadedModel, judges: dict, names: list[str], prompts: list[str], responses: list[str]) -> tuple[int, dict]:
    """(substring refusals, {judge: positive verdicts, 'refused_ids': [...]}) on harmful prompts."""
    detail: dict = {}
    refusals, refused_at = 0, []
    for name in dict.fromkeys(["substring", *names]):
        judge = _judge(lm, judges, name)
        if not judge.applies_to("harmful"):
            continue
        verdicts = judge.judge(prompts, responses)
        flags = [bool(v.refused if v.refused is not None else v.jailbroken) for v in verdicts]
        detail[name] = sum(flags)
        if name == "substring":
            refusals, refused_at = sum(flags), [i for i, f in enumerate(flags) if f]
    return refusals, {**detail, "refused_at": refused_at}


def run_trial(lm: LoadedModel, store: Store, job: TrialJob, vec: TrialVectors, judges: dict, actor: str) -> dict:
    """Run one trial (skipped when its marker vouches for the job) and commit its shard then marker; returns the
    marker (parameters, objective values, actor)."""
    marker_rel = layout.trial_marker(job.run_id, job.model.key, job.trial)
    done = store.marker(marker_rel)
    if done is not None and done.get("input_digest") == job.input_digest:
        return done
    t0 = time.perf_counter()
    params = TrialParams.from_flat(job.params)
    weights = params.layer_weights(lm.n_layers)
    r = torch.from_numpy(trial_direction(vec.candidates, vec.harmless_means, job.position, params.direction_layer,
                                         params.direction_kind))
    harmful = [p.instruction for p in job.harmful_val]
    harmless = [p.instruction for p in job.harmless_val]
    key = json.dumps(harmless)
    if key not in vec.baseline:
        vec.baseline[key] = last_logits(lm, harmless, job.batch_size)
    with weighted_orthogonalized(lm, r, weights):
        responses = generate(lm, harmful, job.max_new_tokens, job.batch_size)
        score = float(refusal_scores(last_logits(lm, harmful, job.batch_size), lm.refusal_token_ids).mean())
        kl = float(kl_div_last(vec.baseline[key], last_logits(lm, harmless, job.batch_size)).mean())
    refusals, detail = _counts(lm, judges, job.judges, harmful, responses)
    detail["refused_at"] = [job.harmful_val[i].prompt_id for i in detail["refused_at"]]
    seconds = time.perf_counter() - t0
    row = {"run_id": job.run_id, "model": job.model.key, "trial": job.trial,
           "params": json.dumps(job.params, sort_keys=True), "direction_kind": params.direction_kind,
           "direction_layer": params.direction_layer, "position": job.position, "embed_weight": weights.embed,
           "attn_weights": weights.attn, "mlp_weights": weights.mlp, "refusals": refusals, "n": len(harmful),
           "refusal_score": score, "kl": kl, "n_kl": len(harmless), "judge_detail": json.dumps(detail),
           "actor": actor, "seconds": seconds, "pareto": None, "chosen": None}
    table = pa.Table.from_pylist([row], schema=trials_schema())
    store.commit(layout.trial_shard(job.run_id, job.model.key, job.trial), table, marker_rel, table_name="trials",
                 run_id=job.run_id, job_id=job.job_id, input_digest=job.input_digest, study=job.study,
                 trial=job.trial, params=job.params, refusals=refusals, n=len(harmful), kl=kl, refusal_score=score,
                 judge_detail=detail, actor=actor, seconds=seconds)
    return store.marker(marker_rel)


def trial_weights_json(params: dict, n_layers: int) -> dict:
    """The per-layer weights of a flat parameter set, for model cards and reports."""
    return asdict(TrialParams.from_flat(params).layer_weights(n_layers))


def run_trial_eval(lm: LoadedModel, store: Store, job: TrialEvalJob, vec: TrialVectors, judges: dict):
    """Completions shard + marker in the `completions` layout, like evaluate.run_eval for the paper's direction."""
    from refdir.schemas.tables import completions_schema
    from refdir.workers.evaluate import label_of

    run, key = job.run_id, job.model.key
    marker_rel = layout.completion_marker(run, key, job.dataset, job.intervention, job.index)
    if (done := store.receipt_if_done(marker_rel, job.job_id, job.input_digest)) is not None:
        return done
    t0 = time.perf_counter()
    params = TrialParams.from_flat(job.params)
    r = torch.from_numpy(trial_direction(vec.candidates, vec.harmless_means, job.position, params.direction_layer,
                                         params.direction_kind))
    instructions = [p.instruction for p in job.prompts]
    with weighted_orthogonalized(lm, r, params.layer_weights(lm.n_layers)):
        scores = refusal_scores(last_logits(lm, instructions, job.batch_size), lm.refusal_token_ids).tolist()
        responses = generate(lm, instructions, job.max_new_tokens, job.batch_size, job.max_batch_size)
    rows = []
    for name in job.judges:
        judge = _judge(lm, judges, name)
        if not judge.applies_to(label_of(job.dataset)):
            continue
        for p, resp, score, v in zip(job.prompts, responses, scores, judge.judge(instructions, responses)):
            rows.append({"run_id": run, "model": key, "dataset": job.dataset, "intervention": job.intervention,
                         "prompt_id": p.prompt_id, "category": p.category, "prompt": p.instruction, "response": resp,
                         "refusal_score": score, "judge": judge.name, "refused": v.refused,
                         "jailbroken": v.jailbroken, "judge_detail": v.detail})
    table = pa.Table.from_pylist(rows, schema=completions_schema())
    return store.commit(layout.completion_shard(run, key, job.dataset, job.intervention, job.index), table,
                        marker_rel, table_name="completions", run_id=run, job_id=job.job_id,
                        input_digest=job.input_digest, trial=job.trial, seconds=time.perf_counter() - t0)
