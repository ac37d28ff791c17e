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


def export_model(store_uri: str, run_id: str, key: str, out_dir: str | Path) -> Path:
    from refdir.workers.export import export_orthogonalized

    spec = stored_spec(store_uri, run_id)
    model = spec.model(key)   # a wrong --model names the run's models, before anything else
    store = Store.open(spec.store, create=False)
    d = _direction(store, run_id, key)
    card = {"run_id": run_id, "model": key, "versions": versions(),
            "direction": {k: d[k] for k in ("position", "layer", "bypass_score", "induce_score", "kl_score", "fallback")}}
    return export_orthogonalized(spec.model(key), np.asarray(d["vector"]), out_dir, card)


def export_official(store_uri: str, run_id: str, key: str, out_dir: str | Path) -> Path:
    """The paper's run layout for one model (flows/official.py); datasets named as the paper's code names them
    when the run's test sources are JailbreakBench and the paper's harmless test split."""
    from refdir.flows.official import dataset_names, write_official

    spec = stored_spec(store_uri, run_id)
    spec.model(key)   # a wrong --model names the run's models
    store = Store.open(spec.store, create=False)
    return write_official(store, run_id, key, out_dir, _direction(store, run_id, key), dataset_names(spec.prompts))
