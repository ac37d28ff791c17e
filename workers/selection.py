"""Direction selection: the paper's filters and ranking over candidate scores (pure, no model).

    chosen, table = select_direction(rows, n_layers, spec.selection)

Each row is one scored candidate {position, layer, bypass_score, induce_score, kl_score}. A candidate
is dropped when a score is NaN, its layer >= int(max_layer_fraction * n_layers), its KL exceeds
kl_threshold, or its induce score is below induce_threshold; `drop_reason` lists every filter it fails,
in that order, joined by "; ". The lowest bypass score wins; ties go as in the paper's code (it sorts
(-bypass, position, layer) tuples in descending order): the position nearer the end (-1 before -2), then
the higher layer. When every candidate is dropped, SelectionError counts how many candidates each filter
drops and shows the five best by bypass with all their reasons, unless allow_fallback is set: then the
best bypass among non-NaN rows wins and the choice is marked fallback.
"""

from __future__ import annotations

import math
from collections import Counter
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


def _nan(x) -> bool:
    return x is None or math.isnan(x)


def drop_reasons(row: dict, n_layers: int, spec: SelectionSpec) -> list[str]:
    """Every filter a candidate fails, in the paper's order (NaN, layer, KL, induce); [] when it passes."""
    out = []
    nan = [name for name in ("bypass", "induce", "kl") if _nan(row[f"{name}_score"])]
    if nan:
        out.append(f"nan score ({', '.join(nan)})")
    max_layer = int(spec.max_layer_fraction * n_layers)
    if row["layer"] >= max_layer:
        out.append(f"layer {row['layer']} >= {max_layer} (max_layer_fraction {spec.max_layer_fraction})")
    if not _nan(row["kl_score"]) and row["kl_score"] > spec.kl_threshold:
        out.append(f"kl {row['kl_score']:.4g} > {spec.kl_threshold}")
    if not _nan(row["induce_score"]) and row["induce_score"] < spec.induce_threshold:
        out.append(f"induce {row['induce_score']:.4g} < {spec.induce_threshold}")
    return out


def drop_reason(row: dict, n_layers: int, spec: SelectionSpec) -> str | None:
    """Every reason a candidate is discarded, joined by "; ", or None when it passes every filter."""
    return "; ".join(drop_reasons(row, n_layers, spec)) or None


def _rank_key(row: dict) -> tuple:
    """Ascending sort key: lowest bypass first; ties as the paper's code (descending sort of (-bypass, pos,
    layer) tuples): the higher position (nearer the end), then the higher layer."""
    bypass = row["bypass_score"]
    return (math.inf if _nan(bypass) else bypass, -row["position"], -row["layer"])


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
        finite = [r for r in annotated if not str(r["drop_reason"]).startswith("nan score")]
        if not (spec.allow_fallback and finite):
            raise SelectionError(_all_filtered_message(annotated, spec))
        best, fallback = finite[0], True
    choice = Choice(best["position"], best["layer"], best["bypass_score"], best["induce_score"], best["kl_score"],
                    fallback, thresholds)
    return choice, annotated


def _candidate_line(r: dict) -> str:
    return (f"  pos {r['position']:>3} layer {r['layer']:>3}: bypass {r['bypass_score']:.4g} "
            f"induce {r['induce_score']:.4g} kl {r['kl_score']:.4g} -> {r['drop_reason']}")


def _all_filtered_message(annotated: list[dict], spec: SelectionSpec) -> str:
    bites = Counter(reason.split(" ", 1)[0] for r in annotated for reason in r["drop_reason"].split("; "))
    names = {"nan": "NaN score", "layer": f"layer >= max_layer_fraction x n_layers ({spec.max_layer_fraction})",
             "kl": f"kl > kl_threshold ({spec.kl_threshold})", "induce": f"induce < induce_threshold ({spec.induce_threshold})"}
    lines = [f"all {len(annotated)} candidates were filtered out; candidates each filter drops: "
             + ", ".join(f"{names.get(k, k)}: {n}" for k, n in bites.most_common())]
    lines.append("the five best by bypass score, with every reason each was dropped:")
    lines += [_candidate_line(r) for r in annotated[:5]]
    kl_only = [r for r in annotated if r["drop_reason"].startswith("kl ") and "; " not in r["drop_reason"]]
    if kl_only and kl_only[0] not in annotated[:5]:   # the best by bypass broke the model; these only cost KL
        lines.append(f"the best of the {len(kl_only)} dropped by the KL filter alone:")
        lines += [_candidate_line(r) for r in kl_only[:5]]
    lines.append("loosen [selection] thresholds (kl_threshold, induce_threshold, max_layer_fraction) in the spec, "
                 "or set selection.allow_fallback = true / pass --allow-fallback to take the best bypass anyway")
    return "\n".join(lines)
