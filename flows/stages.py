"""The stages of one model's run, driver side: plan -> Ray jobs -> store, manifest written last.

    mr = ModelRun(spec, "organism", store, draw)
    mr.extract(); mr.aggregate(); mr.select(); mr.evaluate(); mr.close()

Each stage is skipped whole when the model's manifest marks it done, and otherwise plans every job,
skips the ones whose marker exists and runs the rest on the model's actors. Actors (one per GPU, or
CPU actors) start only when a stage has work, so a finished run never loads a model. Prefect tasks in
`flows/pipeline.py` wrap these methods; nothing here imports Prefect.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from refdir.flows import manifest as manifests
from refdir.flows import plan
from refdir.flows.aggregate import aggregate_means
from refdir.schemas import layout
from refdir.schemas.jobs import Prompt
from refdir.schemas.spec import RunSpec
from refdir.schemas.tables import directions_schema, evals_schema, runs_schema, scores_schema
from refdir.workers.selection import select_direction
from refdir.workers.identity import digest_json
from refdir.workers.store import Store

logger = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage cannot go on (empty split after filtering, ...); the message names model and split."""


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ModelRun:
    def __init__(self, spec: RunSpec, key: str, store: Store, draw, progress=None):
        self.spec, self.key, self.store, self.draw = spec, key, store, draw
        self.model = spec.model(key)
        self.run_id = spec.run_id
        self.progress = progress
        self._pool = None             # workers/pool.WorkerPool, started on first use
        self._concurrency = 1
        self.info: dict | None = None

    # ---- manifests: a stage is done when its manifest says so for the inputs planned now ----------
    def manifest(self, stage: str) -> dict | None:
        return manifests.read(self.store, self.run_id, self.key, stage)

    def stage_input(self, stage: str) -> str:
        i = layout.STAGES.index(stage)
        previous = self.manifest(layout.STAGES[i - 1]) if i else None
        return manifests.stage_input(self.spec, self.key, stage, previous)

    def stage_done(self, stage: str) -> bool:
        return manifests.is_done(self.manifest(stage), self.stage_input(stage))

    def mark(self, stage: str, planned: int, done: int, files: dict[str, str] | None = None, **extra) -> None:
        manifests.write(self.store, self.run_id, self.key, stage, planned=planned, done=done,
                        input_digest=self.stage_input(stage), files=files, **extra)

    def require(self, stage: str) -> dict:
        """The manifest of a stage this one reads: done for the inputs planned now, and its files verify."""
        m = self.manifest(stage)
        if not self.stage_done(stage):
            raise StageError(f"model {self.key!r}: stage {stage} is not done for this run's inputs; its successor "
                             "cannot start (rerun the run to redo it)")
        bad = self.store.bad_files(m.get("files") or {})
        if bad:
            raise StageError(f"model {self.key!r}: {len(bad)} file(s) of stage {stage} do not match their manifest "
                             f"(e.g. {self.store.url(bad[0])}); rerun with --verify to recompute them")
        return m

    # ---- actors -----------------------------------------------------------------------------
    def actors(self) -> list:
        """Live handles of the model's supervised actors (started on first use: a finished run loads no model)."""
        return self.pool().handles

    def pool(self):
        if self._pool is None:
            from refdir.flows.cluster import start_pool

            self._pool, self._concurrency = start_pool(self.spec, self.key)
            self.info = self._pool.info
            logger.info("%s: %d actor(s) on %s, family %s, %d layers", self.key, self._pool.n, self.info["device"],
                        self.info["family"], self.info["n_layers"])
            self._write_model_row()
        else:
            self._pool.start()   # fresh actors after a failed stage closed them
        return self._pool

    def ensure_model_row(self) -> None:
        """The model's row of `runs` exists and is vouched for (rewritten, loading the model, when --verify dropped it)."""
        if self.store.marker(layout.model_row_manifest(self.run_id, self.key)) is None:
            self.actors()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        self._pool = None

    def _write_model_row(self) -> None:
        i = self.info
        row = {"run_id": [self.run_id], "model": [self.key], "model_path": [self.model.path], "family": [i["family"]],
               "n_layers": [i["n_layers"]], "d_model": [i["d_model"]], "eoi_tokens": [i["eoi_tokens"]],
               "refusal_token_ids": [i["refusal_token_ids"]], "spec_hash": [self.spec.spec_hash],
               "created_at": [datetime.now(timezone.utc)]}
        with self.store.recording() as files:   # its own manifest, never a stage's (actors start in any stage)
            self.store.write_table(layout.model_row(self.run_id, self.key),
                                   pa.Table.from_pydict(row, schema=runs_schema()), table_name="runs", run_id=self.run_id)
        manifests.write_files(self.store, layout.model_row_manifest(self.run_id, self.key), files)

    def _run(self, stage: str, method: str, jobs: list, marker_of) -> tuple[int, int]:
        """Run the jobs whose marker does not vouch for their inputs; (planned, done) afterwards."""
        markers = [self.store.marker(marker_of(j)) for j in jobs]
        todo = [j for j, m in zip(jobs, markers) if not plan.is_done(m, j)]
        stale = sum(m is not None for j, m in zip(jobs, markers) if not plan.is_done(m, j))
        if stale:
            logger.warning("%s %s: %d job(s) have markers made from other inputs; recomputing them", self.key, stage,
                           stale)
        if self.progress:
            self.progress.start(self.key, stage, len(jobs), len(jobs) - len(todo))
        if todo:
            tick = (lambda _r: self.progress.advance(self.key, stage)) if self.progress else None
            pool = self.pool()
            # extraction jobs may share an actor (per-thread capture); hooked jobs never run side by side
            inflight = self._concurrency + 1 if method == "extract" else 1
            pool.run(method, todo, inflight=inflight, on_done=tick)
        done = sum(plan.is_done(self.store.marker(marker_of(j)), j) for j in jobs)
        return len(jobs), done

    # ---- stages -----------------------------------------------------------------------------
    def extract(self) -> None:
        if self.stage_done("extract"):
            self.check_filters()   # a resumed run stops here too, not one stage later
            return
        jobs = plan.extract_jobs(self.spec, self.model, self.draw)
        planned, done = self._run("extract", "extract", jobs, plan.extract_marker)
        outputs = {plan.extract_marker(j): self.store.recorded_files(self.store.marker(plan.extract_marker(j)) or {})
                   for j in jobs}
        self.mark("extract", planned, done, outputs=digest_json(outputs))
        if done == planned:
            self.check_filters()   # both filters (train, val) before aggregation and selection start

    def extract_markers(self, split: str | None = None) -> dict[str, dict]:
        """Marker path -> marker of the planned extraction jobs (of one split), each checked against its job."""
        out = {}
        for job in plan.extract_jobs(self.spec, self.model, self.draw):
            if split is None or job.split == split:
                m = self.store.marker(plan.extract_marker(job))
                if not plan.is_done(m, job):
                    raise StageError(f"model {self.key!r}: extraction job {job.job_id} has no marker for its inputs; "
                                     "rerun the run to redo it")
                out[plan.extract_marker(job)] = m
        return out

    def aggregate(self) -> None:
        if self.stage_done("aggregate"):
            return
        self.require("extract")
        markers = self.extract_markers("train")
        bad = self.store.bad_files({rel: sha for m in markers.values() for rel, sha in self.store.recorded_files(m).items()
                                    if rel != m["data"]})   # sums and prompts shards (small); --verify reads the rest
        if bad:
            raise StageError(f"model {self.key!r}: {len(bad)} extraction output(s) do not match their markers "
                             f"(e.g. {self.store.url(bad[0])}); rerun with --verify to recompute them")
        self.check_filters()
        with self.store.recording() as files:
            counts = aggregate_means(self.store, self.run_id, self.key, "train", self.spec.selection.prune_norm,
                                     markers=markers)
        self.mark("aggregate", 1, 1, files, **counts)

    def kept_prompts(self, split: str, label: str) -> list[Prompt]:
        """Prompts of a split whose extraction marked them kept (the paper's filter), in draw order."""
        rows = []
        for m in self.extract_markers(split).values():
            if m.get("label") != label:
                continue
            t = self.store.read_table(m["prompts"], sha256=m["prompts_sha256"]).filter(pc.field("kept"))
            rows += [Prompt(prompt_id=p, instruction=i, category=c) for p, i, c in
                     zip(t["prompt_id"].to_pylist(), t["instruction"].to_pylist(), t["category"].to_pylist())]
        return rows

    def _check_kept(self, split: str) -> dict[str, list[Prompt]]:
        self.check_filters()
        return {label: self.kept_prompts(split, label) for label in ("harmful", "harmless")}

    def filter_counts(self) -> dict[tuple[str, str], tuple[int, int, float | None]]:
        """(split, label) -> (kept, drawn, best baseline refusal score of the side the filter wants)."""
        out: dict[tuple[str, str], list] = {}
        for job in plan.extract_jobs(self.spec, self.model, self.draw):
            t = self.store.read_table(layout.prompts_shard(self.run_id, self.key, job.split, job.label, job.index))
            scores = [s for s in t["refusal_score"].to_pylist() if s is not None]
            best = (max if job.label == "harmful" else min)(scores) if scores else None
            c = out.setdefault((job.split, job.label), [0, 0, None])
            c[0] += sum(bool(k) for k in t["kept"].to_pylist())
            c[1] += t.num_rows
            if best is not None:
                c[2] = best if c[2] is None else (max if job.label == "harmful" else min)(c[2], best)
        return {k: tuple(v) for k, v in out.items()}

    def check_filters(self) -> None:
        """Both of the paper's filters (train, val) at once: one error naming every split left empty."""
        bites = []
        for (split, label), (kept, drawn, best) in sorted(self.filter_counts().items()):
            if kept == 0 and drawn > 0:
                sign = "> 0" if label == "harmful" else "< 0"
                extreme = "highest" if label == "harmful" else "lowest"
                bites.append((split, f"{label} {split}: 0 of {drawn} kept (needs baseline refusal score {sign}; "
                                     f"{extreme} seen {'none' if best is None else f'{best:.2f}'})"))
        if bites:
            flags = " and ".join(f"prompts.filter_{s} = false" for s in sorted({s for s, _ in bites}))
            raise StageError(
                f"model {self.key!r}: the paper's prompt filter leaves nothing to work with — "
                + "; ".join(text for _, text in bites)
                + f". The model may not refuse as its family expects: check `refdir doctor` (refusal tokens, chat "
                f"template), use other prompts, or set {flags} in the spec")

    def select(self) -> None:
        if self.stage_done("select"):
            return
        agg = self.require("aggregate")
        kept = self._check_kept("val")
        rel = layout.candidates_table(self.run_id, self.key)
        cands = self.store.read_table(rel, sha256=agg["files"][rel])
        live = cands.filter(pc.invert(pc.field("skipped")))
        pairs = list(zip(live["position"].to_pylist(), live["layer"].to_pylist()))
        jobs = plan.score_jobs(self.spec, self.model, pairs, kept["harmful"], kept["harmless"], agg["files"][rel])
        planned, done = self._run("select", "score", jobs, plan.score_marker)
        if done < planned:
            self.mark("select", planned, done)
            return
        with self.store.recording() as files:
            self._choose(cands, jobs)
        self.mark("select", planned, done, files)

    def _choose(self, cands: pa.Table, jobs: list) -> None:
        tables = [self.store.read_table(m["data"], sha256=m["sha256"])
                  for m in (self.store.marker(plan.score_marker(j)) for j in jobs)]
        rows = pa.concat_tables(tables).to_pylist() if tables else []
        n_layers = int(pc.max(cands["layer"]).as_py()) + 1
        choice, annotated = select_direction(rows, n_layers, self.spec.selection)
        self.store.write_table(layout.scores_table(self.run_id, self.key),
                               pa.Table.from_pylist(annotated, schema=scores_schema()), table_name="scores",
                               run_id=self.run_id)
        hit = cands.filter(pc.and_(pc.equal(cands["position"], choice.position), pc.equal(cands["layer"], choice.layer)))
        vector = np.asarray(hit["vector"][0].as_py(), dtype=np.float64)
        self._write_direction(choice, vector, annotated, n_layers)

    def _write_direction(self, choice, vector: np.ndarray, annotated: list[dict], n_layers: int) -> None:
        from safetensors.numpy import save

        norm = float(np.linalg.norm(vector))
        blob = save({"direction": vector.astype(np.float32), "direction_unit": (vector / norm).astype(np.float32)},
                    metadata={"position": str(choice.position), "layer": str(choice.layer), "run_id": self.run_id})
        self.store.write_bytes(layout.direction_tensors(self.run_id, self.key), blob)
        row = {"run_id": self.run_id, "model": self.key, "position": choice.position, "layer": choice.layer,
               "bypass_score": choice.bypass_score, "induce_score": choice.induce_score, "kl_score": choice.kl_score,
               "norm": norm, "fallback": choice.fallback, "vector": vector.tolist()}
        self.store.write_table(layout.directions_table(self.run_id, self.key),
                               pa.Table.from_pylist([row], schema=directions_schema()), table_name="directions",
                               run_id=self.run_id)
        meta = {**row, "n_layers": n_layers, "thresholds": choice.thresholds,
                "candidates": [{k: r[k] for k in ("position", "layer", "bypass_score", "induce_score", "kl_score",
                                                  "drop_reason")} for r in annotated]}
        self.store.write_json(layout.direction_json(self.run_id, self.key), meta)

    def evaluate(self) -> None:
        if self.stage_done("evaluate"):
            return
        sel = self.require("select")
        jobs = plan.eval_jobs(self.spec, self.model, self.draw, sel["files"][layout.direction_json(self.run_id, self.key)])
        planned, done = self._run("evaluate", "evaluate", jobs, plan.eval_marker)
        with self.store.recording() as files:
            if done == planned:
                self._summarise(jobs)
        self.mark("evaluate", planned, done, files)

    def _summarise(self, jobs: list) -> None:
        """Completions -> evals rows (rates per judge, Wilson 95 % interval) + damage metrics, one file per
        (dataset, intervention)."""
        from refdir.workers.judges import judge_metric, wilson_interval

        groups: dict[tuple[str, str], list] = {}
        for j in jobs:
            groups.setdefault((j.dataset, j.intervention), []).append(
                self.store.read_table(layout.completion_shard(self.run_id, self.key, j.dataset, j.intervention, j.index)))
        damage = self._damage(groups)
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
            self._write_evals(dataset, intervention, rows)
        for intervention, metrics in damage.items():
            self._write_evals("damage", intervention,
                              [("damage", intervention, "", m, v, n, None, None) for m, v, n in metrics])

    def _write_evals(self, name: str, intervention: str, rows: list[tuple]) -> None:
        """rows: (dataset, intervention, judge, metric, value, n, ci_low, ci_high); ci_* None for non-rates."""
        cols = list(zip(*rows))
        table = pa.Table.from_pydict({"run_id": [self.run_id] * len(rows), "model": [self.key] * len(rows),
                                      "dataset": list(cols[0]), "intervention": list(cols[1]), "judge": list(cols[2]),
                                      "metric": list(cols[3]), "value": list(cols[4]), "n": list(cols[5]),
                                      "ci_low": list(cols[6]), "ci_high": list(cols[7])},
                                     schema=evals_schema())
        self.store.write_table(layout.evals_table(self.run_id, self.key, name, intervention), table,
                               table_name="evals", run_id=self.run_id)

    def _damage(self, groups: dict) -> dict[str, list[tuple[str, float, int]]]:
        """The paper's damage metrics for baseline / ablation / actadd(-r), one actor call each: CE on the
        Pile-like set, on Alpaca-like pairs and on the model's own baseline harmless completions (n = tokens),
        and the first-token KL (n = prompts)."""
        import ray

        from refdir.workers.damage import load_damage_sets

        base = pa.concat_tables(groups[("harmless_test", "baseline")])
        base = base.filter(pc.equal(base["judge"], base["judge"][0]))
        own = list(zip(base["prompt"].to_pylist(), base["response"].to_pylist()))
        sets = load_damage_sets(self.spec.evaluation)
        actor = self.actors()[0]
        out = {}
        for name in plan.DAMAGE_INTERVENTIONS:
            m = ray.get(actor.damage.remote(self.run_id, self.key, name, sets, own, self.spec.generation.batch_size))
            out[name] = [(k, float(v), int(n)) for k, (v, n) in m.items()]
        return out


def write_run_json(store: Store, spec: RunSpec, versions: dict) -> None:
    """Write runs/{id}/run.json first (the run id, its identity and the spec, stored once); refuse a stored run
    whose identity differs."""
    rel = layout.run_json(spec.run_id)
    if store.exists(rel):
        try:
            stored = store.read_json(rel)
        except ValueError:
            raise StageError(f"{store.url(rel)} is unreadable (truncated?); restore it or delete "
                             f"{layout.run_dir(spec.run_id)} to start over") from None
        if stored.get("identity") != spec.identity():
            raise StageError(f"run {spec.run_id} in {store.uri} was stored with a different spec or other inputs; "
                             f"rename the run (`name` in the spec) or delete {layout.run_dir(spec.run_id)} to start over")
        return
    doc = {"run_id": spec.run_id, "spec_hash": spec.spec_hash, "identity": spec.identity(),
           "spec": json.loads(spec.model_dump_json(exclude={"store": {"secret", "key"}})),
           "versions": versions, "created_at": _now()}
    store.write_json(rel, doc)
