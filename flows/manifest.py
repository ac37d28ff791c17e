"""Stage manifests: one JSON per (model, stage), written last by its stage, and the chain of input digests.

    m = read(store, run_id, "organism", "select")         # None when absent or unreadable (one warning line)
    d = stage_input(spec, "organism", "select", read(store, run_id, "organism", "aggregate"))
    write(store, run_id, "organism", "select", planned=8, done=8, input_digest=d, files={rel: sha256})
    chain(store, spec, "organism")                         # {stage: done for the inputs planned now?}

Each manifest records its stage's status, planned and done jobs, the digest of what the stage was computed
from (the extract stage: the model's and the prompts' content digests and the extraction settings; a later
stage: the previous stage's commit id and the settings it uses), a fresh commit id, and {path: sha256} of the
stage-level files it wrote (job shards are vouched for by their own markers). A stage is done only when its
manifest says done for the input digest planned now, so a recomputed stage (a new commit) makes every later
stage, and every later job that read it, recompute: what was derived from it, and nothing else.
"""

from __future__ import annotations

from datetime import datetime, timezone

from refdir.schemas import layout
from refdir.schemas.spec import RunSpec
from refdir.workers.identity import digest_json

STAGES = layout.STAGES


def read(store, run_id: str, key: str, stage: str) -> dict | None:
    """The stage's manifest, or None (absent, or unreadable: Store.marker logs one line naming it)."""
    return store.marker(layout.stage_manifest(run_id, key, stage))


def write(store, run_id: str, key: str, stage: str, *, planned: int, done: int, input_digest: str,
          files: dict[str, str] | None = None, outputs: str | None = None, **extra) -> dict:
    """Write the stage's manifest (last, after every file it names); returns it. `outputs` defaults to the
    digest of `files`."""
    files = files or {}
    m = {"model": key, "stage": stage, "status": "done" if done == planned else "partial", "planned": planned,
         "done": done, "input_digest": input_digest, "outputs": outputs or digest_json(files), "files": files,
         "finished_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **extra}
    store.write_marker(layout.stage_manifest(run_id, key, stage), **m)
    return m


def outputs_of(m: dict | None) -> str | None:
    return m.get("outputs") if m else None


def is_done(m: dict | None, input_digest: str) -> bool:
    return bool(m) and m.get("status") == "done" and m.get("input_digest") == input_digest


def stage_input(spec: RunSpec, key: str, stage: str, previous: dict | None) -> str:
    """The digest of everything `stage` of model `key` is computed from (see the module doc)."""
    settings = spec.settings()
    if stage == "extract":
        model = next(m for m in settings["models"] if m["key"] == key)
        parts = {"model": spec.inputs["models"][key], "prompts": spec.inputs["prompts"], "model_settings": model,
                 "prompt_settings": settings["prompts"], "extraction": settings["extraction"]}
    else:
        parts = {"previous": outputs_of(previous)}
        if stage == "aggregate":
            parts["prune_norm"] = spec.selection.prune_norm
        elif stage == "select":
            parts.update(selection=settings["selection"], allow_fallback=spec.selection.allow_fallback,
                         candidates_per_job=spec.extraction.candidates_per_job)
        else:
            parts.update(generation=settings["generation"], evaluation=settings["evaluation"])
    return digest_json({"stage": stage, **parts})


def chain(store, spec: RunSpec, key: str) -> dict[str, tuple[dict | None, bool]]:
    """{stage: (manifest, done for the inputs planned now)} in stage order."""
    out, previous = {}, None
    for stage in STAGES:
        m = read(store, spec.run_id, key, stage)
        out[stage] = (m, is_done(m, stage_input(spec, key, stage, previous)))
        previous = m
    return out


def model_manifest(store, run_id: str, key: str) -> dict:
    """{"model": key, "stages": {stage: manifest}} of the stages that have one (for status and the report)."""
    stages = {}
    for stage in STAGES:
        m = read(store, run_id, key, stage)
        if m is not None:
            stages[stage] = m
    return {"model": key, "stages": stages}


def write_files(store, rel: str, files: dict[str, str], **extra) -> None:
    """A manifest that only vouches for files (the model row, the report)."""
    store.write_marker(rel, files=files, **extra)
