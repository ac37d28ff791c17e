"""Planning: pure functions from a spec and a prompt draw to deterministic job lists.

    jobs = extract_jobs(spec, model, draw)           # every planned job, marked or not
    todo = [j for j in jobs if not is_done(store.marker(extract_marker(j)), j)]

Job ids derive from (stage, split, label, index) and prompt ids from the draw, so a rerun of the same spec
plans exactly the same jobs and the markers in the store decide what is left to do. Each job carries the
digest of every input its output depends on -- the prompts' text, the model's content digest, the settings
it uses and, for later stages, the sha256 of the stage output it reads -- and a marker counts only when it
vouches for that digest (`is_done`).
"""

from __future__ import annotations

from collections.abc import Sequence

from refdir.schemas import layout
from refdir.schemas.jobs import EvalJob, ExtractJob, Prompt, ScoreJob
from refdir.schemas.spec import ModelSpec, RunSpec
from refdir.workers.identity import digest_json

# (dataset, label) -> interventions evaluated on it
EVAL_PLAN: dict[str, tuple[str, ...]] = {
    "harmful_test": ("baseline", "ablation", "actadd", "orthogonalized", "random_ablation"),
    "harmless_test": ("baseline", "actadd", "random_actadd"),
}
# damage metrics (CE, first-token KL) under these; random_ablation (the same-norm random direction, seed 0) is the
# control the ablation's damage compares against, as its refusal rate is for the ablation's refusal rate
DAMAGE_INTERVENTIONS = ("baseline", "ablation", "actadd", "random_ablation")


def chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _texts(prompts: list[Prompt]) -> list[tuple[int, str, str]]:
    return [(p.prompt_id, p.instruction, p.category) for p in prompts]


def _digest(spec: RunSpec, model: ModelSpec, kind: str, **parts) -> str:
    return digest_json({"kind": kind, "model": spec.inputs["models"][model.key], **parts})


def _with_digest(job, digest: str):
    return job.model_copy(update={"input_digest": digest})


def is_done(marker: dict | None, job) -> bool:
    """A job is done when its marker exists and vouches for the job's input digest."""
    return marker is not None and marker.get("input_digest") == job.input_digest


def extract_jobs(spec: RunSpec, model: ModelSpec, draw) -> list[ExtractJob]:
    jobs = []
    for split in layout.EXTRACT_SPLITS:
        for label in layout.LABELS:
            for index, prompts in enumerate(chunks(draw.split(split, label), spec.extraction.prompts_per_job)):
                job = ExtractJob(run_id=spec.run_id, model=model, store=spec.store, split=split, label=label,
                                 index=index, prompts=prompts, activation_dtype=spec.extraction.activation_dtype,
                                 batch_size=spec.compute.batch_size,
                                 filter_prompts=spec.prompts.filter_train if split == "train" else spec.prompts.filter_val)
                jobs.append(_with_digest(job, _digest(spec, model, "extract", split=split, label=label, index=index,
                                                      prompts=_texts(prompts), dtype=job.activation_dtype,
                                                      filter=job.filter_prompts)))
    return jobs


def extract_marker(job: ExtractJob) -> str:
    return layout.activation_marker(job.run_id, job.model.key, job.split, job.label, job.index)


def score_jobs(spec: RunSpec, model: ModelSpec, candidates: list[tuple[int, int]], harmful_val: list[Prompt],
               harmless_val: list[Prompt], upstream: str | None = None) -> list[ScoreJob]:
    """`upstream`: the sha256 of the candidates.parquet the jobs read."""
    val = {"harmful": _texts(harmful_val), "harmless": _texts(harmless_val)}
    return [_with_digest(ScoreJob(run_id=spec.run_id, model=model, store=spec.store, index=i, candidates=c,
                                  harmful_val=harmful_val, harmless_val=harmless_val, batch_size=spec.compute.batch_size),
                         _digest(spec, model, "score", index=i, candidates=c, val=val, candidates_from=upstream))
            for i, c in enumerate(chunks(candidates, spec.extraction.candidates_per_job))]


def score_marker(job: ScoreJob) -> str:
    return layout.score_marker(job.run_id, job.model.key, job.index)


def eval_jobs(spec: RunSpec, model: ModelSpec, draw, upstream: str | None = None) -> list[EvalJob]:
    """`upstream`: the sha256 of the direction.json the jobs read (baseline jobs read none)."""
    jobs = []
    for dataset, interventions in EVAL_PLAN.items():
        prompts = draw.split("test", "harmful" if dataset.startswith("harmful") else "harmless")
        for intervention in interventions:
            for index, part in enumerate(chunks(prompts, spec.evaluation.prompts_per_job)):
                job = EvalJob(run_id=spec.run_id, model=model, store=spec.store, dataset=dataset,
                              intervention=intervention, index=index, prompts=part,
                              max_new_tokens=spec.generation.max_new_tokens,
                              batch_size=spec.generation.batch_size, judges=spec.evaluation.judges,
                              max_batch_size=spec.generation.max_batch_size)   # not in the digest (hardware)
                direction = None if intervention == "baseline" else upstream
                jobs.append(_with_digest(job, _digest(spec, model, "eval", dataset=dataset, intervention=intervention,
                                                      index=index, prompts=_texts(part), judges=job.judges,
                                                      max_new_tokens=job.max_new_tokens,
                                                      batch_size=job.batch_size, direction_from=direction)))
    return jobs


def eval_marker(job: EvalJob) -> str:
    return layout.completion_marker(job.run_id, job.model.key, job.dataset, job.intervention, job.index)
