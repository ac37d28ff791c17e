"""Direction selection: the paper's filters and ranking over candidate scores (pure, no model).

    chosen, table = select_direction(rows, n_layers, spec.selection)

Each row is one scored candidate {position, layer, bypass_score, induce_score, kl_score}. A candidate
is dropped, first reason wins, when a score is NaN, its layer >= int(max_layer_fraction * n_layers),
its KL exceeds kl_threshold, or its induce score is below induce_threshold. The lowest bypass score
wins; ties go to the lower layer, then the position further from the end (deterministic). When every
candidate is dropped, SelectionError shows the five best by bypass with their reasons, unless
allow_fallback is set: then the best bypass among non-NaN rows wins and the choice is marked fallback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from refdir.schemas.spec import SelectionSpec


class SelectionError(RuntimeError):
    """Every candidate was filtered out."""


@dataclass(frozen=True)
class Choice:
    position: int
    layer: int
    bypass_score: float
    induce_score: float
    kl_score: float
    fallback: bool = False
    thresholds: dict = field(default_factory=dict)


def drop_reason(row: dict, n_layers: int, spec: SelectionSpec) -> str | None:
    """Why a candidate is discarded, or None when it passes every filter."""
    scores = (row["bypass_score"], row["induce_score"], row["kl_score"])
    if any(s is None or math.isnan(s) for s in scores):
        return "nan score"
    if row["layer"] >= int(spec.max_layer_fraction * n_layers):
        return f"layer {row['layer']} >= {int(spec.max_layer_fraction * n_layers)} (max_layer_fraction {spec.max_layer_fraction})"
    if row["kl_score"] > spec.kl_threshold:
        return f"kl {row['kl_score']:.4g} > {spec.kl_threshold}"
    if row["induce_score"] < spec.induce_threshold:
        return f"induce {row['induce_score']:.4g} < {spec.induce_threshold}"
    return None


def _rank_key(row: dict) -> tuple:
    bypass = row["bypass_score"]
    return (math.inf if bypass is None or math.isnan(bypass) else bypass, row["layer"], row["position"])


def select_direction(rows: list[dict], n_layers: int, spec: SelectionSpec) -> tuple[Choice, list[dict]]:
    """Return the chosen candidate and every row annotated with `drop_reason` (None for survivors)."""
    if not rows:
        raise SelectionError("no scored candidates: every candidate was near zero or scoring wrote nothing")
    annotated = sorted(({**r, "drop_reason": drop_reason(r, n_layers, spec)} for r in rows), key=_rank_key)
    thresholds = spec.model_dump(exclude={"allow_fallback"})
    survivors = [r for r in annotated if r["drop_reason"] is None]
    if survivors:
        best, fallback = survivors[0], False
    else:
        finite = [r for r in annotated if r["drop_reason"] != "nan score"]
        if not (spec.allow_fallback and finite):
            raise SelectionError(_all_filtered_message(annotated, spec))
        best, fallback = finite[0], True
    choice = Choice(best["position"], best["layer"], best["bypass_score"], best["induce_score"], best["kl_score"],
                    fallback, thresholds)
    return choice, annotated


def _all_filtered_message(annotated: list[dict], spec: SelectionSpec) -> str:
    lines = [f"all {len(annotated)} candidates were filtered out; the five best by bypass score:"]
    for r in annotated[:5]:
        lines.append(f"  pos {r['position']:>3} layer {r['layer']:>3}: bypass {r['bypass_score']:.4g} "
                     f"induce {r['induce_score']:.4g} kl {r['kl_score']:.4g} -> {r['drop_reason']}")
    lines.append("loosen [selection] thresholds (kl_threshold, induce_threshold, max_layer_fraction) in the spec, "
                 "or set selection.allow_fallback = true / pass --allow-fallback to take the best bypass anyway")
    return "\n".join(lines)
