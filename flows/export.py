"""Exports from a finished run: the orthogonalised model and official-format files.

    export_model(store_uri, run_id, "organism", "out/")      # save_pretrained folder + model card
    export_official(store_uri, run_id, "organism", "out/")   # the paper's run layout (flows/official.py)

The official refusal_direction code keeps `mean_diffs` as a float64 tensor (n_pos, n_layer, d) and
`direction_metadata.json` = {"pos": p, "layer": l}; export_official writes those and the rest of its run
folder (direction evaluations, completions and their evaluations, loss evals) so its scripts read a refdir run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

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


def export_model(store_uri: str, run_id: str, key: str, out_dir: str | Path, trial: int | None = None) -> Path:
    from refdir.workers.export import export_orthogonalized

    spec = stored_spec(store_uri, run_id)
    model = spec.model(key)   # a wrong --model names the run's models, before anything else
    store = Store.open(spec.store, create=False)
    d = _direction(store, run_id, key)
    if trial is not None:
        return _export_trial(store, model, run_id, key, d, trial, out_dir)
    card = {"run_id": run_id, "model": key, "versions": versions(),
            "direction": {k: d[k] for k in ("position", "layer", "bypass_score", "induce_score", "kl_score", "fallback")}}
    return export_orthogonalized(model, np.asarray(d["vector"]), out_dir, card)


def _export_trial(store: Store, model, run_id: str, key: str, selected: dict, trial: int, out_dir) -> Path:
    """An optimize trial's edited model (flows/optimize.py): its direction and per-layer weights."""
    from refdir.workers.export import export_orthogonalized
    from refdir.workers.optimize import TrialParams, load_vectors, trial_direction

    m = store.marker(layout.trial_marker(run_id, key, trial))
    if m is None:
        raise StageError(f"run {run_id} has no finished optimize trial {trial} for model {key!r}; list them with "
                         f"`refdir sql \"select trial, refusals, kl, pareto, chosen from trials\"`")
    row = store.read_table(m["data"], sha256=m["sha256"]).to_pylist()[0]
    n_layers = int(selected.get("n_layers") or len(row["attn_weights"]))
    params = TrialParams.from_flat(m["params"])
    vec = load_vectors(store, run_id, key)
    r = trial_direction(vec.candidates, vec.harmless_means, row["position"], params.direction_layer,
                        params.direction_kind)
    weights = params.layer_weights(n_layers)
    card = {"run_id": run_id, "model": key, "versions": versions(),
            "trial": {"trial": trial, "params": m["params"], "refusals": row["refusals"], "n": row["n"],
                      "kl": row["kl"], "position": row["position"],
                      "weights": {"embed": weights.embed, "attn": weights.attn, "mlp": weights.mlp}}}
    return export_orthogonalized(model, r, out_dir, card, weights=weights)


def export_official(store_uri: str, run_id: str, key: str, out_dir: str | Path) -> Path:
    """The paper's run layout for one model (flows/official.py); datasets named as the paper's code names them
    when the run's test sources are JailbreakBench and the paper's harmless test split."""
    from refdir.flows.official import dataset_names, write_official

    spec = stored_spec(store_uri, run_id)
    spec.model(key)   # a wrong --model names the run's models
    store = Store.open(spec.store, create=False)
    return write_official(store, run_id, key, out_dir, _direction(store, run_id, key), dataset_names(spec.prompts))
