"""Arrow schemas of every stored table, and the metadata every Parquet file carries.

Column names are a public contract (users and scripts query them through `refdir sql`). Every file
carries `refdir.schema_version`, `refdir.table` and `refdir.run_id` in its key-value metadata;
`check_metadata` rejects files written by an unknown schema version with a message that names the
version this code needs.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
META_VERSION = b"refdir.schema_version"
META_TABLE = b"refdir.table"
META_RUN = b"refdir.run_id"


class SchemaVersionError(ValueError):
    """A stored file whose schema version this code cannot read."""


def _vector(d: int | None, dtype: pa.DataType) -> pa.DataType:
    return pa.list_(dtype, d) if d else pa.list_(dtype)


def _key_fields() -> list[pa.Field]:
    return [pa.field("run_id", pa.string(), False), pa.field("model", pa.string(), False)]


def runs_schema() -> pa.Schema:
    return pa.schema(_key_fields() + [
        pa.field("model_path", pa.string()),
        pa.field("family", pa.string()),
        pa.field("n_layers", pa.int32()),
        pa.field("d_model", pa.int32()),
        pa.field("eoi_tokens", pa.list_(pa.string())),
        pa.field("refusal_token_ids", pa.list_(pa.int64())),
        pa.field("spec_hash", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ])


def activations_schema(d: int, dtype: str = "float32") -> pa.Schema:
    """One row per (prompt, layer, position); rows sorted layer-major inside a shard."""
    t = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(_key_fields() + [
        pa.field("split", pa.string()),
        pa.field("label", pa.string()),
        pa.field("prompt_id", pa.int64()),
        pa.field("category", pa.string()),
        pa.field("position", pa.int16()),   # negative offset from the end: -n_eoi .. -1
        pa.field("layer", pa.int16()),      # block index; resid_pre of that block
        pa.field("vector", _vector(d, t)),
    ])


def sums_schema(d: int | None = None) -> pa.Schema:
    """Per-shard float64 sums and counts per (label, position, layer): the exact, cheap path to means."""
    return pa.schema(_key_fields() + [
        pa.field("split", pa.string()),
        pa.field("label", pa.string()),
        pa.field("position", pa.int16()),
        pa.field("layer", pa.int16()),
        pa.field("sum", _vector(d, pa.float64())),
        pa.field("n", pa.int64()),
    ])


def prompts_schema() -> pa.Schema:
    return pa.schema(_key_fields() + [
        pa.field("split", pa.string()),
        pa.field("label", pa.string()),
        pa.field("prompt_id", pa.int64()),
        pa.field("instruction", pa.string()),
        pa.field("category", pa.string()),
        pa.field("refusal_score", pa.float64()),
        pa.field("kept", pa.bool_()),
    ])


def means_schema(d: int | None = None) -> pa.Schema:
    return pa.schema(_key_fields() + [
        pa.field("split", pa.string()),
        pa.field("label", pa.string()),
        pa.field("position", pa.int16()),
        pa.field("layer", pa.int16()),
        pa.field("vector", _vector(d, pa.float64())),
        pa.field("n", pa.int64()),
    ])


def candidates_schema(d: int | None = None) -> pa.Schema:
    return pa.schema(_key_fields() + [
        pa.field("position", pa.int16()),
        pa.field("layer", pa.int16()),
        pa.field("vector", _vector(d, pa.float64())),   # mean harmful - mean harmless
        pa.field("norm", pa.float64()),
        pa.field("skipped", pa.bool_()),               # norm below prune_norm: not scored
    ])


def scores_schema() -> pa.Schema:
    return pa.schema(_key_fields() + [
        pa.field("position", pa.int16()),
        pa.field("layer", pa.int16()),
        pa.field("bypass_score", pa.float64()),   # mean refusal score, harmful val, ablation
        pa.field("induce_score", pa.float64()),   # mean refusal score, harmless val, actadd
        pa.field("kl_score", pa.float64()),       # mean KL(baseline || ablation), harmless val
        pa.field("drop_reason", pa.string()),     # null = passed every filter (filled by selection)
    ])


def directions_schema() -> pa.Schema:
    return pa.schema(_key_fields() + [
        pa.field("position", pa.int16()),
        pa.field("layer", pa.int16()),
        pa.field("bypass_score", pa.float64()),
        pa.field("induce_score", pa.float64()),
        pa.field("kl_score", pa.float64()),
        pa.field("norm", pa.float64()),
        pa.field("fallback", pa.bool_()),
        pa.field("vector", pa.list_(pa.float64())),
    ])


def completions_schema() -> pa.Schema:
    return pa.schema(_key_fields() + [
        pa.field("dataset", pa.string()),
        pa.field("intervention", pa.string()),
        pa.field("prompt_id", pa.int64()),
        pa.field("category", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("response", pa.string()),
        pa.field("refusal_score", pa.float64()),  # log-odds of the refusal tokens at the last prompt position
        pa.field("judge", pa.string()),
        pa.field("refused", pa.bool_()),          # refusal judges (substring, hf-classifier); null for jailbreak judges
        pa.field("jailbroken", pa.bool_()),       # jailbreak judges (llamaguard: unsafe and >= 15 words); else null
        pa.field("judge_detail", pa.string()),
    ])


def evals_schema() -> pa.Schema:
    return pa.schema(_key_fields() + [
        pa.field("dataset", pa.string()),
        pa.field("intervention", pa.string()),
        pa.field("judge", pa.string()),
        pa.field("metric", pa.string()),
        pa.field("value", pa.float64()),
        pa.field("n", pa.int64()),
        pa.field("ci_low", pa.float64()),         # Wilson 95 % interval of a rate; null for other metrics
        pa.field("ci_high", pa.float64()),
    ])


def trials_schema() -> pa.Schema:
    """One row per optimize trial (flows/optimize.py); pareto/chosen are filled when the study completes."""
    return pa.schema(_key_fields() + [
        pa.field("trial", pa.int32()),
        pa.field("params", pa.string()),            # JSON: the sampled parameters, as the study saw them
        pa.field("direction_kind", pa.string()),    # raw | projected
        pa.field("direction_layer", pa.float64()),  # fractional: interpolates adjacent layers' candidates
        pa.field("position", pa.int16()),
        pa.field("embed_weight", pa.float64()),
        pa.field("attn_weights", pa.list_(pa.float64())),   # per layer, attention-out
        pa.field("mlp_weights", pa.list_(pa.float64())),    # per layer, MLP-down
        pa.field("refusals", pa.int32()),           # harmful val completions the substring judge calls refusals
        pa.field("n", pa.int32()),
        pa.field("refusal_score", pa.float64()),    # mean refusal score, harmful val
        pa.field("kl", pa.float64()),               # mean first-token KL(baseline || trial), harmless val
        pa.field("n_kl", pa.int32()),
        pa.field("judge_detail", pa.string()),      # JSON: {judge: positive verdicts} and refused prompt ids
        pa.field("actor", pa.string()),
        pa.field("seconds", pa.float64()),
        pa.field("pareto", pa.bool_()),
        pa.field("chosen", pa.bool_()),
    ])


TABLES = {
    "runs": runs_schema,
    "activations": activations_schema,
    "sums": sums_schema,
    "prompts": prompts_schema,
    "means": means_schema,
    "candidates": candidates_schema,
    "scores": scores_schema,
    "directions": directions_schema,
    "completions": completions_schema,
    "evals": evals_schema,
    "trials": trials_schema,
}


def with_metadata(schema: pa.Schema, table: str, run_id: str) -> pa.Schema:
    """Attach the refdir key-value metadata to a schema."""
    meta = dict(schema.metadata or {})
    meta.update({META_VERSION: str(SCHEMA_VERSION).encode(), META_TABLE: table.encode(), META_RUN: run_id.encode()})
    return schema.with_metadata(meta)


def check_metadata(schema: pa.Schema, where: str) -> None:
    """Raise SchemaVersionError unless `schema` was written by this schema version."""
    meta = schema.metadata or {}
    got = meta.get(META_VERSION)
    if got is None:
        raise SchemaVersionError(f"{where}: no {META_VERSION.decode()} in the Parquet metadata; not a refdir file")
    if got.decode() != str(SCHEMA_VERSION):
        raise SchemaVersionError(
            f"{where}: written with refdir schema version {got.decode()}, this refdir reads version {SCHEMA_VERSION}; "
            f"use a refdir release that reads version {got.decode()} or recompute the run"
        )
