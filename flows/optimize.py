"""The optimize stage, driver side: a seeded multi-objective TPE study (Optuna, ask/tell) whose trials are
jobs on the model's Ray actors, then the chosen trial evaluated on the test set as intervention 'optimized'.

    out = optimize_model(spec, "organism", store, pool=lambda: pool, draw=draw)    # after select

1. Check: the model's selection is done (direction.json) and its candidates and means are stored.
2. The search space from `[optimize]` and the model's depth (workers/optimize.py has the parametrisation);
   a study digest of everything a trial's values depend on (settings, val prompts, candidates, judges).
3. The study: TPESampler(seed), one minimised direction per objective. Finished trials are shards with
   markers; those whose marker carries this study digest are re-told to the rebuilt study in trial-id order
   (add_trial), trial 0 (the paper's setting) is enqueued first when it is not finished, and the missing
   trial ids are asked for `parallel` at a time (one per actor by default), run on the model's WorkerPool
   and told together (Optuna's batch ask/tell). A killed driver loses at most the trials in flight; an id is
   a file name, so no id appears twice. A resumed study sees its trials told in id order, so it is seeded
   but not bit-for-bit the study an uninterrupted run would have been.
4. trials.parquet (every trial, its Pareto flag over the objectives, the chosen one); the chosen trial's
   completions on harmful test and its `evals` rows; the stage manifest last.

Chosen trial: the lowest KL among trials whose harmful-val refusal rate is <= max_refusal_rate, else the knee
of the Pareto front (refusals x KL, each scaled to [0, 1] over the front: the point nearest the origin).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from refdir.flows import plan
from refdir.schemas import layout
from refdir.schemas.jobs import Prompt, TrialEvalJob, TrialJob
from refdir.schemas.spec import RunSpec
from refdir.schemas.tables import evals_schema, trials_schema
from refdir.workers.identity import digest_json
from refdir.workers.optimize import COMPONENTS, TrialParams
from refdir.workers.store import Store

logger = logging.getLogger(__name__)

OBJECTIVE_COLUMNS = {"refusals": "refusals", "kl": "kl", "refusal_score": "refusal_score"}
INTERVENTION = "optimized"
EVAL_DATASET = "harmful_test"


class OptimizeError(RuntimeError):
    """The optimize stage cannot start or finish; the message names the model and what to do."""


# ---------------------------------------------------------------- inputs

def kept_val(store: Store, spec: RunSpec, key: str, draw) -> dict[str, list[Prompt]]:
    """label -> val prompts the extraction marked kept (the paper's filter), as selection uses them."""
    out: dict[str, list[Prompt]] = {"harmful": [], "harmless": []}
    for job in plan.extract_jobs(spec, spec.model(key), draw):
        if job.split != "val":
            continue
        m = store.marker(plan.extract_marker(job))
        if not plan.is_done(m, job):
            raise OptimizeError(f"model {key!r}: extraction job {job.job_id} is not done; the optimize stage needs "
                                "the val prompts (rerun the run)")
        t = store.read_table(m["prompts"], sha256=m["prompts_sha256"]).filter(pc.field("kept"))
        out[job.label] += [Prompt(prompt_id=p, instruction=i, category=c) for p, i, c in
                           zip(t["prompt_id"].to_pylist(), t["instruction"].to_pylist(), t["category"].to_pylist())]
    for label, prompts in out.items():
        if not prompts:
            raise OptimizeError(f"model {key!r}: no {label} val prompt survived the filter; nothing to optimise on")
    return out


def _selected(store: Store, run_id: str, key: str) -> dict:
    rel = layout.direction_json(run_id, key)
    if not store.exists(rel):
        raise OptimizeError(f"model {key!r}: no selected direction ({store.url(rel)}); the optimize stage runs after "
                            "select")
    return store.read_json(rel)


def _live_layers(store: Store, run_id: str, key: str, position: int) -> list[int]:
    c = store.read_table(layout.candidates_table(run_id, key))
    return sorted(l for p, l, s in zip(c["position"].to_pylist(), c["layer"].to_pylist(), c["skipped"].to_pylist())
                  if p == position and not s)


# ---------------------------------------------------------------- the search space

def search_space(spec: RunSpec, n_layers: int, live: list[int], selected_layer: int) -> dict:
    """Optuna distributions of the flat parameters (layer units; min_weight as a fraction of max_weight)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    o, last = spec.optimize, max(n_layers - 1, 1)
    lo = max(o.direction_layers[0] * last, live[0])
    hi = min(o.direction_layers[1] * last, live[-1])
    lo, hi = min(lo, selected_layer), max(hi, selected_layer)
    space = {"direction_layer": FloatDistribution(float(lo), float(hi)),
             "direction_kind": CategoricalDistribution(list(o.direction_kinds)),
             "embed_weight": FloatDistribution(*o.embed_weight)}
    for c in COMPONENTS:
        space |= {f"{c}.max_weight": FloatDistribution(*o.max_weight),
                  f"{c}.max_weight_position": FloatDistribution(o.max_weight_position[0] * last,
                                                                o.max_weight_position[1] * last),
                  f"{c}.min_weight": FloatDistribution(*o.min_weight),
                  f"{c}.min_weight_distance": FloatDistribution(o.min_weight_distance[0] * last,
                                                                o.min_weight_distance[1] * last)}
    return space


def paper_params(space: dict, selected_layer: int, n_layers: int) -> dict:
    """Trial 0: the selected candidate, raw, weight 1 everywhere (any peak position reaches every layer when the
    floor equals the peak and the width is the last layer index)."""
    flat = TrialParams.paper_flat(selected_layer, n_layers)
    for c in COMPONENTS:
        flat[f"{c}.max_weight_position"] = float(space[f"{c}.max_weight_position"].low)
    return flat


def _study_digest(spec: RunSpec, key: str, val: dict, select_commit, space: dict, position: int) -> str:
    o = spec.optimize.model_dump(exclude={"enabled", "trials", "parallel", "max_refusal_rate"})
    texts = {k: [(p.prompt_id, p.instruction) for p in v] for k, v in val.items()}
    return digest_json({"kind": "optimize", "model": spec.inputs["models"][key], "optimize": o, "val": texts,
                        "selected": select_commit, "space": {k: repr(v) for k, v in space.items()},
                        "position": position, "judges": spec.evaluation.judges,
                        "batch_size": spec.generation.batch_size})


# ---------------------------------------------------------------- the study

class Study:
    """The driver's study for one model: finished trials re-told, the rest asked and run on actors."""

    def __init__(self, spec: RunSpec, key: str, store: Store, val: dict, selected: dict, n_layers: int):
        self.spec, self.key, self.store, self.val, self.n_layers = spec, key, store, val, n_layers
        self.run_id, self.position, self.layer = spec.run_id, int(selected["position"]), int(selected["layer"])
        live = _live_layers(store, spec.run_id, key, self.position)
        self.space = search_space(spec, n_layers, live, self.layer)
        m = store.marker(layout.stage_manifest(spec.run_id, key, "select")) or {}
        self.select_commit = m.get("commit") or m.get("outputs")
        self.digest = _study_digest(spec, key, val, self.select_commit, self.space, self.position)

    def finished(self) -> dict[int, dict]:
        """trial id -> marker of the planned trials finished for this study digest."""
        out = {}
        for i in range(self.spec.optimize.trials):
            m = self.store.marker(layout.trial_marker(self.run_id, self.key, i))
            if m is not None and m.get("study") == self.digest:
                out[i] = m
        return out

    def values(self, m: dict) -> list[float]:
        return [float(m[OBJECTIVE_COLUMNS[o]]) for o in self.spec.optimize.objectives]

    def build(self, finished: dict[int, dict]):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        o = self.spec.optimize
        study = optuna.create_study(directions=["minimize"] * len(o.objectives),
                                    sampler=optuna.samplers.TPESampler(seed=o.seed))
        for i in sorted(finished):
            study.add_trial(optuna.trial.create_trial(params=finished[i]["params"], distributions=self.space,
                                                      values=self.values(finished[i]), user_attrs={"trial": i}))
        if 0 not in finished:
            study.enqueue_trial(paper_params(self.space, self.layer, self.n_layers), user_attrs={"trial": 0})
        return study

    def job(self, trial: int, params: dict) -> TrialJob:
        s = self.spec
        body = dict(run_id=self.run_id, model=s.model(self.key), store=s.store, trial=trial, params=params,
                    position=self.position, harmful_val=self.val["harmful"], harmless_val=self.val["harmless"],
                    max_new_tokens=s.optimize.max_new_tokens, batch_size=s.generation.batch_size,
                    judges=s.evaluation.judges, study=self.digest)
        return TrialJob(**body, input_digest=digest_json({"study": self.digest, "trial": trial, "params": params}))

    def run(self, get_pool: Callable[[], object], progress=None) -> dict[int, dict]:
        """Run every missing trial in rounds of `parallel` (asked together, run on the pool's actors, told
        together: Optuna's batch ask/tell); returns trial id -> marker for all planned trials."""
        finished = self.finished()
        study = self.build(finished)
        todo = [i for i in range(self.spec.optimize.trials) if i not in finished]
        if progress:
            progress.start(self.key, "optimize", self.spec.optimize.trials, len(finished))
        if not todo:
            return finished
        on_done = (lambda _m: progress.advance(self.key, "optimize")) if progress else None
        logger.info("%s optimize: %d of %d trials to run (%d re-told)", self.key, len(todo), self.spec.optimize.trials,
                    len(finished))
        pool = get_pool()
        pool.start()
        parallel = self.spec.optimize.parallel or len(pool.handles)
        while todo:
            batch, todo = todo[:parallel], todo[parallel:]
            asked = [self._ask(study, i) for i in batch]
            try:
                markers = pool.run("trial", [job for _, job in asked], on_done=on_done)
            except BaseException:
                for t, _ in asked:
                    study.tell(t, state=_failed())
                raise
            for i, (t, _), m in zip(batch, asked, markers):
                study.tell(t, self.values(m))
                finished[i] = m
        return finished

    def _ask(self, study, i: int):
        t = study.ask(self.space)
        t.set_user_attr("trial", i)
        return t, self.job(i, dict(t.params))


def _failed():
    from optuna.trial import TrialState

    return TrialState.FAIL


# ---------------------------------------------------------------- results

def pareto_mask(values: np.ndarray) -> np.ndarray:
    """(n, k) objective values, all minimised -> (n,) True where no other row dominates (<= all, < one)."""
    n = len(values)
    out = np.ones(n, dtype=bool)
    for i in range(n):
        le = (values <= values[i]).all(axis=1)
        lt = (values < values[i]).any(axis=1)
        out[i] = not (le & lt).any()
    return out


def choose(rows: list[dict], max_refusal_rate: float) -> int:
    """The chosen trial id (see the module doc)."""
    ok = [r for r in rows if r["refusals"] <= max_refusal_rate * r["n"]]
    if ok:
        return min(ok, key=lambda r: (r["kl"], r["refusals"], r["trial"]))["trial"]
    front = [r for r in rows if r["pareto"]] or rows
    v = np.array([[r["refusals"], r["kl"]] for r in front], dtype=np.float64)
    span = v.max(axis=0) - v.min(axis=0)
    scaled = (v - v.min(axis=0)) / np.where(span > 0, span, 1.0)
    dist = np.hypot(scaled[:, 0], scaled[:, 1])
    return front[min(range(len(front)), key=lambda k: (dist[k], front[k]["trial"]))]["trial"]


def summary_rows(store: Store, finished: dict[int, dict], objectives: list[str], max_refusal_rate: float) -> list[dict]:
    rows = []
    for i in sorted(finished):
        m = finished[i]
        rows += store.read_table(m["data"], sha256=m["sha256"]).to_pylist()
    values = np.array([[r[OBJECTIVE_COLUMNS[o]] for o in objectives] for r in rows], dtype=np.float64)
    for r, p in zip(rows, pareto_mask(values)):
        r["pareto"] = bool(p)
    chosen = choose(rows, max_refusal_rate)
    for r in rows:
        r["chosen"] = r["trial"] == chosen
    return rows


def _eval_jobs(spec: RunSpec, key: str, draw, row: dict, position: int) -> list[TrialEvalJob]:
    prompts = draw.split("test", "harmful")
    params = json.loads(row["params"])
    jobs = []
    for index, part in enumerate(plan.chunks(prompts, spec.evaluation.prompts_per_job)):
        digest = digest_json({"kind": "eval-optimized", "model": spec.inputs["models"][key], "trial": row["trial"],
                              "params": params, "position": position, "index": index, "judges": spec.evaluation.judges,
                              "prompts": [(p.prompt_id, p.instruction) for p in part],
                              "max_new_tokens": spec.generation.max_new_tokens,
                              "batch_size": spec.generation.batch_size, "study": row.get("study")})
        jobs.append(TrialEvalJob(run_id=spec.run_id, model=spec.model(key), store=spec.store, dataset=EVAL_DATASET,
                                 index=index, trial=row["trial"], params=params, position=position, prompts=part,
                                 max_new_tokens=spec.generation.max_new_tokens, batch_size=spec.generation.batch_size,
                                 max_batch_size=spec.generation.max_batch_size,   # not in the digest (hardware)
                                 judges=spec.evaluation.judges, input_digest=digest))
    return jobs


def _write_evals(store: Store, spec: RunSpec, key: str, jobs: list[TrialEvalJob]) -> str:
    """The chosen trial's `evals` rows on harmful test: rates per judge (Wilson 95 %) and the mean refusal score,
    as the evaluate stage writes them for the paper's direction."""
    from refdir.workers.judges import judge_metric, wilson_interval

    t = pa.concat_tables([store.read_table(store.marker(layout.completion_marker(
        spec.run_id, key, j.dataset, j.intervention, j.index))["data"]) for j in jobs])
    rows = []
    for judge in sorted(set(t["judge"].to_pylist())):
        metric, column = judge_metric(judge)
        flags = [f for f in t.filter(pc.equal(t["judge"], judge))[column].to_pylist() if f is not None]
        if flags:
            lo, hi = wilson_interval(sum(flags), len(flags))
            rows.append((judge, metric, float(np.mean(flags)), len(flags), lo, hi))
    first = t.filter(pc.equal(t["judge"], t["judge"][0]))
    rows.append(("", "mean_refusal_score", float(pc.mean(first["refusal_score"]).as_py()), first.num_rows, None, None))
    table = pa.Table.from_pylist([{"run_id": spec.run_id, "model": key, "dataset": EVAL_DATASET,
                                   "intervention": INTERVENTION, "judge": j, "metric": m, "value": v, "n": n,
                                   "ci_low": lo, "ci_high": hi} for j, m, v, n, lo, hi in rows], schema=evals_schema())
    rel = layout.evals_table(spec.run_id, key, EVAL_DATASET, INTERVENTION)
    store.write_table(rel, table, table_name="evals", run_id=spec.run_id)
    return rel


def settings_digest(store: Store, spec: RunSpec, key: str) -> str:
    """What a finished stage vouches for, readable without prompts or models: every optimize setting that
    changes its outputs and the commit of the selection it searched from (which fixes the val prompts)."""
    m = store.marker(layout.stage_manifest(spec.run_id, key, "select")) or {}
    return digest_json({"optimize": spec.optimize.model_dump(exclude={"enabled", "parallel"}),
                        "select": m.get("commit") or m.get("outputs"), "generation": spec.generation.model_dump(),
                        "evaluation": {"judges": spec.evaluation.judges,
                                       "prompts_per_job": spec.evaluation.prompts_per_job}})


def is_done(store: Store, spec: RunSpec, key: str) -> bool:
    """True when the stage is off, or its manifest vouches for the settings planned now (no model, no Ray)."""
    if not spec.optimize.enabled:
        return True
    m = store.marker(layout.optimize_manifest(spec.run_id, key))
    return bool(m) and m.get("status") == "done" and m.get("settings") == settings_digest(store, spec, key)


def _done(store: Store, spec: RunSpec, key: str, digest: str) -> dict | None:
    m = store.marker(layout.optimize_manifest(spec.run_id, key))
    if is_done(store, spec, key) and m.get("study") == digest and not store.bad_files(m.get("files") or {}):
        return m
    return None


def optimize_model(spec: RunSpec, key: str, store: Store, pool: Callable[[], object], draw,
                   progress=None) -> dict:
    """The optimize stage of one model (no-op unless spec.optimize.enabled); returns its manifest.

    `pool()` gives the model's WorkerPool (workers/pool.py); it is called only when there is work, so a finished
    stage never starts Ray or loads a model."""
    if not spec.optimize.enabled:
        return {}
    run_id = spec.run_id
    selected = _selected(store, run_id, key)
    val = kept_val(store, spec, key, draw)
    n_layers = int(selected.get("n_layers") or max(_live_layers(store, run_id, key, int(selected["position"]))) + 1)
    study = Study(spec, key, store, val, selected, n_layers)
    if (m := _done(store, spec, key, study.digest)) is not None:
        return m
    finished = study.run(pool, progress)
    rows = summary_rows(store, finished, spec.optimize.objectives, spec.optimize.max_refusal_rate)
    chosen = next(r for r in rows if r["chosen"])
    with store.recording() as files:
        store.write_table(layout.trials_table(run_id, key), pa.Table.from_pylist(rows, schema=trials_schema()),
                          table_name="trials", run_id=run_id)
        jobs = _eval_jobs(spec, key, draw, {**chosen, "study": study.digest}, study.position)
        todo = [j for j in jobs if store.receipt_if_done(layout.completion_marker(run_id, key, j.dataset,
                                                          j.intervention, j.index), j.job_id, j.input_digest) is None]
        if todo:
            pool().run("trial_eval", todo)
        _write_evals(store, spec, key, jobs)
    paper = next(r for r in rows if r["trial"] == 0)
    m = {"model": key, "stage": "optimize", "status": "done", "planned": spec.optimize.trials, "done": len(rows),
         "study": study.digest, "settings": settings_digest(store, spec, key), "chosen": chosen["trial"],
         "chosen_values": {"refusals": chosen["refusals"], "n": chosen["n"], "kl": chosen["kl"]},
         "paper_values": {"refusals": paper["refusals"], "n": paper["n"], "kl": paper["kl"]}, "files": files}
    store.write_marker(layout.optimize_manifest(run_id, key), **m)
    logger.info("%s optimize: chosen trial %d (%d/%d refusals, KL %.4f); paper's direction %d/%d, KL %.4f", key,
                chosen["trial"], chosen["refusals"], chosen["n"], chosen["kl"], paper["refusals"], paper["n"],
                paper["kl"])
    return m
