"""Content digests of a run's inputs: the drawn prompts' text and each model's weights and tokenizer.

    spec = resolve_inputs(spec)            # a copy of the spec that knows its inputs, hence its run id
    spec.inputs  # {"prompts": "sha256:…", "models": {"organism": "sha256:…"}}
    model_digest(ModelSpec(path="Qwen/Qwen2.5-7B-Instruct"))   # 'hub:Qwen/Qwen2.5-7B-Instruct@<commit>'

A local model folder is identified by the sha256 of its files (names and contents: weights, config, tokenizer,
chat template; dot-files and, with `gguf_file`, the other GGUF files are left out), a hub id by the commit its
revision resolves to. File digests are cached per machine by (absolute path, size, mtime) in
`$REFDIR_CACHE/file-digests.json` (default `~/.cache/refdir`), so a rerun does not read the weights again;
a file rewritten in place gets a new mtime and is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

from refdir.schemas.spec import ModelSpec, RunSpec

logger = logging.getLogger(__name__)

_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_CHUNK = 1 << 22


def digest_json(obj) -> str:
    """sha256 of an object's canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def prompts_digest(draw) -> str:
    """The drawn prompts, per split and label, by (prompt id, text, category) in draw order."""
    lists = {f"{label}_{split}": [(p.prompt_id, p.instruction, p.category) for p in draw.split(split, label)]
             for split in ("train", "val", "test") for label in ("harmful", "harmless")}
    return "sha256:" + digest_json(lists)


# ---------------------------------------------------------------- file digests, cached by (path, size, mtime)

def _cache_path() -> Path:
    root = os.environ.get("REFDIR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "refdir")
    return Path(root) / "file-digests.json"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".digests-", suffix=".part")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, path)
    except OSError as e:   # a cache that cannot be written only costs time
        logger.debug("digest cache not written (%s)", e)


def file_sha256(path: Path, cache: dict) -> str:
    st = path.stat()
    key = str(path.resolve())
    hit = cache.get(key)
    if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
        return hit[2]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    cache[key] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
    return cache[key][2]


def _model_files(folder: Path, gguf_file: str | None) -> list[Path]:
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if gguf_file and p.suffix == ".gguf" and rel.as_posix() != gguf_file:
            continue
        out.append(p)
    return out


def folder_digest(folder: Path, gguf_file: str | None = None) -> str:
    """sha256 over (relative path, sha256) of every file the model may load."""
    cache = _load_cache()
    before = dict(cache)
    listing = [(p.relative_to(folder).as_posix(), file_sha256(p, cache)) for p in _model_files(folder, gguf_file)]
    if cache != before:
        _save_cache(cache)
    return "sha256:" + digest_json(listing)


# ---------------------------------------------------------------- models and runs

def _hub_commit(model: ModelSpec) -> str:
    """The commit a hub id's revision resolves to: the local cache first, the hub when online."""
    if model.revision and _HEX40.match(model.revision):
        return model.revision
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model.path, revision=model.revision, local_files_only=True)).name
    except Exception:  # noqa: BLE001 - not in the cache: ask the hub below when allowed
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        try:
            from huggingface_hub import HfApi

            return HfApi().model_info(model.path, revision=model.revision).sha
        except Exception as e:  # noqa: BLE001
            logger.warning("model %s: revision %s not resolved (%s)", model.path, model.revision or "main", e)
    return f"unresolved:{model.revision or 'main'}"


def model_digest(model: ModelSpec) -> str:
    """A local folder's content digest, or 'hub:ID@COMMIT' for a hub id."""
    folder = Path(model.path).expanduser()
    if folder.is_dir():
        return folder_digest(folder, model.gguf_file)
    return f"hub:{model.path}@{_hub_commit(model)}"


def run_inputs(spec: RunSpec, draw) -> dict:
    """{"prompts": digest of the drawn text, "models": {key: content digest}}."""
    return {"prompts": prompts_digest(draw), "models": {m.key: model_digest(m) for m in spec.models}}


def resolve_inputs(spec: RunSpec, draw=None) -> RunSpec:
    """The spec with its inputs' digests (and so its run id) resolved; `draw` saves drawing the prompts again."""
    if draw is None:
        from refdir.workers.prompts import draw_prompts

        draw = draw_prompts(spec.prompts, spec.models)
    return spec.with_inputs(run_inputs(spec, draw))
