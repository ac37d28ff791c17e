"""Exports from a finished run: the orthogonalised model and official-format files.

    export_model(store_uri, run_id, "organism", "out/")      # save_pretrained folder + model card
    export_official(store_uri, run_id, "organism", "out/")   # mean_diffs.pt, direction.pt, direction_metadata.json, completions

The official refusal_direction code keeps `mean_diffs` as a float64 tensor (n_pos, n_layer, d) and
`direction_metadata.json` = {"pos": p, "layer": l}; these files let its users pick up a refdir run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from refdir.flows.runner import stored_spec
from refdir.flows.summary import versions
from refdir.flows.stages import StageError
from refdir.schemas import layout
from refdir.workers.store import Store

logger = logging.getLogger(__name__)


def _direction(store: Store, run_id: str, key: str) -> dict:
    rel = layout.direction_json(run_id, key)
    if not store.exists(rel):
        raise StageError(f"run {run_id} has no selected direction for model {key!r} yet; "
                         f"finish it with `refdir resume {run_id}` first")
    return store.read_json(rel)


def export_model(store_uri: str, run_id: str, key: str, out_dir: str | Path) -> Path:
    from refdir.workers.export import export_orthogonalized

    spec = stored_spec(store_uri, run_id)
    store = Store.open(spec.store, create=False)
    d = _direction(store, run_id, key)
    card = {"run_id": run_id, "model": key, "versions": versions(),
            "direction": {k: d[k] for k in ("position", "layer", "bypass_score", "induce_score", "kl_score", "fallback")}}
    return export_orthogonalized(spec.model(key), np.asarray(d["vector"]), out_dir, card)


def mean_diffs(store: Store, run_id: str, key: str) -> np.ndarray:
    """candidates.parquet -> float64 (n_pos, n_layer, d), positions ordered -n_pos .. -1."""
    t = store.read_table(layout.candidates_table(run_id, key))
    pos, layer = t["position"].to_numpy(), t["layer"].to_numpy()
    n_pos, n_layer = int(-pos.min()), int(layer.max()) + 1
    vec = np.stack(t["vector"].to_numpy(zero_copy_only=False)).astype(np.float64)
    out = np.zeros((n_pos, n_layer, vec.shape[1]), dtype=np.float64)
    out[pos + n_pos, layer] = vec
    return out


def export_official(store_uri: str, run_id: str, key: str, out_dir: str | Path) -> Path:
    import torch

    spec = stored_spec(store_uri, run_id)
    store = Store.open(spec.store, create=False)
    d = _direction(store, run_id, key)
    out = Path(out_dir)
    (out / "completions").mkdir(parents=True, exist_ok=True)
    torch.save(torch.from_numpy(mean_diffs(store, run_id, key)), out / "mean_diffs.pt")
    torch.save(torch.tensor(d["vector"], dtype=torch.float64), out / "direction.pt")
    (out / "direction_metadata.json").write_text(json.dumps({"pos": d["position"], "layer": d["layer"]}))
    lists: dict[str, list[dict]] = {}
    for rel in sorted(store.glob(f"{layout.model_dir(run_id, key)}/completions/*/*/part-*.parquet")):
        t = store.read_table(rel)
        for r in t.filter(pc.equal(t["judge"], "substring")).to_pylist():
            lists.setdefault(f"{r['dataset']}_{r['intervention']}", []).append(
                {"category": r["category"], "prompt": r["prompt"], "response": r["response"],
                 "is_jailbreak_substring_matching": not r["refused"]})
    for name, rows in lists.items():
        (out / "completions" / f"{name}_completions.json").write_text(json.dumps(rows, indent=2))
    evals = [r for rel in store.glob(f"{layout.model_dir(run_id, key)}/evals/*.parquet") for r in store.read_table(rel).to_pylist()]
    (out / "completions" / "evaluations.json").write_text(json.dumps(evals, indent=2))
    logger.info("official-format files for %s written to %s", key, out)
    return out
