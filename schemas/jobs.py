"""Job specs sent to workers and the small receipts they send back.

Only these travel through Ray and Prefect: a job names its inputs (prompt texts are small) and the
store URI its output goes to; the worker writes the data and its done-marker and returns a receipt
with the object's URI, row count and checksum. Tensors never travel back. Job ids are deterministic
(stage, split, label, index), so a rerun plans the same jobs and skips the ones already marked.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from refdir.schemas.spec import ModelSpec, StoreSpec

Split = Literal["train", "val", "test"]
Label = Literal["harmful", "harmless"]
# "optimized": a chosen optimize trial's weighted orthogonalisation (TrialEvalJob); the rest are EvalJob's
Intervention = Literal["baseline", "ablation", "actadd", "orthogonalized", "random_ablation", "random_actadd",
                       "optimized"]


class _Job(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Prompt(_Job):
    prompt_id: int = Field(..., description="Index in the run's draw for its split and label (stable across reruns).")
    instruction: str
    category: str = ""


class ExtractJob(_Job):
    """Forward pass over a slice of prompts; writes an activation shard, a sums shard, then a marker."""

    run_id: str
    model: ModelSpec
    store: StoreSpec
    split: Literal["train", "val"]
    label: Label
    index: int
    prompts: list[Prompt]
    activation_dtype: Literal["float32", "float16"] = "float32"
    batch_size: int = 32
    filter_prompts: bool = Field(True, description="Apply the paper's refusal-score filter to this slice's sums.")
    input_digest: str = Field("", description="Digest of every input the output depends on (flows/plan.py); its marker records it, and a job is done only when they match.")

    @property
    def job_id(self) -> str:
        return f"extract/{self.split}-{self.label}-{self.index:05d}"


class ScoreJob(_Job):
    """Bypass / induce / KL for a slice of candidates on the val prompts."""

    run_id: str
    model: ModelSpec
    store: StoreSpec
    index: int
    candidates: list[tuple[int, int]] = Field(..., description="(position, layer) pairs read from candidates.parquet")
    harmful_val: list[Prompt]
    harmless_val: list[Prompt]
    batch_size: int = 32
    input_digest: str = Field("", description="Digest of every input the output depends on (flows/plan.py); its marker records it, and a job is done only when they match.")

    @property
    def job_id(self) -> str:
        return f"score/{self.index:05d}"


class EvalJob(_Job):
    """Greedy completions of a slice of prompts under one intervention, judged."""

    run_id: str
    model: ModelSpec
    store: StoreSpec
    dataset: str
    intervention: Intervention
    index: int
    prompts: list[Prompt]
    max_new_tokens: int = 512
    batch_size: int = 32
    max_batch_size: int | None = Field(None, description="On a GPU, batches sized from free memory up to this (generation.max_batch_size); None = fixed batch_size batches. Not in input_digest (floating-point batch effects only).")
    judges: list[str] = ["substring"]
    input_digest: str = Field("", description="Digest of every input the output depends on (flows/plan.py); its marker records it, and a job is done only when they match.")

    @property
    def job_id(self) -> str:
        return f"eval/{self.dataset}-{self.intervention}-{self.index:05d}"


class TrialJob(_Job):
    """One optimize trial: apply its weighted orthogonalisation, generate on harmful val, KL on harmless val,
    restore (workers/optimize.run_trial)."""

    run_id: str
    model: ModelSpec
    store: StoreSpec
    trial: int
    params: dict = Field(..., description="Flat study parameters (workers/optimize.TrialParams.from_flat).")
    position: int = Field(..., description="The selected direction's position: candidates are taken there.")
    harmful_val: list[Prompt]
    harmless_val: list[Prompt]
    max_new_tokens: int = 64
    batch_size: int = 32
    judges: list[str] = ["substring"]
    study: str = Field(..., description="Digest of the study's inputs (settings, prompts, candidates): a marker counts for a rerun only when it matches.")
    input_digest: str = Field(..., description="Digest of the study and this trial's id and parameters.")

    @property
    def job_id(self) -> str:
        return f"trial/{self.trial:05d}"


class TrialEvalJob(EvalJob):
    """An EvalJob under the chosen trial's weighted orthogonalisation (intervention 'optimized'), in the
    `completions` layout (workers/optimize.run_trial_eval)."""

    intervention: Literal["optimized"] = "optimized"
    trial: int
    params: dict = Field(..., description="Flat study parameters of the trial.")
    position: int = Field(..., description="The selected direction's position.")
    input_digest: str = Field(..., description="Digest of every input the output depends on (flows/optimize.py).")


class Receipt(_Job):
    """What a job returns: where its output is, how big, its checksum, and how long it took."""

    job_id: str
    uri: str
    rows: int
    sha256: str
    seconds: float = 0.0
    skipped: bool = Field(False, description="True when the marker already existed and nothing was recomputed.")
