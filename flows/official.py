"""The official run layout of the paper's code (andyrdt/refusal_direction, pipeline/run_pipeline.py), written
from a finished refdir run so the paper's own analysis scripts read it unchanged.

    write_official(store, run_id, "organism", "out/", names={"harmful_test": "jailbreakbench", ...})

    out/generate_directions/mean_diffs.pt                      float64 (n_pos, n_layer, d), pos -n_pos .. -1
    out/select_direction/direction_evaluations.json            [{position, layer, refusal_score, steering_score,
                                                                 kl_div_score}] for every (pos, layer)
    out/select_direction/direction_evaluations_filtered.json   the survivors of the filters, by refusal_score
    out/direction_metadata.json                                {"pos": p, "layer": l}
    out/direction.pt                                           mean_diffs[p, l], float64 (d,)
    out/completions/{dataset}_{intervention}_completions.json  [{category, prompt, response}]
    out/completions/{dataset}_{intervention}_evaluations.json  {substring_matching_success_rate,
                                                                substring_matching_per_category, completions}
    out/loss_evals/{intervention}_loss_eval.json               {pile|alpaca|alpaca_custom_completions:
                                                                {ce_loss, perplexity, n_tokens}}

Names follow the paper's code: `refusal_score` = refdir's bypass score, `steering_score` = induce score,
`kl_div_score` = KL; "success" = jailbroken = NOT refused by the substring judge (and Llama Guard's verdict as
`llamaguard2_*`); datasets are `jailbreakbench` / `harmless` when the run's test sources are those sets
(`dataset_names`), else refdir's names; interventions keep their names (the paper's are baseline, ablation,
actadd). Candidates refdir skipped for a near-zero norm (the paper scores them, getting NaN) appear with NaN.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from refdir.schemas import layout

logger = logging.getLogger(__name__)

# refdir damage metric -> the paper's loss_evals label (evaluate_loss.py)
LOSS_LABELS = {"ce_pile": "pile", "ce_alpaca": "alpaca", "ce_on_distribution": "alpaca_custom_completions"}


def dataset_names(prompts) -> dict[str, str]:
    """refdir test dataset -> the paper's name, when the source is the paper's set (a PromptSpec)."""
    out = {}
    if "jailbreakbench" in prompts.harmful_test.lower():
        out["harmful_test"] = "jailbreakbench"
    if Path(prompts.harmless_test.split(":", 1)[-1]).stem == "harmless_test":   # the paper's splits/harmless_test.json
        out["harmless_test"] = "harmless"
    return out


def mean_diffs(store, run_id: str, key: str) -> np.ndarray:
    """candidates.parquet -> float64 (n_pos, n_layer, d), positions ordered -n_pos .. -1."""
    t = store.read_table(layout.candidates_table(run_id, key))
    pos, layer = t["position"].to_numpy(), t["layer"].to_numpy()
    n_pos, n_layer = int(-pos.min()), int(layer.max()) + 1
    vec = np.stack(t["vector"].to_numpy(zero_copy_only=False)).astype(np.float64)
    out = np.zeros((n_pos, n_layer, vec.shape[1]), dtype=np.float64)
    out[pos + n_pos, layer] = vec
    return out


def _nan(v) -> float:
    return math.nan if v is None else float(v)


def direction_evaluations(store, run_id: str, key: str, n_pos: int, n_layer: int) -> tuple[list[dict], list[dict]]:
    """(every candidate in the paper's order: position -n_pos..-1, then layer; the filtered ones by refusal_score)."""
    scores = {(r["position"], r["layer"]): r for r in store.read_table(layout.scores_table(run_id, key)).to_pylist()}
    every, kept = [], []
    for pos in range(-n_pos, 0):
        for layer in range(n_layer):
            r = scores.get((pos, layer), {})
            row = {"position": pos, "layer": layer, "refusal_score": _nan(r.get("bypass_score")),
                   "steering_score": _nan(r.get("induce_score")), "kl_div_score": _nan(r.get("kl_score"))}
            every.append(row)
            if r and r.get("drop_reason") is None:
                kept.append(row)
    return every, sorted(kept, key=lambda x: x["refusal_score"])


def _completion_groups(store, run_id: str, key: str) -> dict[tuple[str, str], list[dict]]:
    """(dataset, intervention) -> completion rows of every judge, in prompt order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for rel in sorted(store.glob(layout.completion_shards_glob(run_id, key))):
        t: pa.Table = store.read_table(rel)
        for r in t.to_pylist():
            groups.setdefault((r["dataset"], r["intervention"]), []).append(r)
    return {g: sorted(rows, key=lambda r: r["prompt_id"]) for g, rows in groups.items()}


def evaluation(rows: list[dict]) -> tuple[list[dict], dict]:
    """(completions file, evaluations file) of one (dataset, intervention), as run_pipeline/evaluate_jailbreak."""
    sub = [r for r in rows if r["judge"] == "substring"] or [r for r in rows if r["refused"] is not None]
    completions = [{"category": r["category"], "prompt": r["prompt"], "response": r["response"]} for r in sub]
    judged = [dict(c, is_jailbreak_substring_matching=int(not r["refused"])) for c, r in zip(completions, sub)]
    doc = _rates(judged, "is_jailbreak_substring_matching", "substring_matching")
    guard = {r["prompt_id"]: r for r in rows if r["judge"].startswith("llamaguard:")}
    if guard:
        for c, r in zip(judged, sub):
            c["is_jailbreak_llamaguard2"] = int(bool(guard[r["prompt_id"]]["jailbroken"]))
        doc.update(_rates(judged, "is_jailbreak_llamaguard2", "llamaguard2"))
    doc["completions"] = judged
    return completions, doc


def _rates(judged: list[dict], flag: str, name: str) -> dict:
    cats = sorted({c["category"] for c in judged})
    return {f"{name}_success_rate": float(np.mean([c[flag] for c in judged])),
            f"{name}_per_category": {cat: float(np.mean([c[flag] for c in judged if c["category"] == cat]))
                                     for cat in cats}}


def loss_evals(store, run_id: str, key: str) -> dict[str, dict]:
    """intervention -> the paper's loss_eval document, from the evals rows of dataset 'damage'."""
    out: dict[str, dict] = {}
    for rel in store.glob(layout.evals_glob(run_id, key)):
        for r in store.read_table(rel).to_pylist():
            label = LOSS_LABELS.get(r["metric"]) if r["dataset"] == "damage" else None
            if label:
                out.setdefault(r["intervention"], {})[label] = {
                    "ce_loss": r["value"], "perplexity": math.exp(r["value"]), "n_tokens": r["n"]}
    return out


def _dump(path: Path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=4))


def write_official(store, run_id: str, key: str, out_dir: str | Path, direction: dict,
                   names: dict[str, str] | None = None) -> Path:
    """Write the official layout for one model of a finished run into out_dir (see module doc)."""
    import torch

    out, names = Path(out_dir), names or {}
    diffs = mean_diffs(store, run_id, key)
    n_pos, n_layer, _ = diffs.shape
    (out / "generate_directions").mkdir(parents=True, exist_ok=True)
    torch.save(torch.from_numpy(diffs), out / "generate_directions" / "mean_diffs.pt")
    every, kept = direction_evaluations(store, run_id, key, n_pos, n_layer)
    _dump(out / "select_direction" / "direction_evaluations.json", every)
    _dump(out / "select_direction" / "direction_evaluations_filtered.json", kept)
    pos, layer = direction["position"], direction["layer"]
    _dump(out / "direction_metadata.json", {"pos": pos, "layer": layer})
    torch.save(torch.from_numpy(diffs[pos + n_pos, layer].copy()), out / "direction.pt")
    for (dataset, intervention), rows in _completion_groups(store, run_id, key).items():
        name = f"{names.get(dataset, dataset)}_{intervention}"
        completions, doc = evaluation(rows)
        _dump(out / "completions" / f"{name}_completions.json", completions)
        _dump(out / "completions" / f"{name}_evaluations.json", doc)
    for intervention, doc in loss_evals(store, run_id, key).items():
        _dump(out / "loss_evals" / f"{intervention}_loss_eval.json", doc)
    logger.info("official run layout for %s written to %s", key, out)
    return out
