"""Planning: pure functions from a spec and a prompt draw to deterministic job lists.

    jobs = extract_jobs(spec, model, draw)           # every planned job, marked or not
    todo = [j for j in jobs if not store.exists(marker_of(j))]

Job ids derive from (stage, split, label, index) and prompt ids from the draw, so a rerun of the same spec
plans exactly the same jobs and the markers in the store decide what is left to do.
"""

from __future__ import annotations

from collections.abc import Sequence

from refdir.schemas import layout
from refdir.schemas.jobs import EvalJob, ExtractJob, Prompt, ScoreJob
from refdir.schemas.spec import ModelSpec, RunSpec

# (dataset, label) -> interventions evaluated on it
EVAL_PLAN: dict[str, tuple[str, ...]] = {
    "harmful_test": ("baseline", "ablation", "actadd", "orthogonalized", "random_ablation"),
    "harmless_test": ("baseline", "actadd", "random_actadd"),
}
DAMAGE_INTERVENTIONS = ("baseline", "ablation", "actadd")


def chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def extract_jobs(spec: RunSpec, model: ModelSpec, draw) -> list[ExtractJob]:
    jobs = []
    for split in ("train", "val"):
        for label in ("harmful", "harmless"):
            for index, prompts in enumerate(chunks(draw.split(split, label), spec.extraction.prompts_per_job)):
                jobs.append(ExtractJob(run_id=spec.run_id, model=model, store=spec.store, split=split, label=label,
                                       index=index, prompts=prompts, activation_dtype=spec.extraction.activation_dtype,
                                       batch_size=spec.compute.batch_size,
                                       filter_prompts=spec.prompts.filter_train if split == "train" else spec.prompts.filter_val))
    return jobs


def extract_marker(job: ExtractJob) -> str:
    return layout.activation_marker(job.run_id, job.model.key, job.split, job.label, job.index)


def score_jobs(spec: RunSpec, model: ModelSpec, candidates: list[tuple[int, int]], harmful_val: list[Prompt],
               harmless_val: list[Prompt]) -> list[ScoreJob]:
    return [ScoreJob(run_id=spec.run_id, model=model, store=spec.store, index=i, candidates=c,
                     harmful_val=harmful_val, harmless_val=harmless_val, batch_size=spec.compute.batch_size)
            for i, c in enumerate(chunks(candidates, spec.extraction.candidates_per_job))]


def score_marker(job: ScoreJob) -> str:
    return layout.score_marker(job.run_id, job.model.key, job.index)


def eval_jobs(spec: RunSpec, model: ModelSpec, draw) -> list[EvalJob]:
    jobs = []
    for dataset, interventions in EVAL_PLAN.items():
        prompts = draw.split("test", "harmful" if dataset.startswith("harmful") else "harmless")
        for intervention in interventions:
            for index, part in enumerate(chunks(prompts, spec.evaluation.prompts_per_job)):
                jobs.append(EvalJob(run_id=spec.run_id, model=model, store=spec.store, dataset=dataset,
                                    intervention=intervention, index=index, prompts=part,
                                    max_new_tokens=spec.generation.max_new_tokens,
                                    batch_size=spec.generation.batch_size, judges=spec.evaluation.judges))
    return jobs


def eval_marker(job: EvalJob) -> str:
    return layout.completion_marker(job.run_id, job.model.key, job.dataset, job.intervention, job.index)
