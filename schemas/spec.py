"""The run specification: one frozen pydantic model loaded from TOML.

`RunSpec` is the only thing a user writes. Every field carries a description, and
`infra/specs/example.toml` mirrors the model in the same order (tests/test_spec.py keeps them in
step). The run id is the run name plus a hash of the run's identity: the settings that change results
(models, prompts, extraction, selection, generation, evaluation; see IDENTITY_V1_FIELDS) and the content
digests of its inputs (the drawn prompts' text, each model's weights and tokenizer), resolved once by
`refdir.workers.identity.resolve_inputs` and stored in run.json; `refdir resume` reuses the stored id.
Where the data lives (`store`), how much hardware computes it (`compute`) and resume options such as
`selection.allow_fallback` are not part of it, so a run can move to a cluster and resume.

    spec = resolve_inputs(load_spec("infra/specs/example.toml"))
    spec.run_id  # 'nightly-3f9c2a1b7d'
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class SpecError(ValueError):
    """A spec that cannot run; the message says what, where and how to fix it."""


class _Frozen(BaseModel):
    # strict: no coercion (`true` or "3" where a number is expected is an error, as is 1.5 for an integer);
    # allow_inf_nan=False: `nan` / `inf` in a float field is an error, not a silently NaN-poisoned run.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class ModelSpec(_Frozen):
    """One model of a run."""

    key: str = Field("", description="Short name used in store paths and tables; defaults to the last part of `path`.")
    path: str = Field(..., description="HF hub id or local folder (a folder made by save_pretrained, or holding a GGUF file).")
    revision: str | None = Field(None, description="Pinned hub revision (commit hash or tag); ignored for local folders.")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path` (loaded with transformers' gguf_file=).")
    family: str | None = Field(None, description="Family from `refdir families`; resolved from the config and tokenizer when unset.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype: auto = the family's GPU dtype as in the paper's code (float16 for qwen, yi, llama2; bfloat16 otherwise), float32 on CPU."
    )
    trust_remote_code: bool = Field(False, description="Allow the model's own code (Qwen v1 needs it). Off by default.")
    chat_format: Literal["paper", "tokenizer"] | None = Field(
        None, description="Prompt format: 'paper' = the paper's exact format string (llama2, llama3, gemma, qwen, qwen2, yi), 'tokenizer' = the tokenizer's chat template; unset = 'paper' where the family has one."
    )
    refusal_tokens: list[str] | None = Field(
        None, description="Override the family's refusal token strings (first token of each is scored)."
    )
    refusal_token_ids: list[int] | None = Field(
        None, min_length=1, description="Override the refusal tokens by id (e.g. Yi's [59597], a bare 'I'); wins over refusal_tokens."
    )

    @model_validator(mode="after")
    def _default_key(self) -> "ModelSpec":
        if not self.key:
            object.__setattr__(self, "key", _key_from_path(self.path))
        if not _KEY_RE.match(self.key):
            raise ValueError(f"model key {self.key!r} must match {_KEY_RE.pattern} (it names store folders)")
        return self


def _key_from_path(path: str) -> str:
    name = Path(path.rstrip("/")).name or "model"
    name = re.sub(r"[^A-Za-z0-9._-]", "-", name).strip("-.") or "model"
    return name[:64]


class PromptSpec(_Frozen):
    """Where each split's instructions come from and how many are drawn (the paper's per-run draw)."""

    harmful_train: str = Field("builtin:harmful", description="Source of harmful train prompts: builtin:NAME, file:PATH or hf:DATASET[:split][@revision].")
    harmless_train: str = Field("builtin:harmless", description="Source of harmless train prompts.")
    harmful_val: str = Field("builtin:harmful_val", description="Source of harmful validation prompts (selection).")
    harmless_val: str = Field("builtin:harmless_val", description="Source of harmless validation prompts (selection).")
    harmful_test: str = Field("builtin:harmful_test", description="Source of harmful evaluation prompts (paper: JailbreakBench).")
    harmless_test: str = Field("builtin:harmless_val", description="Source of harmless evaluation prompts; drawn after the others from the same RNG stream.")
    n_train: int = Field(128, ge=1, description="Prompts drawn per label for extraction (paper: 128).")
    n_val: int = Field(32, ge=1, description="Prompts drawn per label for selection (paper: 32).")
    n_test: int = Field(100, ge=1, description="Prompts drawn per label for evaluation (paper: 100).")
    seed: int = Field(42, description="random.seed() before the draw, as in the official code.")
    instruction_column: str = Field("instruction", description="Column holding the instruction in file/hf sources.")
    category_column: str = Field("category", description="Column holding the category (optional in the data).")
    filter_train: bool = Field(True, description="Keep harmful train prompts with refusal score > 0 and harmless < 0.")
    filter_val: bool = Field(True, description="Apply the same filter to the validation prompts.")
    max_prompt_tokens: int = Field(2048, ge=1, description="Longest instruction, in tokens of every model of the run; longer rows are reported by source row and dropped before the draw, never truncated.")


class ExtractionSpec(_Frozen):
    """How activations are cut into jobs and stored (part of the run identity)."""

    prompts_per_job: int = Field(64, ge=1, description="Prompts per extraction job (one Parquet shard each).")
    activation_dtype: Literal["float32", "float16"] = Field("float16", description="Stored activation precision: float16 halves the bytes (means come from float64 sums either way; a shard beyond float16's range is stored as float32); runs made before float16 became the default resume with activation_dtype = \"float32\".")
    candidates_per_job: int = Field(16, ge=1, description="Candidate directions scored per selection job.")


class SelectionSpec(_Frozen):
    """The paper's filters on candidate directions."""

    max_layer_fraction: float = Field(0.8, gt=0, le=1, description="Discard candidates with layer >= int(fraction * n_layers).")
    kl_threshold: float = Field(0.1, ge=0, description="Discard candidates whose ablation KL on harmless val exceeds this.")
    induce_threshold: float = Field(0.0, description="Discard candidates whose induced refusal score is below this.")
    prune_norm: float = Field(1e-6, ge=0, description="Skip candidates with a smaller norm (layer-0 template positions are exactly zero).")
    allow_fallback: bool = Field(False, description="When every candidate is filtered, pick the best bypass anyway and mark the run.")


class GenerationSpec(_Frozen):
    """Greedy generation for evaluation."""

    max_new_tokens: int = Field(512, ge=1, description="New tokens per completion (paper: 512).")
    batch_size: int = Field(32, ge=1, description="Prompts per generation batch on CPU (fixed batches wherever free accelerator memory cannot be read).")
    max_batch_size: int = Field(256, ge=1, description="On a GPU, each generation batch holds as many prompts as free memory allows (KV cache for the batch's longest prompt + max_new_tokens, counted conservatively), up to this and the job's prompts; not part of the run id: batch size changes completions only by floating-point batch effects, as the GPU type does.")


class EvaluationSpec(_Frozen):
    """What is evaluated after selection."""

    judges: list[str] = Field(["substring"], description="Judges: 'substring' always; classifier judges as 'hf-classifier:PATH' or 'llamaguard:PATH' (Llama Guard judges harmful test prompts only, as in the paper).")
    prompts_per_job: int = Field(100, ge=1, description="Prompts per evaluation job: 100 = one job per (test set, intervention) at the paper's 100 test prompts, one generation batch where GPU memory allows; lower it when a model has more actors than evaluation jobs (8 at the default n_test); runs made before 100 became the default resume with prompts_per_job = 50.")
    ce_pile_source: str = Field("builtin:pile_like", description="Plain-text documents for ce_pile: builtin:pile_like (short texts refdir wrote, NOT the Pile), file:PATH or hf:DATASET (paper: hf:monology/pile-uncopyrighted).")
    ce_alpaca_source: str = Field("builtin:alpaca_like", description="Instruction/output pairs for ce_alpaca: builtin:alpaca_like (pairs refdir wrote, NOT Alpaca), file:PATH or hf:DATASET (paper: hf:tatsu-lab/alpaca).")
    ce_n: int = Field(64, ge=1, description="Documents and pairs used per CE metric (paper: 256 batches of 16).")
    ce_max_tokens: int = Field(256, ge=2, description="Pile documents are cut to this many tokens (paper: 256).")


class StoreSpec(_Frozen):
    """Where everything is written."""

    uri: str = Field("refdir-store", description="Local folder, file:// or s3://bucket/prefix (REFDIR_STORE and --store override).")
    endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, ...); else AWS_ENDPOINT_URL.")
    key: str | None = Field(None, description="S3 access key id; else AWS_ACCESS_KEY_ID.")
    secret: SecretStr | None = Field(None, description="S3 secret; else AWS_SECRET_ACCESS_KEY. Never logged.")


class ComputeSpec(_Frozen):
    """Hardware: not part of the run identity."""

    ray_address: str | None = Field(None, description="Existing Ray cluster (ray://host:10001 or host:6379); else RAY_ADDRESS, else a local cluster.")
    num_workers: int | None = Field(None, ge=1, description="Model actors per model; default = GPUs / gpus_per_worker, or 1 on CPU.")
    gpus_per_worker: float = Field(1.0, ge=0, description="GPUs per actor when the cluster has GPUs (a k-GPU group for big models).")
    gpus_per_model: dict[str, float] = Field({}, description="Per-model override of gpus_per_worker by model key, e.g. a 70B model's actors sharded over 4 GPUs.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per actor.")
    batch_size: int = Field(32, ge=1, description="Prompts per forward pass in extraction and scoring.")
    max_retries: int = Field(2, ge=0, description="Retries of a job after an infrastructure failure (actor died, node lost).")
    concurrent_models: int = Field(1, ge=1, description="Models run at once (their sub-flows in parallel), each with its share of the cluster's GPUs; 1 = one after another.")
    extract_concurrency: int = Field(3, ge=1, description="Extraction jobs a GPU actor runs at once, so host-side Parquet encoding overlaps the next forward pass; CPU actors run one.")
    actor_start_timeout: float = Field(600.0, gt=0, description="Seconds an actor may take to be scheduled and load its model before the stage fails with a line saying so.")
    store_outage_seconds: float = Field(60.0, gt=0, description="Seconds a stage keeps retrying (with backoff, holding new jobs) while the store fails, before it stops with one line.")


class OptimizeSpec(_Frozen):
    """Optimised abliteration (opt-in): a seeded multi-objective TPE search over weighted orthogonalisations,
    after selection, one trial per model actor at a time. Bounds of positions and widths are fractions of the
    last layer index; each range must hold the paper's setting (weight 1 everywhere), which is trial 0.
    Not part of the run id: the stage's markers record the digest of these settings instead."""

    enabled: bool = Field(False, description="Run the optimize stage after select (trials in `trials`, the chosen one evaluated as intervention 'optimized').")
    trials: int = Field(64, ge=2, description="Trials in the study, trial 0 (the paper's direction, weight 1 everywhere) included.")
    parallel: int | None = Field(None, ge=1, description="Trials in flight at once; default = one per model actor.")
    seed: int = Field(0, description="Seed of the TPE sampler; a resumed study is rebuilt from it and its finished trials.")
    objectives: list[Literal["refusals", "kl", "refusal_score"]] = Field(["refusals", "kl"], min_length=2, description="What the study minimises: refusals (harmful val, substring judge), kl (first-token KL on harmless val), refusal_score (mean, harmful val).")
    max_new_tokens: int = Field(64, ge=1, description="New tokens per harmful val prompt for the refusal count (long enough that a refusal after a compliant opening is seen).")
    max_refusal_rate: float = Field(0.05, ge=0, le=1, description="Chosen trial: lowest KL among trials whose harmful val refusal rate is at most this, else the knee of the Pareto front.")
    direction_kinds: list[Literal["raw", "projected"]] = Field(["raw", "projected"], min_length=1, description="Direction variants: raw diff-in-means, projected = orthogonalised against the mean harmless activation at its layer.")
    direction_layers: list[float] = Field([0.0, 1.0], min_length=2, max_length=2, description="Bounds of the fractional direction layer (interpolating adjacent candidates at the selected position), as fractions of the last layer; clipped to scored candidates.")
    embed_weight: list[float] = Field([0.0, 1.0], min_length=2, max_length=2, description="Bounds of the embedding's ablation weight (the paper: 1).")
    max_weight: list[float] = Field([0.5, 1.5], min_length=2, max_length=2, description="Bounds of each component's peak weight (attention-out, MLP-down).")
    max_weight_position: list[float] = Field([0.0, 1.0], min_length=2, max_length=2, description="Bounds of the peak's layer, as fractions of the last layer.")
    min_weight: list[float] = Field([0.0, 1.0], min_length=2, max_length=2, description="Bounds of the floor weight, as a fraction of the peak weight.")
    min_weight_distance: list[float] = Field([0.1, 1.0], min_length=2, max_length=2, description="Bounds of the kernel's half-width (layers beyond it get weight 0), as fractions of the last layer.")

    @model_validator(mode="after")
    def _paper_inside(self) -> "OptimizeSpec":
        for name, paper in (("direction_layers", None), ("embed_weight", 1.0), ("max_weight", 1.0),
                            ("max_weight_position", None), ("min_weight", 1.0), ("min_weight_distance", 1.0)):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"optimize.{name} = [{lo}, {hi}] must be [low, high] with 0 <= low <= high")
            if paper is not None and not lo <= paper <= hi:
                raise ValueError(f"optimize.{name} = [{lo}, {hi}] must hold {paper}: trial 0 is the paper's setting "
                                 "(weight 1 at every layer) and must lie in the search space")
        if "raw" not in self.direction_kinds:
            raise ValueError("optimize.direction_kinds must hold 'raw': trial 0 is the paper's raw direction")
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"optimize.objectives {self.objectives} names an objective twice")
        return self


class RunSpec(_Frozen):
    """A whole run: models x prompts x method settings -> one run id."""

    name: str = Field(..., description="Run name; the run id is this plus a hash of the spec.")
    models: list[ModelSpec] = Field(..., min_length=1, description="Models of the run; each becomes one Prefect sub-flow.")
    prompts: PromptSpec = Field(PromptSpec(), description="Prompt sources and draw sizes.")
    extraction: ExtractionSpec = Field(ExtractionSpec(), description="Job sizes and activation storage.")
    selection: SelectionSpec = Field(SelectionSpec(), description="Direction selection filters.")
    generation: GenerationSpec = Field(GenerationSpec(), description="Greedy generation settings.")
    evaluation: EvaluationSpec = Field(EvaluationSpec(), description="Evaluation settings.")
    store: StoreSpec = Field(StoreSpec(), description="Store location and credentials.")
    compute: ComputeSpec = Field(ComputeSpec(), description="Ray cluster and worker sizes.")
    optimize: OptimizeSpec = Field(OptimizeSpec(), description="Optimised abliteration search after selection (opt-in).")

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        # {date} / {time} / {datetime} are filled in when a scheduled run starts (flows/schedule.py)
        filled = v.replace("{datetime}", "2000-01-01T0000").replace("{date}", "2000-01-01").replace("{time}", "0000")
        if not _KEY_RE.match(filled):
            raise ValueError(f"run name {v!r} must match {_KEY_RE.pattern} (placeholders: {{date}}, {{time}}, "
                             "{datetime})")
        return v

    @model_validator(mode="after")
    def _unique_keys(self) -> "RunSpec":
        keys = [m.key for m in self.models]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"duplicate model keys {dup}: give each model a distinct `key`")
        return self

    # run identity: settings + content digests of the inputs, stored once in run.json (see module doc)
    _inputs: dict | None = PrivateAttr(None)
    _stored_id: str | None = PrivateAttr(None)

    def settings(self) -> dict:
        """The settings that change results (hashed into the run id with the inputs' content digests)."""
        return settings_identity(self)

    @property
    def inputs(self) -> dict:
        """Content digests of the run's inputs: {"prompts": ..., "models": {key: ...}} (see with_inputs)."""
        if self._inputs is None:
            raise SpecError(f"run {self.name!r}: its inputs (prompt texts, model weights) are not resolved yet; "
                            "resolve them first (refdir.workers.identity.resolve_inputs)")
        return self._inputs

    def with_inputs(self, inputs: dict, run_id: str | None = None) -> "RunSpec":
        """A copy that knows its inputs' digests and so its run id; `run_id` pins a stored id (resume)."""
        out = self.model_copy()
        out._inputs, out._stored_id = inputs, run_id
        return out

    @property
    def is_resolved(self) -> bool:
        return self._inputs is not None

    def model_copy(self, *, update: dict | None = None, deep: bool = False) -> "RunSpec":
        """A copy; an `update` beyond store/compute makes the copy forget its resolved inputs and stored id
        (they may no longer hold)."""
        out = super().model_copy(update=update, deep=deep)
        if update and set(update) - {"store", "compute"}:
            out._inputs, out._stored_id = None, None
        return out

    def identity(self) -> dict:
        """What the run id hashes: the identity version, the settings and the inputs' content digests."""
        return {"version": IDENTITY_VERSION, "settings": self.settings(), "inputs": self.inputs}

    @property
    def spec_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    @property
    def run_id(self) -> str:
        """name-<hash of identity()>, or the id stored in run.json for a resumed run (never recomputed)."""
        return self._stored_id or f"{self.name}-{self.spec_hash}"

    def model(self, key: str) -> ModelSpec:
        for m in self.models:
            if m.key == key:
                return m
        raise SpecError(f"run {self.name!r} has no model {key!r}; models: {[m.key for m in self.models]}")


# ---------------------------------------------------------------- run identity
#
# Version 1 hashes, per class, the fields listed here at whatever value they have. A field added to the spec
# later is hashed only when its value differs from its default, so adding a field with a default keeps every
# existing run id; changing a listed field's default changes the ids, as it should. Not hashed at all: where the
# data lives (store), the hardware (compute), selection policy flags that are resume options of the same run
# (allow_fallback: resuming with it redoes selection and what follows), generation.max_batch_size (GPU batches
# grow from free memory: a hardware matter, changing completions only by floating-point batch effects, and a run
# that runs out of memory resumes with a lower one), the optimize search (its trial markers
# and manifest record the digest of its settings: adding or changing [optimize] reruns the search only),
# and where the prompts and the model
# were found: the drawn prompts' text and the model's content digest (RunSpec.inputs) are hashed instead.
IDENTITY_VERSION = 1
IDENTITY_V1_FIELDS: dict[str, tuple[str, ...]] = {
    "RunSpec": ("name", "models", "prompts", "extraction", "selection", "generation", "evaluation"),
    "ModelSpec": ("key", "gguf_file", "family", "dtype", "trust_remote_code", "refusal_tokens"),
    "PromptSpec": ("n_train", "n_val", "n_test", "seed", "filter_train", "filter_val"),
    "ExtractionSpec": ("prompts_per_job", "activation_dtype", "candidates_per_job"),
    "SelectionSpec": ("max_layer_fraction", "kl_threshold", "induce_threshold", "prune_norm"),
    "GenerationSpec": ("max_new_tokens", "batch_size"),
    "EvaluationSpec": ("judges", "prompts_per_job", "ce_pile_source", "ce_alpaca_source", "ce_n", "ce_max_tokens"),
}
NOT_IDENTITY = frozenset({
    "store", "compute", "optimize", "selection.allow_fallback", "generation.max_batch_size", "models.path",
    "models.revision",
    "prompts.harmful_train", "prompts.harmless_train", "prompts.harmful_val", "prompts.harmless_val",
    "prompts.harmful_test", "prompts.harmless_test", "prompts.instruction_column", "prompts.category_column",
})


def settings_identity(model: BaseModel, where: str = "", v1: dict[str, tuple[str, ...]] = IDENTITY_V1_FIELDS) -> dict:
    """The identity part of a spec (sub-)model as plain JSON values (see the rules above)."""
    out = {}
    listed = v1.get(type(model).__name__, ())
    for name, info in type(model).model_fields.items():
        path = f"{where}{name}"
        if path in NOT_IDENTITY:
            continue
        value = getattr(model, name)
        if name not in listed and value == info.get_default(call_default_factory=True):
            continue
        out[name] = _identity_value(value, f"{path}.", v1)
    return out


def _identity_value(value, where: str, v1: dict):
    if isinstance(value, BaseModel):
        return settings_identity(value, where, v1)
    if isinstance(value, (list, tuple)):
        return [_identity_value(v, where, v1) for v in value]
    if isinstance(value, dict):
        return {k: _identity_value(v, where, v1) for k, v in value.items()}
    return value


def parse_spec(data: dict, source: str = "<spec>") -> RunSpec:
    """Validate a spec dict, turning pydantic's errors into one SpecError naming each bad field."""
    try:
        return RunSpec.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key (check the spelling against infra/specs/example.toml)" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {where}: {msg}")
        raise SpecError(f"{source}: invalid spec\n" + "\n".join(lines)) from None


def load_spec(path: str | Path) -> RunSpec:
    """Read a TOML spec file."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file {str(p)!r} not found")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{p}: not valid TOML: {e}") from None
    return parse_spec(data, str(p))
