"""Prompt sources and the paper's per-run draw.

This module owns two things:

1. `load_source(source)` turns a source string into rows `{"instruction": str, "category": str}`:

   - `builtin:NAME`           a set packaged in `workers/data/NAME.json` (see `builtin_names()`), or
                              `builtin:organism_{label}_{split}` from `refdir.workers.organism`;
   - `file:PATH`              a JSON list (the official split files), JSONL, CSV/TSV with an instruction
                              column, or Parquet; relative paths resolve against the current directory;
   - `hf:DATASET[:split][@revision]`  the optional `datasets` library: a hub id, a folder written by
                              `save_to_disk`, or a local data folder.

   Bad data raises `PromptSourceError`, naming the file and row/line and how to fix it.

2. `draw_prompts(spec)` reproduces the official code's draw exactly: `random.seed(seed)`, then
   `random.sample` of harmful train, harmless train, harmful val, harmless val (in that order) and, later
   in the same stream, harmless test; harmful test is taken whole (first `n_test` rows, as JailbreakBench
   is). Instructions already drawn for an earlier split are removed from later sources before sampling.
   The global `random` state is restored afterwards.

3. The length bound (`max_prompt_tokens`): before the draw, a row whose instruction is longer than the
   bound is reported (split, source, row numbers) and dropped, never truncated. With several models the
   count is taken with every model's tokenizer (special tokens and the chat template not counted) and a
   row too long for any of them is dropped for all, so every model of a run sees the same draw. Rows of at
   most `max_prompt_tokens - 1` UTF-8 bytes pass without loading a tokenizer (no tokenizer refdir
   supports makes more tokens than bytes + 1), so tokenizers load only when a long row exists; called
   without models, that byte bound is the count.

    draw = draw_prompts(PromptSpec(), models=spec.models)
    draw.split("train", "harmful")  # [Prompt(prompt_id=0, instruction=..., category=...), ...]
"""

from __future__ import annotations

import csv
import json
import logging
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from functools import lru_cache
from typing import Any, Callable, Iterable, Sequence

from refdir.schemas import layout
from refdir.schemas.jobs import Prompt
from refdir.schemas.spec import ModelSpec, PromptSpec

logger = logging.getLogger(__name__)

SPLITS, LABELS = layout.SPLITS, layout.LABELS
# (label, split, sampled): the official order of the draw; harmful test is used whole, not sampled.
DRAW_ORDER: tuple[tuple[str, str, bool], ...] = (
    ("harmful", "train", True),
    ("harmless", "train", True),
    ("harmful", "val", True),
    ("harmless", "val", True),
    ("harmful", "test", False),
    ("harmless", "test", True),
)
_ORGANISM_RE = re.compile(r"^organism_(harmful|harmless)_(train|val|test)$")
_FILE_FORMATS = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class PromptSourceError(ValueError):
    """A prompt source that cannot be used; the message names the file and row (or dataset) and the fix."""


# ----------------------------------------------------------------------------------------------- rows


def _make_row(raw: Any, where: str, instruction_column: str, category_column: str) -> dict:
    """One raw record (dict, or a bare string) -> {"instruction", "category"}; `where` names file and row."""
    if isinstance(raw, str):
        raw = {instruction_column: raw}
    if not isinstance(raw, dict):
        raise PromptSourceError(
            f"{where}: expected an object with an {instruction_column!r} field, got {type(raw).__name__}; "
            "each row must be an object like {\"instruction\": \"...\", \"category\": \"...\"}"
        )
    if instruction_column not in raw:
        raise PromptSourceError(
            f"{where}: row has no {instruction_column!r} field (fields: {sorted(map(str, raw))}); add it, "
            "or set prompts.instruction_column to the field that holds the instruction"
        )
    text = raw[instruction_column]
    if not isinstance(text, str) or not text.strip():
        raise PromptSourceError(
            f"{where}: {instruction_column!r} is {text!r}, but it must be a non-empty string; fix or remove the row"
        )
    category = raw.get(category_column)
    return {"instruction": text.strip(), "category": "" if category is None else str(category)}


def _make_rows(records: Iterable[tuple[str, Any]], instruction_column: str, category_column: str) -> list[dict]:
    """(where, raw record) pairs -> rows, validating each."""
    return [_make_row(raw, where, instruction_column, category_column) for where, raw in records]


def _require_column(columns: list[str], column: str, where: str, what: str) -> None:
    """Raise when a tabular source lacks the instruction column, listing the columns it has."""
    if column not in columns:
        raise PromptSourceError(
            f"{where}: no {what} column {column!r}; columns are {columns}. "
            f"Set prompts.{what}_column to one of them, or rename the column"
        )


# ----------------------------------------------------------------------------------------- builtin


def builtin_names() -> list[str]:
    """Names usable as `builtin:NAME`: the packaged sets plus the organism's generated splits."""
    data = resources.files("refdir.workers").joinpath("data")
    packaged = sorted(p.name[: -len(".json")] for p in data.iterdir() if p.name.endswith(".json"))
    organism = [f"organism_{label}_{split}" for label in LABELS for split in SPLITS]
    return packaged + organism


def _load_builtin(name: str, instruction_column: str, category_column: str) -> list[dict]:
    """`builtin:NAME` -> rows from workers/data/NAME.json or from the organism's generator."""
    match = _ORGANISM_RE.match(name)
    if match:
        return _load_organism(label=match.group(1), split=match.group(2))
    resource = resources.files("refdir.workers").joinpath("data", f"{name}.json")
    if "/" in name or "\\" in name or not resource.is_file():
        raise PromptSourceError(
            f"unknown builtin prompt set {name!r}; available: {', '.join(builtin_names())} "
            "(use file:PATH or hf:DATASET for your own data)"
        )
    where = f"builtin:{name} ({resource})"
    # Packaged sets always use the canonical column names.
    return _parse_json_list(resource.read_text(encoding="utf-8"), where, "instruction", "category")


def _load_organism(label: str, split: str) -> list[dict]:
    """The refusal model organism's templated prompts (imported lazily: it pulls in its generator)."""
    source = f"builtin:organism_{label}_{split}"
    try:
        from refdir.workers.organism import organism_prompts
    except ImportError as e:
        raise PromptSourceError(f"{source} needs refdir.workers.organism, which failed to import: {e}") from e
    try:
        records = organism_prompts(split, label)
    except ValueError as e:
        raise PromptSourceError(f"{source}: the organism has no such split: {e}") from e
    return _make_rows(((f"{source} row {i + 1}", r) for i, r in enumerate(records)), "instruction", "category")


# -------------------------------------------------------------------------------------------- files


def _load_file(path_text: str, instruction_column: str, category_column: str) -> list[dict]:
    """`file:PATH` -> rows; the format comes from the extension."""
    if not path_text:
        raise PromptSourceError("file: source has no path; write file:PATH (e.g. file:data/harmful.json)")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise PromptSourceError(
            f"prompt file {str(path)!r} not found (resolved to {path.resolve()}; relative paths are relative "
            "to the current directory); check the path in the spec"
        )
    kind = _FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise PromptSourceError(
            f"prompt file {str(path)!r}: unknown extension {path.suffix!r}; supported: {sorted(_FILE_FORMATS)}"
        )
    if kind == "parquet":
        return _parse_parquet(path, instruction_column, category_column)
    text = _read_text(path)
    if kind == "json":
        return _parse_json_list(text, str(path), instruction_column, category_column)
    if kind == "jsonl":
        return _parse_jsonl(text, str(path), instruction_column, category_column)
    return _parse_csv(text, str(path), "\t" if kind == "tsv" else ",", instruction_column, category_column)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptSourceError(f"prompt file {str(path)!r} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from e


def _parse_json_list(text: str, where: str, instruction_column: str, category_column: str) -> list[dict]:
    """A JSON array of objects (or of strings), like the official split files."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptSourceError(
            f"{where}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}; fix the file "
            "(one object per line? name it .jsonl)"
        ) from e
    if not isinstance(data, list):
        raise PromptSourceError(
            f"{where}: expected a JSON list of objects like {{\"instruction\": ..., \"category\": ...}}, "
            f"got a {type(data).__name__}"
        )
    records = ((f"{where} row {i + 1} (index {i})", raw) for i, raw in enumerate(data))
    return _make_rows(records, instruction_column, category_column)


def _parse_jsonl(text: str, where: str, instruction_column: str, category_column: str) -> list[dict]:
    """One JSON object per line; blank lines are skipped."""
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{where} line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise PromptSourceError(
                f"{where}: malformed JSON on line {lineno} column {e.colno}: {e.msg}; each line must be one JSON object"
            ) from e
    return _make_rows(records, instruction_column, category_column)


def _parse_csv(text: str, where: str, delimiter: str, instruction_column: str, category_column: str) -> list[dict]:
    """A CSV/TSV with a header row; line numbers in errors count the header as line 1."""
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    columns = list(reader.fieldnames or [])
    _require_column(columns, instruction_column, where, "instruction")
    try:
        records = [(f"{where} line {reader.line_num}", raw) for raw in reader]
    except csv.Error as e:
        raise PromptSourceError(f"{where}: malformed CSV near line {reader.line_num}: {e}") from e
    return _make_rows(records, instruction_column, category_column)


def _parse_parquet(path: Path, instruction_column: str, category_column: str) -> list[dict]:
    """A Parquet file; only the instruction and category columns are read."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-Parquet bytes
        raise PromptSourceError(f"{path}: not a readable Parquet file: {e}") from e
    columns = list(schema.names)
    _require_column(columns, instruction_column, str(path), "instruction")
    wanted = [instruction_column] + ([category_column] if category_column in columns else [])
    table = pq.read_table(path, columns=wanted)
    records = ((f"{path} row {i + 1}", raw) for i, raw in enumerate(table.to_pylist()))
    return _make_rows(records, instruction_column, category_column)


# ----------------------------------------------------------------------------------------------- hf


def _parse_hf(rest: str) -> tuple[str, str | None, str | None]:
    """"DATASET[:split][@revision]" -> (dataset, split, revision)."""
    dataset, revision = rest, None
    if "@" in rest:
        dataset, _, revision = rest.rpartition("@")
    split = None
    head, sep, tail = dataset.rpartition(":")
    if sep and head and tail and "/" not in tail and "\\" not in tail:
        dataset, split = head, tail
    if not dataset:
        raise PromptSourceError(f"hf:{rest}: no dataset named; write hf:DATASET[:split][@revision]")
    return dataset, split, revision or None


def _load_hf(rest: str, instruction_column: str, category_column: str) -> list[dict]:
    """`hf:...` -> rows via the optional `datasets` library (hub id, save_to_disk folder or data folder)."""
    try:
        import datasets
    except ImportError as e:
        raise PromptSourceError(
            f"hf:{rest} needs the optional `datasets` package: pip install 'refdir[hf]' (or use file:PATH)"
        ) from e
    name, split, revision = _parse_hf(rest)
    where = f"hf:{rest}"
    local = Path(name).expanduser()
    try:
        if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():
            ds = _pick_split(datasets.load_from_disk(str(local)), split, where)
        else:
            ds = datasets.load_dataset(name, split=split or "train", revision=revision)
    except PromptSourceError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError...)
        raise PromptSourceError(
            f"{where}: could not load dataset {name!r} (split {split or 'train'!r}): {type(e).__name__}: {e}. "
            "Offline, only local folders (save_to_disk output or data files) work"
        ) from e
    columns = list(ds.column_names)
    _require_column(columns, instruction_column, where, "instruction")
    texts = ds[instruction_column]
    cats = ds[category_column] if category_column in columns else [None] * len(texts)
    records = (
        (f"{where} row {i + 1}", {instruction_column: t, category_column: c}) for i, (t, c) in enumerate(zip(texts, cats))
    )
    return _make_rows(records, instruction_column, category_column)


def _pick_split(ds: Any, split: str | None, where: str) -> Any:
    """A DatasetDict -> the named split (default: the only one, else "train"); a Dataset passes through."""
    if not hasattr(ds, "keys"):
        return ds
    names = list(ds.keys())
    chosen = split or ("train" if "train" in names or len(names) != 1 else names[0])
    if chosen not in names:
        raise PromptSourceError(f"{where}: no split {chosen!r}; splits are {names}; write hf:DATASET:SPLIT")
    return ds[chosen]


# ------------------------------------------------------------------------------------------- source


def load_source(source: str, *, instruction_column: str = "instruction", category_column: str = "category") -> list[dict]:
    """Read one prompt source into rows `{"instruction": str (stripped, non-empty), "category": str}`."""
    scheme, sep, rest = source.partition(":")
    if scheme == "builtin" and sep:
        return _load_builtin(rest, instruction_column, category_column)
    if scheme == "file" and sep:
        return _load_file(rest, instruction_column, category_column)
    if scheme == "hf" and sep:
        return _load_hf(rest, instruction_column, category_column)
    raise PromptSourceError(
        f"unknown prompt source {source!r}: write builtin:NAME, file:PATH or hf:DATASET[:split][@revision] "
        f"(builtin names: {', '.join(builtin_names())})"
    )


# --------------------------------------------------------------------------------------------- draw


@dataclass(frozen=True)
class PromptDraw:
    """The prompts of one run, per split and label, with what the draw dropped and warned about."""

    harmful_train: list[Prompt]
    harmless_train: list[Prompt]
    harmful_val: list[Prompt]
    harmless_val: list[Prompt]
    harmful_test: list[Prompt]
    harmless_test: list[Prompt]
    dropped_duplicates: dict[str, int]  # split name -> rows dropped: instruction already in an earlier split
    warnings: list[str]
    within_source_duplicates: dict[str, int] = field(default_factory=dict)  # split -> repeated rows in its source

    def split(self, split: str, label: str) -> list[Prompt]:
        """The prompts of `split` (train/val/test) and `label` (harmful/harmless)."""
        if split not in SPLITS or label not in LABELS:
            raise ValueError(f"split must be one of {SPLITS} and label one of {LABELS}; got {split!r}, {label!r}")
        return getattr(self, f"{label}_{split}")


def _dedupe_within(rows: list[dict]) -> tuple[list[dict], int]:
    """Keep the first row of each instruction; return (rows, number dropped)."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        if row["instruction"] not in seen:
            seen.add(row["instruction"])
            kept.append(row)
    return kept, len(rows) - len(kept)


def _draw_one(rows: list[dict], n: int, sampled: bool) -> list[dict]:
    """The official draw of one split: random.sample from the global stream, or the first n rows."""
    if not sampled:
        return rows[:n]
    return random.sample(rows, min(n, len(rows)))


def _load_all(spec: PromptSpec) -> dict[str, list[dict]]:
    """Each distinct source of the spec, loaded once."""
    loaded: dict[str, list[dict]] = {}
    for label, split, _ in DRAW_ORDER:
        source = getattr(spec, f"{label}_{split}")
        if source not in loaded:
            loaded[source] = load_source(
                source, instruction_column=spec.instruction_column, category_column=spec.category_column
            )
    return loaded


@lru_cache(maxsize=32)
def _tokenizer_counter(path: str, revision: str | None, gguf_file: str | None, trust_remote_code: bool):
    """Token count of an instruction under one model's tokenizer (no special tokens, no template)."""
    from transformers import AutoTokenizer

    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision and not Path(path).expanduser().is_dir():
        kw["revision"] = revision
    if gguf_file:
        kw["gguf_file"] = gguf_file
    tok = AutoTokenizer.from_pretrained(path, **kw)
    return lambda text: len(tok.encode(text, add_special_tokens=False))


def _counters(models: Sequence[ModelSpec]) -> list[Callable[[str], int]]:
    out = []
    for m in models:
        try:
            out.append(_tokenizer_counter(m.path, m.revision, m.gguf_file, m.trust_remote_code))
        except Exception as e:  # noqa: BLE001 - a model whose tokenizer cannot load is preflight's to report
            logger.warning("model %s: tokenizer unavailable for the prompt length bound (%s); its byte bound is used",
                           m.key, type(e).__name__)
            out.append(lambda text: len(text.encode()) + 1)
    return out or [lambda text: len(text.encode()) + 1]


_HEAD = 64   # characters per token beyond which a row is first counted on its head only


def _count(counter: Callable[[str], int], text: str, limit: int) -> int:
    """Tokens of `text`, or of its head when the head alone exceeds `limit` (a 10 MB row is not tokenized
    whole: 20 s and 2 GB). The head ends at a space, so it tokenizes as the start of the full text does."""
    if len(text) > _HEAD * limit:
        head = text[: _HEAD * limit]
        head = head[: head.rfind(" ")] if head.rfind(" ") > 0 else head
        n = counter(head)
        if n > limit:
            return n
    return counter(text)


def drop_long_rows(rows: list[dict], limit: int, models: Sequence[ModelSpec], where: str) -> tuple[list[dict], list[str]]:
    """Rows whose instruction is at most `limit` tokens under every model's tokenizer, and a warning naming
    the rows dropped (see module doc: the byte pre-check keeps tokenizers unloaded for ordinary data)."""
    long_rows = [i for i, r in enumerate(rows) if len(r["instruction"].encode()) + 1 > limit]
    if not long_rows:
        return rows, []
    counters = _counters(models)
    counts = {i: max(_count(c, rows[i]["instruction"], limit) for c in counters) for i in long_rows}
    bad = [i for i in long_rows if counts[i] > limit]
    if not bad:
        return rows, []
    shown = ", ".join(f"{i + 1} ({counts[i]:,}{'+' if len(rows[i]['instruction']) > _HEAD * limit else ''} tokens)"
                      for i in bad[:10]) + (" ..." if len(bad) > 10 else "")
    drop = set(bad)
    return ([r for i, r in enumerate(rows) if i not in drop],
            [f"{where}: dropped {len(bad)} row(s) longer than max_prompt_tokens = {limit}: row(s) {shown} (counting from 1)"])


def draw_prompts(spec: PromptSpec, models: Sequence[ModelSpec] = ()) -> PromptDraw:
    """Load every source and draw the run's prompts exactly as the official code does (see module doc);
    `models` are the run's models, whose tokenizers count tokens for `max_prompt_tokens`."""
    loaded = _load_all(spec)
    warnings: list[str] = []
    for source, rows in loaded.items():
        loaded[source], note = drop_long_rows(rows, spec.max_prompt_tokens, models, source)
        warnings += note
    sizes = {"train": spec.n_train, "val": spec.n_val, "test": spec.n_test}
    drawn: dict[str, list[Prompt]] = {}
    dropped: dict[str, int] = {}
    within: dict[str, int] = {}
    seen: set[str] = set()
    state = random.getstate()
    try:
        random.seed(spec.seed)
        for label, split, sampled in DRAW_ORDER:
            name, source = f"{label}_{split}", getattr(spec, f"{label}_{split}")
            rows, within[name] = _dedupe_within(loaded[source])
            if within[name]:
                warnings.append(f"{name}: {source} repeats {within[name]} instruction(s); kept the first of each")
            candidates = [r for r in rows if r["instruction"] not in seen]
            dropped[name] = len(rows) - len(candidates)
            if dropped[name]:
                warnings.append(f"{name}: dropped {dropped[name]} row(s) of {source} already drawn for an earlier split")
            if not candidates:
                raise PromptSourceError(
                    f"split {name} is empty: {source} has {len(rows)} distinct row(s), {dropped[name]} of them already "
                    "drawn for an earlier split; give this split its own source or lower the earlier split's size"
                )
            if len(candidates) < sizes[split]:
                warnings.append(
                    f"{name}: {source} has {len(candidates)} usable row(s), fewer than the {sizes[split]} asked; using all"
                )
            picked = _draw_one(candidates, sizes[split], sampled)
            seen.update(r["instruction"] for r in picked)
            drawn[name] = [Prompt(prompt_id=i, instruction=r["instruction"], category=r["category"]) for i, r in enumerate(picked)]
    finally:
        random.setstate(state)
    for message in warnings:
        logger.warning(message)
    return PromptDraw(**drawn, dropped_duplicates=dropped, warnings=warnings, within_source_duplicates=within)
