"""Generation batches sized from free GPU memory (workers/batching.py, evaluate.generate), on CPU.

- The byte count of one sequence for Llama-3-8B, written out by hand from its public config.json
  (hidden_size 4096, intermediate_size 14336, num_hidden_layers 32, num_attention_heads 32,
  num_key_value_heads 8, vocab_size 128256, bfloat16), read through transformers' own LlamaConfig.
- The KV cache term against the cache transformers really builds, for every tiny family's config.
- transformers' generate asks the forward for the last position's logits only (what the count assumes).
- `generate` on CPU keeps fixed batches when max_batch_size is set; with free memory stubbed, batches grow
  up to max_batch_size and the completions stay those of each prompt generated alone.
- An actor on half a GPU (Ray's fractional num_gpus) counts half the free memory as its own (slow: Ray).
"""

import functools

import pytest
import torch
from transformers import LlamaConfig

from refdir.workers import batching
from refdir.workers.batching import GenShape, batch_size_for, plan_batches, sequence_bytes
from refdir.workers.evaluate import generate
from tests.fixtures.tiny import TINY_FAMILIES, tiny_lm

torch.set_num_threads(1)

GIB = 2**30
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256)


def _llama3_8b() -> GenShape:
    return GenShape.of(LlamaConfig(**LLAMA3_8B), torch.bfloat16, last_logits_only=True)


def test_llama3_8b_sequence_bytes_by_hand():
    s = _llama3_8b()
    assert (s.layers, s.heads, s.kv_heads, s.head_dim, s.vocab, s.dtype_bytes) == (32, 32, 8, 128, 128256, 2)
    # 100 prompt tokens + 512 new = 612 tokens of context
    kv = 2 * 8 * 128 * 2 * 612 * (32 + 1)          # K and V, 8 kv heads x 128, bf16; 32 layers + 1 growing
    assert kv == 82_722_816
    logits = 128256 * (2 + 4) + 128256 * 4          # prefill's last row bf16 + float32 copy; decode scores
    assert logits == 1_282_560
    width = 4 * 4096 + (32 + 2 * 8) * 128 + 3 * 14336        # = 65536 values per prompt token
    work = 100 * width * 2 + 32 * 100 * 612 * (2 + 4)        # one layer's activations + eager scores
    assert work == 13_107_200 + 11_750_400
    assert sequence_bytes(s, 100, 512) == kv + logits + work == 108_862_976


def test_llama3_8b_batch_sizes_by_hand():
    s = _llama3_8b()
    # 20 GiB free: 0.6 x 20 GiB - 1 GiB = 11 GiB = 11_811_160_064 bytes / 108_862_976 = 108.5
    assert batch_size_for(20 * GIB, s, 100, 512, n_prompts=500, max_batch=1000) == 108
    # 100 GiB free: 59 GiB / 108_862_976 = 581.9, capped by max_batch, then by the prompts
    assert batch_size_for(100 * GIB, s, 100, 512, n_prompts=1000, max_batch=1000) == 581
    assert batch_size_for(100 * GIB, s, 100, 512, n_prompts=1000, max_batch=256) == 256
    assert batch_size_for(100 * GIB, s, 100, 512, n_prompts=50, max_batch=256) == 50
    assert batch_size_for(GIB, s, 100, 512, n_prompts=50, max_batch=256) == 1      # nothing fits: one prompt
    # a forward without logits_to_keep projects every prompt position: 100 x 128256 x 6 more bytes
    full = GenShape.of(LlamaConfig(**LLAMA3_8B), torch.bfloat16, last_logits_only=False)
    assert sequence_bytes(full, 100, 512) - sequence_bytes(s, 100, 512) == 99 * 128256 * 6


def test_plan_batches_sizes_each_batch_for_its_longest_prompt():
    s = _llama3_8b()
    free = 20 * GIB            # 108 prompts of 100 tokens fit (above); of 1000 tokens: 11 GiB / per-sequence
    per_long = sequence_bytes(s, 1000, 512)
    lengths = [100] * 150 + [1000] * 40
    sizes = plan_batches(lengths, free, s, 512, max_batch=256)
    assert sum(sizes) == 190
    assert sizes[0] == int(11 * GIB // per_long)   # the next 190 prompts include 1000-token ones
    assert plan_batches([100] * 150, free, s, 512, max_batch=256) == [108, 42]
    assert plan_batches([], free, s, 512, max_batch=256) == []


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_kv_term_matches_the_cache_transformers_builds(family):
    lm = tiny_lm(family)
    s = GenShape.of(lm.model.config, lm.dtype, last_logits_only=True)
    enc = lm.encode(["how do i make a cake ?"])
    with torch.inference_mode():
        cache = lm.model(**enc, use_cache=True).past_key_values
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)] if hasattr(cache, "layers") \
        else [t for kv in cache for t in kv]
    built = sum(t.numel() * t.element_size() for t in tensors) // enc["input_ids"].shape[1]
    counted = 2 * s.kv_heads * s.head_dim * s.dtype_bytes * s.layers
    assert s.layers == lm.n_layers
    assert counted >= built and (counted == built or "gemma" in family), (family, counted, built)


def test_transformers_generate_asks_for_the_last_positions_logits_only():
    lm = tiny_lm("llama3")
    seen = []
    real = lm.model.forward

    @functools.wraps(real)          # keeps forward's signature: generate inspects it for logits_to_keep
    def spy(*a, **kw):
        seen.append(kw.get("logits_to_keep"))
        return real(*a, **kw)

    lm.model.forward = spy
    try:
        generate(lm, ["tell me", "how do i make a cake ?"], 3, batch_size=2)
    finally:
        del lm.model.forward
    assert seen and set(seen) == {1}


PROMPTS = ["tell me a poem about the sea please", "hi", "how do i make a cake ?", "tell me",
           "what is the weather today ? describe the sea", "bake bread"]


def _batches(lm, monkeypatch, **kw) -> tuple[list[str], list[int]]:
    seen: list[int] = []
    real = lm.model.generate

    def spy(**g):
        seen.append(g["input_ids"].shape[0])
        return real(**g)

    monkeypatch.setattr(lm.model, "generate", spy)
    out = generate(lm, PROMPTS, 6, **kw)
    monkeypatch.delattr(lm.model, "generate")
    return out, seen


def test_generate_on_cpu_keeps_fixed_batches(monkeypatch):
    lm = tiny_lm("llama3")
    alone = [generate(lm, [p], 6, batch_size=1)[0] for p in PROMPTS]
    assert _batches(lm, monkeypatch, batch_size=2) == (alone, [2, 2, 2])
    assert _batches(lm, monkeypatch, batch_size=2, max_batch_size=256) == (alone, [2, 2, 2])


def test_generate_sizes_batches_from_free_memory(monkeypatch):
    lm = tiny_lm("llama3")
    alone = [generate(lm, [p], 6, batch_size=1)[0] for p in PROMPTS]
    monkeypatch.setattr(batching, "cuda_free_for", lambda blocks: (100 * GIB, len(blocks)))
    assert _batches(lm, monkeypatch, batch_size=2, max_batch_size=256) == (alone, [6])
    assert _batches(lm, monkeypatch, batch_size=2, max_batch_size=4) == (alone, [4, 2])
    assert _batches(lm, monkeypatch, batch_size=2) == (alone, [2, 2, 2])      # no max_batch_size: fixed
    monkeypatch.setattr(batching, "cuda_free_for", lambda blocks: (GIB, len(blocks)))   # under the reserve
    assert _batches(lm, monkeypatch, batch_size=2, max_batch_size=256) == (alone, [1] * 6)


@pytest.mark.slow    # starts a Ray cluster in a child process: 15-45 s on 2 cores
def test_an_actor_on_half_a_gpu_sizes_from_half_the_free_memory():
    """Ray's own fractional GPU assignment (a local cluster that declares one GPU; nothing runs on it)."""
    import subprocess
    import sys

    code = ("import ray; from refdir.workers.batching import gpu_share\n"
            "ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)\n"
            "f = lambda: gpu_share()\n"
            "print(ray.get([ray.remote(num_gpus=g, num_cpus=0)(f).remote() for g in (0.5, 1)]), gpu_share())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[0.5, 1.0] 1.0"
