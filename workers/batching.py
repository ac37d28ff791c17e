"""Generation batch sizes from free accelerator memory: plain arithmetic, testable without a GPU.

    shape = GenShape.of(lm.model.config, lm.dtype, last_logits_only=True)
    sizes = plan_batches(sorted_lengths, free_bytes, shape, max_new_tokens, max_batch)   # e.g. [50, 50]

The caller (`evaluate.generate`) reads the free memory (`free_cuda_bytes`) on CUDA and keeps the spec's fixed
`generation.batch_size` elsewhere. What one sequence of a batch costs (`sequence_bytes`) is counted
CONSERVATIVELY, so a batch it sizes fits with room to spare:

- KV cache: K and V of every layer for the whole prompt + max_new_tokens (a sequence that stops early keeps
  its slot in the batch), plus one more layer's worth: HF's DynamicCache grows by concatenation, so a layer's
  old and new tensors exist together for a moment;
- logits: the prefill's (one position where the forward takes `logits_to_keep`, which transformers' generate
  passes; every prompt position otherwise) in the model's dtype plus generate's float32 copy, and the decode
  step's float32 scores;
- activation workspace of one layer at a time: the prompt's hidden states, q/k/v and MLP intermediates in the
  model's dtype, and eager attention's scores counted as heads x prompt x (prompt + new tokens) in the
  model's dtype plus float32 (sdpa/flash kernels never materialise them).

Only `SAFETY` (60 %) of the free memory, less `RESERVE_BYTES` (1 GiB: the caching allocator's fragmentation
as the cache grows, cuBLAS workspaces), is handed out; an actor holding a fraction of a GPU (Ray's fractional
`num_gpus`) counts only that fraction of the free memory as its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SAFETY = 0.6
RESERVE_BYTES = 2**30


@dataclass(frozen=True)
class GenShape:
    """What generation memory depends on: a decoder's sizes (HF config) and its weights' dtype."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    dtype_bytes: int
    last_logits_only: bool   # the forward takes logits_to_keep: the prefill projects the last position only

    @classmethod
    def of(cls, config, dtype: torch.dtype, last_logits_only: bool) -> "GenShape":
        """From an HF config (the text config of a multimodal one); names of GPT-2-style configs accepted."""
        c = config.get_text_config() if hasattr(config, "get_text_config") else config

        def first(*names, default=None):
            for n in names:
                if getattr(c, n, None) is not None:
                    return int(getattr(c, n))
            if default is None:
                raise ValueError(f"{type(c).__name__} has none of {names}: cannot size generation batches")
            return default

        hidden = first("hidden_size", "n_embd", "d_model")
        heads = first("num_attention_heads", "n_head")
        return cls(layers=first("num_hidden_layers", "n_layer", "num_layers"), heads=heads,
                   kv_heads=first("num_key_value_heads", "n_head_kv", default=heads),
                   head_dim=first("head_dim", "kv_channels", default=hidden // heads), hidden=hidden,
                   intermediate=first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
                   vocab=first("vocab_size"), dtype_bytes=torch.empty((), dtype=dtype).element_size(),
                   last_logits_only=last_logits_only)


def sequence_bytes(s: GenShape, prompt_tokens: int, max_new_tokens: int) -> int:
    """Bytes one sequence of a batch may need at its peak (see the module doc for what is counted)."""
    ctx = prompt_tokens + max_new_tokens
    kv = 2 * s.kv_heads * s.head_dim * s.dtype_bytes * ctx * (s.layers + 1)
    prefill_rows = 1 if s.last_logits_only else prompt_tokens
    logits = prefill_rows * s.vocab * (s.dtype_bytes + 4) + s.vocab * 4
    width = 4 * s.hidden + (s.heads + 2 * s.kv_heads) * s.head_dim + 3 * s.intermediate
    work = prompt_tokens * width * s.dtype_bytes + s.heads * prompt_tokens * ctx * (s.dtype_bytes + 4)
    return kv + logits + work


def batch_size_for(free_bytes: int, s: GenShape, prompt_tokens: int, max_new_tokens: int, n_prompts: int,
                   max_batch: int, safety: float = SAFETY, reserve: int = RESERVE_BYTES) -> int:
    """Prompts of up to `prompt_tokens` tokens that fit in `safety` x free - reserve, within [1, n_prompts,
    max_batch] (at least 1: one sequence always runs, as it would with a fixed batch)."""
    fit = int((free_bytes * safety - reserve) // sequence_bytes(s, prompt_tokens, max_new_tokens))
    return max(1, min(fit, n_prompts, max_batch))


def fixed_batches(n_prompts: int, batch_size: int) -> list[int]:
    """Sizes of `batch_size` batches over `n_prompts` (the last one holds the rest): refdir off CUDA."""
    return [min(batch_size, n_prompts - s) for s in range(0, n_prompts, batch_size)]


def plan_batches(lengths: list[int], free_bytes: int, s: GenShape, max_new_tokens: int, max_batch: int,
                 safety: float = SAFETY, reserve: int = RESERVE_BYTES) -> list[int]:
    """Batch sizes over prompts sorted by token length (ascending), each sized for the longest prompt it
    could hold (the last of the next `max_batch`)."""
    sizes, start = [], 0
    while start < len(lengths):
        left = len(lengths) - start
        longest = lengths[start + min(max_batch, left) - 1]
        sizes.append(batch_size_for(free_bytes, s, longest, max_new_tokens, left, max_batch, safety, reserve))
        start += sizes[-1]
    return sizes


def free_cuda_bytes(device: torch.device) -> int:
    """Free memory on a CUDA device, counting what PyTorch's caching allocator holds but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def cuda_free_for(blocks: list[torch.nn.Module]) -> tuple[int, int] | None:
    """(least free bytes among the CUDA devices holding decoder blocks, most blocks on one of them), or None
    when no block is on CUDA: a model sharded over k GPUs is sized as if its fullest GPU were every GPU."""
    per_device: dict[torch.device, int] = {}
    for b in blocks:
        dev = next(b.parameters()).device
        per_device[dev] = per_device.get(dev, 0) + 1
    cuda = {d: n for d, n in per_device.items() if d.type == "cuda"}
    if not cuda:
        return None
    return int(min(free_cuda_bytes(d) for d in cuda) * gpu_share()), max(cuda.values())


def gpu_share() -> float:
    """This process's share of its GPU: Ray's fractional assignment (compute.gpus_per_worker = 0.5: two actors
    share a GPU, each may size batches from half of what is free), else 1."""
    try:
        import ray

        if ray.is_initialized():
            share = ray.get_runtime_context().get_assigned_resources().get("GPU")
            if share:
                return min(1.0, float(share))
    except Exception:  # noqa: BLE001 - outside a Ray worker (tests, benchmarks): the whole GPU
        pass
    return 1.0
