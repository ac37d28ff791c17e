"""Evaluate stage (driver side): the select stage is done and its direction verifies; generate and judge
completions on the model's actors (jobs keyed by the direction's sha256, baseline jobs by none), then
summarise them into evals files (rates with Wilson intervals, the paper's damage metrics), recorded in the
stage manifest.

    run(mr)                            # mr: flows/stages.ModelRun of one model
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from refdir.flows import plan
from refdir.flows.stages import ModelRun
from refdir.schemas import layout
from refdir.schemas.tables import evals_schema


def run(mr: ModelRun) -> None:
    if mr.stage_done("evaluate"):
        return
    sel = mr.require("select")
    jobs = plan.eval_jobs(mr.spec, mr.model, mr.draw, sel["files"][layout.direction_json(mr.run_id, mr.key)])
    planned, done = mr.run_jobs("evaluate", "evaluate", jobs, plan.eval_marker)
    with mr.store.recording() as files:
        if done == planned:
            _summarise(mr, jobs)
    mr.mark("evaluate", planned, done, files)


def _summarise(mr, jobs: list) -> None:
    """Completions -> evals rows (rates per judge, Wilson 95 % interval) + damage metrics, one file per
    (dataset, intervention)."""
    from refdir.workers.judges import judge_metric, wilson_interval

    groups: dict[tuple[str, str], list] = {}
    for j in jobs:
        groups.setdefault((j.dataset, j.intervention), []).append(
            mr.store.read_table(layout.completion_shard(mr.run_id, mr.key, j.dataset, j.intervention, j.index)))
    damage = _damage(mr, groups)
    for (dataset, intervention), tables in groups.items():
        t = pa.concat_tables(tables)
        rows = []
        for judge in sorted(set(t["judge"].to_pylist())):
            metric, column = judge_metric(judge)
            flags = [f for f in t.filter(pc.equal(t["judge"], judge))[column].to_pylist() if f is not None]
            if not flags:
                continue
            lo, hi = wilson_interval(sum(flags), len(flags))
            rows.append((dataset, intervention, judge, metric, float(np.mean(flags)), len(flags), lo, hi))
        first = t.filter(pc.equal(t["judge"], t["judge"][0]))
        rows.append((dataset, intervention, "", "mean_refusal_score", float(pc.mean(first["refusal_score"]).as_py()),
                     first.num_rows, None, None))
        _write_evals(mr, dataset, intervention, rows)
    for intervention, metrics in damage.items():
        _write_evals(mr, "damage", intervention,
                          [("damage", intervention, "", m, v, n, None, None) for m, v, n in metrics])


def _write_evals(mr, name: str, intervention: str, rows: list[tuple]) -> None:
    """rows: (dataset, intervention, judge, metric, value, n, ci_low, ci_high); ci_* None for non-rates."""
    cols = list(zip(*rows))
    table = pa.Table.from_pydict({"run_id": [mr.run_id] * len(rows), "model": [mr.key] * len(rows),
                                  "dataset": list(cols[0]), "intervention": list(cols[1]), "judge": list(cols[2]),
                                  "metric": list(cols[3]), "value": list(cols[4]), "n": list(cols[5]),
                                  "ci_low": list(cols[6]), "ci_high": list(cols[7])},
                                 schema=evals_schema())
    mr.store.write_table(layout.evals_table(mr.run_id, mr.key, name, intervention), table,
                           table_name="evals", run_id=mr.run_id)


def _damage(mr, groups: dict) -> dict[str, list[tuple[str, float, int]]]:
    """The paper's damage metrics for baseline / ablation / actadd(-r), plus random_ablation (the same-norm random
    direction: the ablation's control), one actor call each: CE on the
    Pile-like set, on Alpaca-like pairs and on the model's own baseline harmless completions (n = tokens),
    and the first-token KL (n = prompts)."""
    import ray

    from refdir.workers.damage import load_damage_sets

    base = pa.concat_tables(groups[("harmless_test", "baseline")])
    base = base.filter(pc.equal(base["judge"], base["judge"][0]))
    own = list(zip(base["prompt"].to_pylist(), base["response"].to_pylist()))
    sets = load_damage_sets(mr.spec.evaluation)
    actor = mr.actors()[0]
    out = {}
    for name in plan.DAMAGE_INTERVENTIONS:
        m = ray.get(actor.damage.remote(mr.run_id, mr.key, name, sets, own, mr.spec.generation.batch_size))
        out[name] = [(k, float(v), int(n)) for k, (v, n) in m.items()]
    return out
