"""One model's run, driver side: what every stage shares -- manifests, the digest chain, the actors, jobs.

    mr = ModelRun(spec, "organism", store, draw)
    mr.extract(); mr.aggregate(); mr.select(); mr.evaluate(); mr.close()

The stages themselves live one per module -- flows/extract.py, flows/aggregate.py (run_stage),
flows/select.py, flows/evaluate.py -- and each starts with `mr.require(previous)`: the previous stage is
done for this run's inputs and the files it wrote match their recorded sha256. A stage is skipped whole when
its manifest says done for the inputs planned now; otherwise it plans every job, runs those whose marker
does not vouch for their inputs on the model's supervised actors, and writes its manifest last. Actors
start only when a stage has work, so a finished run never loads a model. Prefect tasks in
`flows/pipeline.py` wrap the stage methods; nothing here imports Prefect.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

import pyarrow as pa

from refdir.flows import manifest as manifests
from refdir.flows import plan
from refdir.schemas import layout
from refdir.schemas.spec import RunSpec
from refdir.schemas.tables import runs_schema
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

    def run_jobs(self, stage: str, method: str, jobs: list, marker_of) -> tuple[int, int]:
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
    # ---- the stages, one module each (each starts by checking its predecessor) -----------------
    def extract(self) -> None:
        from refdir.flows import extract

        extract.run(self)

    def aggregate(self) -> None:
        from refdir.flows import aggregate

        aggregate.run_stage(self)

    def select(self) -> None:
        from refdir.flows import select

        select.run(self)

    def evaluate(self) -> None:
        from refdir.flows import evaluate

        evaluate.run(self)

    def check_filters(self) -> None:
        from refdir.flows import extract

        extract.check_filters(self)


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
