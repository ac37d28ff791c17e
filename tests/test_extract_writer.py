"""Extraction through the CPU-side writer (workers/extract.ExtractWriter), as a GPU actor runs it.

- the shard written through the writer holds what Hugging Face's own `output_hidden_states` returns at the
  post-instruction positions, and the marker names objects that exist with that sha256;
- the next job's forward pass runs while the previous job's shard is still being written, but only up to
  `max_pending` captured jobs: with one slot the second forward waits for the first write;
- an error in the writer is the job's error: no marker, and the slot is given back (the next job runs).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from refdir.schemas import layout
from refdir.schemas.jobs import ExtractJob, Prompt
from refdir.schemas.spec import ModelSpec, StoreSpec
from refdir.workers.extract import ExtractWriter, run_extract
from refdir.workers.store import Store
from tests.fixtures.tiny import tiny_lm

TEXTS = ["How do I bake bread?", "Write a poem about the sea.", "List three prime numbers.", "Explain rain."]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama3", num_hidden_layers=3)


def job(store: Store, index: int, texts=TEXTS) -> ExtractJob:
    return ExtractJob(run_id="w", model=ModelSpec(key="tiny", path="tiny"), store=StoreSpec(uri=store.uri),
                      split="train", label="harmful", index=index, batch_size=2, filter_prompts=False,
                      prompts=[Prompt(prompt_id=i, instruction=t) for i, t in enumerate(texts)])


def test_shard_through_writer_holds_hf_hidden_states(lm, tmp_path):
    store = Store.open(str(tmp_path / "s"))
    writer = ExtractWriter(workers=2, max_pending=2)
    try:
        receipt = run_extract(lm, store, job(store, 0), writer=writer)
    finally:
        writer.close()
    marker = store.marker(layout.activation_marker("w", "tiny", "train", "harmful", 0))
    for key in ("data", "sums", "prompts"):
        sha = marker["sha256"] if key == "data" else marker[f"{key}_sha256"]
        assert hashlib.sha256(Path(store.url(marker[key])).read_bytes()).hexdigest() == sha
    assert receipt.sha256 == marker["sha256"] and not receipt.skipped
    n_pos = len(lm.eoi_ids)
    t = pq.read_table(store.url(marker["data"]))
    vec = np.stack(t.column("vector").to_numpy(zero_copy_only=False))
    layer, pid = t.column("layer").to_numpy(), t.column("prompt_id").to_numpy()
    with torch.inference_mode():
        for i, text in enumerate(TEXTS):   # one prompt at a time: no padding, HF's own hidden states
            hs = lm.model(**lm.encode([text]), output_hidden_states=True).hidden_states
            for l in range(lm.n_layers):
                want = hs[l][0, -n_pos:].numpy()
                got = vec[(layer == l) & (pid == i)]
                np.testing.assert_allclose(got, want, atol=1e-4)


def _blocking_commit(store: Store, gate: threading.Event, started: threading.Event):
    original = store.commit

    def commit(*a, **kw):
        started.set()
        assert gate.wait(30), "the test never released the first write"
        return original(*a, **kw)
    return commit


@pytest.mark.parametrize("max_pending, overlaps", [(2, True), (1, False)])
def test_next_forward_runs_while_a_shard_is_written(lm, tmp_path, monkeypatch, max_pending, overlaps):
    store = Store.open(str(tmp_path / "s"))
    gate, writing, second_forward = threading.Event(), threading.Event(), threading.Event()
    monkeypatch.setattr(store, "commit", _blocking_commit(store, gate, writing))
    writer = ExtractWriter(workers=2, max_pending=max_pending)
    first = threading.Thread(target=run_extract, args=(lm, store, job(store, 0)), kwargs={"writer": writer})
    first.start()
    assert writing.wait(30)                           # job 0 captured; its write is held at the commit
    handle = lm.model.register_forward_pre_hook(lambda *_: second_forward.set())
    second = threading.Thread(target=run_extract, args=(lm, store, job(store, 1)), kwargs={"writer": writer})
    try:
        second.start()
        assert second_forward.wait(5 if overlaps else 1) is overlaps
    finally:
        gate.set()
        first.join(60)
        second.join(60)
        handle.remove()
        writer.close()
    assert second_forward.is_set()
    assert len(store.done_jobs(layout.activation_markers_dir("w", "tiny"))) == 2


def test_writer_error_is_the_jobs_error(lm, tmp_path, monkeypatch):
    store = Store.open(str(tmp_path / "s"))
    writer = ExtractWriter(workers=1, max_pending=1)
    original = store.write_table

    def broken(rel, table, **kw):
        if kw.get("table_name") == "activations":
            raise OSError("disk full (test)")
        return original(rel, table, **kw)

    monkeypatch.setattr(store, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        run_extract(lm, store, job(store, 0), writer=writer)
    assert store.marker(layout.activation_marker("w", "tiny", "train", "harmful", 0)) is None
    monkeypatch.setattr(store, "write_table", original)
    try:   # the failed job gave its slot back: with max_pending=1 the next job would otherwise hang
        result: list = []
        t = threading.Thread(target=lambda: result.append(run_extract(lm, store, job(store, 0), writer=writer)))
        t.start()
        t.join(60)
        assert result and result[0].rows == len(TEXTS) * lm.n_layers * len(lm.eoi_ids)
    finally:
        writer.close()
