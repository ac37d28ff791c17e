"""Thin Ray actors: one loaded model serving extraction, scoring and evaluation jobs.

    Worker = remote_worker(num_gpus=1, num_cpus=1, max_restarts=2)
    actor = Worker.remote(model_spec, store_spec)
    receipt = ray.get(actor.extract.remote(job))

`ModelWorker` is plain Python (testable without Ray); `remote_worker` wraps it as a Ray actor class.
The model loads in the constructor, so a restarted actor reloads it; every job is idempotent (it checks
its marker first), so Ray's retry of an in-flight call after a crash never duplicates rows. Only job
specs go in and small receipts come out; data moves through the store. Extraction shards are encoded
and written by CPU-side writer threads, so in a threaded actor the next forward pass does not wait for them.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from refdir.schemas import layout
from refdir.schemas.jobs import EvalJob, ExtractJob, Receipt, ScoreJob
from refdir.schemas.spec import ModelSpec, StoreSpec
from refdir.workers.damage import DamageSets
from refdir.workers.evaluate import Direction, damage_metrics, run_eval
from refdir.workers.extract import ExtractWriter, run_extract
from refdir.workers.model import load_model
from refdir.workers.scoring import Baseline, run_score
from refdir.workers.store import Store

logger = logging.getLogger(__name__)


class ModelWorker:
    """Holds one model on one device (GPU when the actor was given one)."""

    def __init__(self, model: ModelSpec, store: StoreSpec, device: str | None = None, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.lm = load_model(model, device)
        self.store = Store.open(store)
        self._baseline: dict[str, Baseline] = {}
        self._vectors: dict[str, dict] = {}
        self._directions: dict[str, Direction] = {}
        self._judges: dict = {}   # judge name -> loaded judge: a judge model loads once per actor
        # extraction jobs encode and write their shards on these threads; with several jobs in flight (a
        # threaded actor) the next job's forward pass runs meanwhile (workers/extract.ExtractWriter)
        self._writer = ExtractWriter(workers=2, max_pending=2)

    def ping(self) -> dict:
        """Small facts about the loaded model and the process (pid for fault tests)."""
        lm = self.lm
        return {"pid": os.getpid(), "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
                "family": lm.family.name, "n_layers": lm.n_layers, "d_model": lm.d_model,
                "eoi_ids": lm.eoi_ids, "eoi_tokens": lm.eoi_tokens, "refusal_token_ids": lm.refusal_token_ids,
                "missing_refusal_tokens": lm.missing_refusal_tokens}

    def extract(self, job: ExtractJob) -> Receipt:
        return run_extract(self.lm, self.store, job, writer=self._writer)

    def score(self, job: ScoreJob) -> Receipt:
        key = f"{job.run_id}/{job.model.key}"
        if key not in self._vectors:
            self._vectors[key] = self._load_candidates(job.run_id, job.model.key)
        if key not in self._baseline:
            self._baseline[key] = Baseline.compute(self.lm, job)
        return run_score(self.lm, self.store, job, self._vectors[key], self._baseline[key])

    def evaluate(self, job: EvalJob) -> Receipt:
        return run_eval(self.lm, self.store, job, self._direction(job.run_id, job.model.key), self._judges)

    def damage(self, run_id: str, model_key: str, intervention: str, sets: DamageSets,
               own: list[tuple[str, str]], batch_size: int) -> dict:
        """metric -> (value, n): the paper's CE losses and the first-token KL under `intervention`."""
        d = self._direction(run_id, model_key)
        return damage_metrics(self.lm, d, intervention, sets, own, batch_size)

    def trial(self, job) -> dict:
        """One optimize trial (workers/optimize.py): its marker, with the id of the actor that ran it."""
        from refdir.workers.optimize import run_trial

        return run_trial(self.lm, self.store, job, self._trial_vectors(job.run_id, job.model.key), self._judges,
                         actor=_actor_id())

    def trial_eval(self, job) -> Receipt:
        """Greedy completions of test prompts under a trial's weighted orthogonalisation (intervention 'optimized')."""
        from refdir.workers.optimize import run_trial_eval

        return run_trial_eval(self.lm, self.store, job, self._trial_vectors(job.run_id, job.model.key), self._judges)

    def _trial_vectors(self, run_id: str, model_key: str):
        from refdir.workers.optimize import load_vectors

        key = f"trials:{run_id}/{model_key}"
        if key not in self._vectors:
            self._vectors[key] = load_vectors(self.store, run_id, model_key)
        return self._vectors[key]

    def _load_candidates(self, run_id: str, model_key: str) -> dict[tuple[int, int], np.ndarray]:
        t = self.store.read_table(layout.candidates_table(run_id, model_key))
        pos, layer = t.column("position").to_pylist(), t.column("layer").to_pylist()
        vec = t.column("vector").to_pylist()
        return {(p, l): np.asarray(v, dtype=np.float64) for p, l, v in zip(pos, layer, vec)}

    def _direction(self, run_id: str, model_key: str) -> Direction:
        key = f"{run_id}/{model_key}"
        if key not in self._directions:
            meta = self.store.read_json(layout.direction_json(run_id, model_key))
            self._directions[key] = Direction(torch.tensor(meta["vector"], dtype=torch.float32),
                                              meta["layer"], meta["position"])
        return self._directions[key]


def _actor_id() -> str:
    """The Ray actor id of this process's actor (a plain process: its pid)."""
    try:
        import ray

        return ray.get_runtime_context().get_actor_id() or f"pid-{os.getpid()}"
    except Exception:  # noqa: BLE001 - outside Ray
        return f"pid-{os.getpid()}"


def remote_worker(num_gpus: float = 0, num_cpus: float = 1, max_restarts: int = 2, max_concurrency: int = 1):
    """The Ray actor class for ModelWorker with these resources and restart policy.

    With max_concurrency > 1 the actor is threaded: the driver then sends several extraction jobs at a
    time (capture is per thread) but only one scoring or evaluation job (their hooks act on the whole
    model), see flows/stages.py.
    """
    import ray

    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts,
                      max_task_retries=max_restarts, max_concurrency=max_concurrency)(ModelWorker)
