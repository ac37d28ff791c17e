"""Extraction job: one forward pass over a slice of prompts -> activation shard, sums shard, prompt scores.

    receipt = run_extract(lm, store, job)      # ExtractJob -> Receipt (writes data, then the marker)

The forward pass captures the residual stream at every block input (resid_pre) at the post-instruction
positions and, from the same logits, each prompt's baseline refusal score. The job writes three objects:

- activations: one row per (prompt, layer, position), layer-major, float32 (or float16) vectors;
- sums: per (position, layer) float64 sums and counts over the prompts that pass the paper's filter
  (harmful score > 0, harmless score < 0), so means are exact and cheap to aggregate;
- prompts: instruction, category, refusal score, kept flag;

then the done-marker naming all three with their sha256 and the job's input digest. A job whose marker
vouches for the same input digest is skipped (rerun = resume); any other marker is overwritten.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from refdir.schemas import layout
from refdir.schemas.jobs import ExtractJob, Receipt
from refdir.schemas.tables import activations_schema, prompts_schema, sums_schema
from refdir.workers.directions import refusal_scores
from refdir.workers.hooks import capture_resid_pre
from refdir.workers.model import LoadedModel, last_position_logits
from refdir.workers.store import Store

logger = logging.getLogger(__name__)


@dataclass
class Captured:
    """One job's forward passes: activations on CPU, refusal scores, kept mask, float64 sums of the kept."""

    acts: torch.Tensor      # (n, n_layers, n_pos, d) float32, CPU
    scores: torch.Tensor    # (n,) float64, CPU
    kept: np.ndarray        # (n,) bool
    sums: np.ndarray        # (n_layers, n_pos, d) float64 over kept prompts


def forward_capture(lm: LoadedModel, instructions: list[str], batch_size: int, label: str = "harmful",
                    filter_prompts: bool = False) -> Captured:
    """Batched forward passes with resid_pre capture; sums of kept prompts accumulate on the device in float64.

    Per batch there is one device-to-host copy of the activations; the float64 accumulation happens where
    the tensor already is (the GPU on a GPU actor), so the host only encodes.
    """
    n_pos = len(lm.eoi_ids)
    acts, scores, kept = [], [], []
    sums = torch.zeros(lm.n_layers, n_pos, lm.d_model, dtype=torch.float64, device=lm.device)
    for start in range(0, len(instructions), batch_size):
        enc = lm.encode(instructions[start : start + batch_size])
        with capture_resid_pre(lm, n_pos) as cap, torch.inference_mode():
            logits = last_position_logits(lm, enc)             # (batch, vocab)
            batch_acts = cap.activations_on_device()            # (batch, n_layers, n_pos, d)
            batch_scores = refusal_scores(logits, lm.refusal_token_ids)
            mask = keep_mask(batch_scores.cpu(), label, filter_prompts)
            sel = torch.from_numpy(mask).to(batch_acts.device)
            sums += batch_acts[sel].sum(dim=0, dtype=torch.float64).to(sums.device)
            acts.append(batch_acts.to("cpu", torch.float32))
        scores.append(batch_scores.cpu())
        kept.append(mask)
    return Captured(torch.cat(acts), torch.cat(scores), np.concatenate(kept), sums.cpu().numpy())


def keep_mask(scores: torch.Tensor, label: str, enabled: bool) -> np.ndarray:
    """The paper's filter: harmful prompts the model refuses (score > 0), harmless it does not (< 0)."""
    s = scores.numpy()
    if not enabled:
        return np.ones_like(s, dtype=bool)
    return s > 0 if label == "harmful" else s < 0


def activation_table(job: ExtractJob, acts: torch.Tensor, dtype: str) -> pa.Table:
    """(n, L, P, d) -> rows sorted layer-major: layer, then prompt, then position.

    float16 halves the bytes (means do not change: they come from the float64 sums); a shard whose values
    do not fit float16 (|x| > 65504) is stored as float32 instead, with one warning (readers see FLOAT either way)."""
    n, n_layers, n_pos, d = acts.shape
    if dtype == "float16" and acts.numel():
        lo, hi = torch.aminmax(acts)
        if max(-float(lo), float(hi)) > float(np.finfo(np.float16).max):
            logger.warning("%s: activations reach %.4g, beyond float16; this shard is stored as float32",
                           job.job_id, max(-float(lo), float(hi)))
            dtype = "float32"
    np_dtype = np.float16 if dtype == "float16" else np.float32
    flat = acts.permute(1, 0, 2, 3).reshape(-1, d).numpy().astype(np_dtype, copy=False)   # (L*n*P, d)
    ids = np.array([p.prompt_id for p in job.prompts], dtype=np.int64)
    cats = [p.category for p in job.prompts]
    rows = n_layers * n * n_pos
    schema = activations_schema(d, dtype)
    cols = {
        "run_id": pa.array([job.run_id] * rows, pa.string()),
        "model": pa.array([job.model.key] * rows, pa.string()),
        "split": pa.array([job.split] * rows, pa.string()),
        "label": pa.array([job.label] * rows, pa.string()),
        "prompt_id": pa.array(np.tile(np.repeat(ids, n_pos), n_layers)),
        "category": pa.array(np.tile(np.repeat(np.array(cats, dtype=object), n_pos), n_layers), pa.string()),
        "position": pa.array(np.tile(np.arange(-n_pos, 0, dtype=np.int16), n_layers * n)),
        "layer": pa.array(np.repeat(np.arange(n_layers, dtype=np.int16), n * n_pos)),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), d),
    }
    return pa.Table.from_pydict(cols, schema=schema)


def sums_table(job: ExtractJob, cap: Captured) -> pa.Table:
    """Float64 sums and counts per (position, layer) over the kept prompts."""
    n_layers, n_pos, d = cap.sums.shape
    sums = np.ascontiguousarray(cap.sums.transpose(1, 0, 2)).reshape(-1, d)   # (P*L, d), position-major
    kept = cap.kept
    rows = n_pos * n_layers
    cols = {
        "run_id": [job.run_id] * rows,
        "model": [job.model.key] * rows,
        "split": [job.split] * rows,
        "label": [job.label] * rows,
        "position": np.repeat(np.arange(-n_pos, 0, dtype=np.int16), n_layers),
        "layer": np.tile(np.arange(n_layers, dtype=np.int16), n_pos),
        "sum": pa.FixedSizeListArray.from_arrays(pa.array(sums.reshape(-1)), d),
        "n": np.full(rows, int(kept.sum()), dtype=np.int64),
    }
    return pa.Table.from_pydict(cols, schema=sums_schema(d))


def prompts_table(job: ExtractJob, scores: torch.Tensor, kept: np.ndarray) -> pa.Table:
    n = len(job.prompts)
    return pa.Table.from_pydict({
        "run_id": [job.run_id] * n,
        "model": [job.model.key] * n,
        "split": [job.split] * n,
        "label": [job.label] * n,
        "prompt_id": [p.prompt_id for p in job.prompts],
        "instruction": [p.instruction for p in job.prompts],
        "category": [p.category for p in job.prompts],
        "refusal_score": scores.numpy().astype(np.float64),
        "kept": kept,
    }, schema=prompts_schema())


class ExtractWriter:
    """CPU-side writers for captured jobs, so the model's next forward pass starts while a shard is encoded.

    `run_extract(..., writer=w)` captures under `w.forward_lock` (one forward at a time on the model), hands
    the tensors to a pool of `workers` threads (Parquet encoding, sha256 and object writes release the GIL)
    and waits for its own job's write, so the receipt and the marker-after-data order are unchanged and an
    error in the writer is the job's error. At most `max_pending` captured jobs wait in memory: a job takes a
    slot before its forward pass and gives it back when its objects are written. The overlap needs several
    jobs in flight, i.e. a threaded actor (`remote_worker(max_concurrency=k)`).
    """

    def __init__(self, workers: int = 2, max_pending: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self.forward_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_pending)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="refdir-writer")

    def run(self, capture, write):
        """write(capture()) with capture under the forward lock and write on the pool; write's result."""
        self._slots.acquire()
        try:
            with self.forward_lock:
                captured = capture()
            future = self._pool.submit(write, captured)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _f: self._slots.release())
        return future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def run_extract(lm: LoadedModel, store: Store, job: ExtractJob, writer: ExtractWriter | None = None) -> Receipt:
    """Run one extraction job unless its marker exists; data objects first, marker last.

    With a `writer`, the objects are encoded and written on its threads (see ExtractWriter)."""
    marker_rel = layout.activation_marker(job.run_id, job.model.key, job.split, job.label, job.index)
    if (done := store.receipt_if_done(marker_rel, job.job_id, job.input_digest)) is not None:
        return done
    t0 = time.perf_counter()

    def capture() -> Captured:
        return forward_capture(lm, [p.instruction for p in job.prompts], job.batch_size, job.label,
                               job.filter_prompts)

    def write(cap: Captured) -> Receipt:
        return write_outputs(store, job, cap, marker_rel, t0)

    return write(capture()) if writer is None else writer.run(capture, write)


def write_outputs(store: Store, job: ExtractJob, cap: Captured, marker_rel: str, t0: float) -> Receipt:
    """The job's sums and prompts shards, then its activation shard and marker (Store.commit)."""
    run, key = job.run_id, job.model.key
    sums_rel = layout.sums_shard(run, key, job.split, job.label, job.index)
    prompts_rel = layout.prompts_shard(run, key, job.split, job.label, job.index)
    _, sums_sha = store.write_table(sums_rel, sums_table(job, cap), table_name="sums", run_id=run)
    _, prompts_sha = store.write_table(prompts_rel, prompts_table(job, cap.scores, cap.kept), table_name="prompts",
                                       run_id=run)
    n_kept = int(cap.kept.sum())
    receipt = store.commit(layout.activation_shard(run, key, job.split, job.label, job.index),
                           activation_table(job, cap.acts, job.activation_dtype), marker_rel,
                           table_name="activations", run_id=run, job_id=job.job_id, input_digest=job.input_digest,
                           sums=sums_rel, sums_sha256=sums_sha, prompts=prompts_rel, prompts_sha256=prompts_sha,
                           split=job.split, label=job.label, n_prompts=len(job.prompts), n_kept=n_kept,
                           seconds=time.perf_counter() - t0)
    logger.info("%s %s: %d rows, %d/%d kept, %.2fs", key, job.job_id, receipt.rows, n_kept, len(job.prompts),
                receipt.seconds)
    return receipt
