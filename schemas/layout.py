"""Store layout: every path refdir writes, relative to the store root.

One root (a local folder, file:// or s3://bucket/prefix) holds all runs. Data objects are written
first, then a done-marker (JSON: rows, sha256), then the stage manifest last; each records the sha256
of what it vouches for and the digest of the inputs it was made from. Readers list markers, never data
files, so a shard without a marker does not exist. Every path refdir uses is built here and nowhere else.

    runs/{run_id}/run.json
    runs/{run_id}/{model}/activations/split={split}/label={label}/part-{job:05d}.parquet
    runs/{run_id}/{model}/activations/_done/{split}-{label}-{job:05d}.json
    runs/{run_id}/{model}/sums/part-{split}-{label}-{job:05d}.parquet
    runs/{run_id}/{model}/prompts/part-{split}-{label}-{job:05d}.parquet
    runs/{run_id}/{model}/means.parquet, candidates.parquet
    runs/{run_id}/{model}/scores/part-{job:05d}.parquet (+ _done/)   per-job score shards
    runs/{run_id}/{model}/scores.parquet                     all candidates + drop reasons (selection)
    runs/{run_id}/{model}/direction.safetensors, direction.json, directions.parquet
    runs/{run_id}/{model}/completions/{dataset}/{intervention}/part-{job:05d}.parquet (+ _done/)
    runs/{run_id}/{model}/evals/{dataset}-{intervention}.parquet
    runs/{run_id}/{model}/trials/part-{trial:05d}.parquet (+ _done/), trials.parquet   optimize trials (opt-in)
    runs/{run_id}/{model}/model.parquet                     the model's row of `runs`
    runs/{run_id}/{model}/_manifest/{stage}.json            one per stage, written last by that stage
    runs/{run_id}/{model}/_manifest/model.json              vouches for model.parquet
    runs/{run_id}/{model}/_heartbeat.json                  stage running now (refreshed), or how the model failed
    runs/{run_id}/{model}/error.log                       full traceback of the model's last failure
    runs/{run_id}/report.html, _manifest/report.json
    models/organism-seed{seed}/   the refusal model organism built by `refdir organism`/`refdir demo`
    models/{base}-organism-{recipe_hash}/   the organism fine-tuned from a real LM (`refdir organism --base smollm2`)
"""

from __future__ import annotations

STAGES = ("extract", "aggregate", "select", "evaluate")   # the one stage order
SPLITS = ("train", "val", "test")                           # the one list of the draw's splits
EXTRACT_SPLITS = SPLITS[:2]                                 # splits with activations (test is only evaluated)
LABELS = ("harmful", "harmless")


def run_dir(run_id: str) -> str:
    return f"runs/{run_id}"


def run_json(run_id: str) -> str:
    return f"{run_dir(run_id)}/run.json"


def report_html(run_id: str) -> str:
    return f"{run_dir(run_id)}/report.html"


def model_dir(run_id: str, model: str) -> str:
    return f"{run_dir(run_id)}/{model}"


def model_row(run_id: str, model: str) -> str:
    """The model's row of the `runs` table (family, sizes, eoi tokens)."""
    return f"{model_dir(run_id, model)}/model.parquet"


def manifest_dir(run_id: str, model: str) -> str:
    return f"{model_dir(run_id, model)}/_manifest"


def stage_manifest(run_id: str, model: str, stage: str) -> str:
    """The stage's manifest: status, planned/done, input and outputs digests, {file: sha256} of its own files."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
    return f"{manifest_dir(run_id, model)}/{stage}.json"


def model_row_manifest(run_id: str, model: str) -> str:
    return f"{manifest_dir(run_id, model)}/model.json"


def report_manifest(run_id: str) -> str:
    return f"{run_dir(run_id)}/_manifest/report.json"


def model_manifest_glob(run_id: str) -> str:
    """Stage manifests of every model of a run (the model key is the third path part)."""
    return f"{run_dir(run_id)}/*/_manifest/*.json"


def heartbeat(run_id: str, model: str) -> str:
    """{state: running|finished|failed, stage, updated_at, ...}: rewritten while a stage runs."""
    return f"{model_dir(run_id, model)}/_heartbeat.json"


def error_log(run_id: str, model: str) -> str:
    return f"{model_dir(run_id, model)}/error.log"


def activation_shard(run_id: str, model: str, split: str, label: str, job: int) -> str:
    return f"{model_dir(run_id, model)}/activations/split={split}/label={label}/part-{job:05d}.parquet"


def activation_marker(run_id: str, model: str, split: str, label: str, job: int) -> str:
    return f"{activation_markers_dir(run_id, model)}/{split}-{label}-{job:05d}.json"


def activation_markers_dir(run_id: str, model: str) -> str:
    return f"{model_dir(run_id, model)}/activations/_done"


def sums_shard(run_id: str, model: str, split: str, label: str, job: int) -> str:
    return f"{model_dir(run_id, model)}/sums/part-{split}-{label}-{job:05d}.parquet"


def prompts_shard(run_id: str, model: str, split: str, label: str, job: int) -> str:
    """Per-prompt baseline refusal score and kept flag, written by the extraction job beside its shard."""
    return f"{model_dir(run_id, model)}/prompts/part-{split}-{label}-{job:05d}.parquet"


def means_table(run_id: str, model: str) -> str:
    return f"{model_dir(run_id, model)}/means.parquet"


def candidates_table(run_id: str, model: str) -> str:
    return f"{model_dir(run_id, model)}/candidates.parquet"


def score_shard(run_id: str, model: str, job: int) -> str:
    return f"{model_dir(run_id, model)}/scores/part-{job:05d}.parquet"


def score_marker(run_id: str, model: str, job: int) -> str:
    return f"{score_markers_dir(run_id, model)}/{job:05d}.json"


def score_markers_dir(run_id: str, model: str) -> str:
    return f"{model_dir(run_id, model)}/scores/_done"


def scores_table(run_id: str, model: str) -> str:
    """Every scored candidate with its drop reason (null = survived), written by selection."""
    return f"{model_dir(run_id, model)}/scores.parquet"


def direction_tensors(run_id: str, model: str) -> str:
    return f"{model_dir(run_id, model)}/direction.safetensors"


def direction_json(run_id: str, model: str) -> str:
    return f"{model_dir(run_id, model)}/direction.json"


def directions_table(run_id: str, model: str) -> str:
    return f"{model_dir(run_id, model)}/directions.parquet"


def completion_shard(run_id: str, model: str, dataset: str, intervention: str, job: int) -> str:
    return f"{model_dir(run_id, model)}/completions/{dataset}/{intervention}/part-{job:05d}.parquet"


def completion_marker(run_id: str, model: str, dataset: str, intervention: str, job: int) -> str:
    return f"{completion_markers_dir(run_id, model)}/{dataset}-{intervention}-{job:05d}.json"


def completion_markers_dir(run_id: str, model: str) -> str:
    return f"{model_dir(run_id, model)}/completions/_done"


def evals_dir(run_id: str, model: str) -> str:
    return f"{model_dir(run_id, model)}/evals"


def evals_glob(run_id: str, model: str) -> str:
    return f"{evals_dir(run_id, model)}/*.parquet"


def completion_shards_glob(run_id: str, model: str) -> str:
    return f"{model_dir(run_id, model)}/completions/*/*/part-*.parquet"


def job_markers_dir(run_id: str, model: str, stage: str) -> str | None:
    """The folder of a stage's job markers; None for aggregate, which has no jobs."""
    folders = {"extract": activation_markers_dir, "select": score_markers_dir, "evaluate": completion_markers_dir}
    return folders[stage](run_id, model) if stage in folders else None


def evals_table(run_id: str, model: str, dataset: str, intervention: str) -> str:
    return f"{evals_dir(run_id, model)}/{dataset}-{intervention}.parquet"


def trial_shard(run_id: str, model: str, trial: int) -> str:
    """One optimize trial: its parameters, objective values, judge detail and actor (flows/optimize.py)."""
    return f"{model_dir(run_id, model)}/trials/part-{trial:05d}.parquet"


def trial_marker(run_id: str, model: str, trial: int) -> str:
    return f"{trial_markers_dir(run_id, model)}/{trial:05d}.json"


def trial_markers_dir(run_id: str, model: str) -> str:
    return f"{model_dir(run_id, model)}/trials/_done"


def trials_table(run_id: str, model: str) -> str:
    """Every finished trial of the model's study with its Pareto and chosen flags (written when it completes)."""
    return f"{model_dir(run_id, model)}/trials.parquet"


def optimize_manifest(run_id: str, model: str) -> str:
    """The optimize stage's manifest (opt-in, so not one of STAGES): status, trials, chosen trial, files."""
    return f"{manifest_dir(run_id, model)}/optimize.json"


def organism_dir(seed: int) -> str:
    return f"models/organism-seed{seed}"


def lm_organism_dir(base: str, recipe_hash: str) -> str:
    """A refusal organism fine-tuned from a real chat LM (workers/organism_lm.py), named by its recipe's hash."""
    return f"models/{base}-organism-{recipe_hash}"


# Globs over the whole store, used for DuckDB views (data files; views keep only marked shards).
VIEW_GLOBS = {
    "activations": "runs/*/*/activations/split=*/label=*/part-*.parquet",
    "sums": "runs/*/*/sums/part-*.parquet",
    "prompts": "runs/*/*/prompts/part-*.parquet",
    "means": "runs/*/*/means.parquet",
    "candidates": "runs/*/*/candidates.parquet",
    "scores": "runs/*/*/scores.parquet",
    "directions": "runs/*/*/directions.parquet",
    "completions": "runs/*/*/completions/*/*/part-*.parquet",
    "evals": "runs/*/*/evals/*.parquet",
    "runs": "runs/*/*/model.parquet",
    "trials": "runs/*/*/trials.parquet",
}
