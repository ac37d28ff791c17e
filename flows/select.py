"""Select stage (driver side): the aggregate stage is done and its candidates verify; score the live
candidates on the model's actors (jobs keyed by the candidates' sha256), then choose the direction with the
paper's filters and write scores.parquet, direction.safetensors/.json and directions.parquet, recorded in the
stage manifest.

    run(mr)                            # mr: flows/stages.ModelRun of one model
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from refdir.flows import plan
from refdir.flows.extract import check_kept
from refdir.flows.stages import ModelRun
from refdir.schemas import layout
from refdir.schemas.tables import directions_schema, scores_schema
from refdir.workers.selection import select_direction


def run(mr: ModelRun) -> None:
    if mr.stage_done("select"):
        return
    agg = mr.require("aggregate")
    kept = check_kept(mr, "val")
    rel = layout.candidates_table(mr.run_id, mr.key)
    cands = mr.store.read_table(rel, sha256=agg["files"][rel])
    live = cands.filter(pc.invert(pc.field("skipped")))
    pairs = list(zip(live["position"].to_pylist(), live["layer"].to_pylist()))
    jobs = plan.score_jobs(mr.spec, mr.model, pairs, kept["harmful"], kept["harmless"], agg["files"][rel])
    planned, done = mr.run_jobs("select", "score", jobs, plan.score_marker)
    if done < planned:
        mr.mark("select", planned, done)
        return
    with mr.store.recording() as files:
        _choose(mr, cands, jobs)
    mr.mark("select", planned, done, files)


def _choose(mr, cands: pa.Table, jobs: list) -> None:
    tables = [mr.store.read_table(m["data"], sha256=m["sha256"])
              for m in (mr.store.marker(plan.score_marker(j)) for j in jobs)]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    n_layers = int(pc.max(cands["layer"]).as_py()) + 1
    choice, annotated = select_direction(rows, n_layers, mr.spec.selection)
    mr.store.write_table(layout.scores_table(mr.run_id, mr.key),
                           pa.Table.from_pylist(annotated, schema=scores_schema()), table_name="scores",
                           run_id=mr.run_id)
    hit = cands.filter(pc.and_(pc.equal(cands["position"], choice.position), pc.equal(cands["layer"], choice.layer)))
    vector = np.asarray(hit["vector"][0].as_py(), dtype=np.float64)
    _write_direction(mr, choice, vector, annotated, n_layers)


def _write_direction(mr, choice, vector: np.ndarray, annotated: list[dict], n_layers: int) -> None:
    from safetensors.numpy import save

    norm = float(np.linalg.norm(vector))
    blob = save({"direction": vector.astype(np.float32), "direction_unit": (vector / norm).astype(np.float32)},
                metadata={"position": str(choice.position), "layer": str(choice.layer), "run_id": mr.run_id})
    mr.store.write_bytes(layout.direction_tensors(mr.run_id, mr.key), blob)
    row = {"run_id": mr.run_id, "model": mr.key, "position": choice.position, "layer": choice.layer,
           "bypass_score": choice.bypass_score, "induce_score": choice.induce_score, "kl_score": choice.kl_score,
           "norm": norm, "fallback": choice.fallback, "vector": vector.tolist()}
    mr.store.write_table(layout.directions_table(mr.run_id, mr.key),
                           pa.Table.from_pylist([row], schema=directions_schema()), table_name="directions",
                           run_id=mr.run_id)
    meta = {**row, "n_layers": n_layers, "thresholds": choice.thresholds,
            "candidates": [{k: r[k] for k in ("position", "layer", "bypass_score", "induce_score", "kl_score",
                                              "drop_reason")} for r in annotated]}
    mr.store.write_json(layout.direction_json(mr.run_id, mr.key), meta)
