"""Scale estimate: wall time of the paper's 13 models on N GPUs, from measured per-token costs and FLOPs.

    out = bench_scale(tokenizer_lm, quick=False, gpu=json.load(open("benchmarks/results/calibration-h200.json")) or None)
    out["table"]      # rows N = 1, 8, 32: one-model-at-a-time vs refdir's fan-out vs models in parallel

Measured here (CPU): forward tokens/s of a model built from SmolLM2-135M's own config with random weights
(throughput is a property of the architecture, not of the weights), and of a 2-layer model of
Llama-2-7B's width, so the FLOPs model is checked against two real widths. Measured on the lent H200
when `benchmarks/results/calibration-h200.json` exists (`benchmarks/calibrate.py`): prefill MFU and decode step time of a
Llama-3-8B-shaped model; else the assumptions below. Work per model from the paper's sizes: 128+128
train and 32+32 val prompts forwarded once (extraction), n_pos x (n_layers - 1) candidates x 96 val
prompts (bypass, KL, induce), 100+100 test prompts x 8 interventions x 512 greedy tokens, damage CE/KL.

Time model (stated in the output): prefill/forward = FLOPs / (MFU x peak x g); one decode step =
max(batch FLOPs / (MFU x peak x g), (weights + KV cache bytes) / (HBM x efficiency x g)) + layers x a fixed
per-layer overhead (kernel launches and Python in HF's eager `generate`); a model needs
g GPUs so that weights + KV cache + 10% fit; loading reads the bf16 weights at `load_gb_s`. Strategies:
- one-model-at-a-time: the paper's code, one process per model on its g GPUs, models in sequence;
- refdir fan-out: models in sequence (run_flow's default, compute.concurrent_models = 1), each stage's jobs
  spread over floor(N / g) actors (LPT schedule; extraction has 6 jobs, scoring ceil(C / 16), eval 16);
- models in parallel (bound): max(total GPU-seconds / N, longest model) — what concurrent sub-flows
  (compute.concurrent_models > 1) approach.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace

logger = logging.getLogger(__name__)

NEW_TOKENS = 512
GPU_COUNTS = (1, 8, 32)


@dataclass(frozen=True)
class Arch:
    name: str
    layers: int
    d: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    n_pos: int

    @property
    def layer_params(self) -> int:
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.d * (2 * q + 2 * kv) + 3 * self.d * self.ffn          # attention + gated MLP

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.d * self.vocab * (1 if self.tied else 2)

    def flops_per_token(self, ctx: float, logits: bool = True) -> float:
        """Forward FLOPs of one token with `ctx` tokens of context (2 per multiply-add)."""
        attn = 4 * self.layers * ctx * self.heads * self.head_dim
        return 2 * self.layers * self.layer_params + attn + (2 * self.d * self.vocab if logits else 0)

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2        # K and V, bf16


# The paper's 13 chat models (public config.json values; Qwen v1's intermediate_size is 2x the MLP width).
PAPER_MODELS = [
    Arch("Qwen-1.8B-chat", 24, 2048, 5504, 16, 16, 128, 151936, False, 5),
    Arch("Qwen-7B-chat", 32, 4096, 11008, 32, 32, 128, 151936, False, 5),
    Arch("Qwen-14B-chat", 40, 5120, 13696, 40, 40, 128, 152064, False, 5),
    Arch("Qwen-72B-chat", 80, 8192, 24576, 64, 64, 128, 152064, False, 5),
    Arch("Yi-6B-chat", 32, 4096, 11008, 32, 4, 128, 64000, False, 6),
    Arch("Yi-34B-chat", 60, 7168, 20480, 56, 8, 128, 64000, False, 6),
    Arch("Gemma-2B-it", 18, 2048, 16384, 8, 1, 256, 256000, True, 5),
    Arch("Gemma-7B-it", 28, 3072, 24576, 16, 16, 256, 256000, True, 5),
    Arch("Llama-2-7B-chat", 32, 4096, 11008, 32, 32, 128, 32000, False, 6),
    Arch("Llama-2-13B-chat", 40, 5120, 13824, 40, 40, 128, 32000, False, 6),
    Arch("Llama-2-70B-chat", 80, 8192, 28672, 64, 8, 128, 32000, False, 6),
    Arch("Llama-3-8B-Instruct", 32, 4096, 14336, 32, 8, 128, 128256, False, 5),
    Arch("Llama-3-70B-Instruct", 80, 8192, 28672, 64, 8, 128, 128256, False, 5),
]
LLAMA2_7B = PAPER_MODELS[8]


@dataclass(frozen=True)
class Gpu:
    """GPU throughput assumptions (overridden by measurements from benchmarks/calibrate.py when present)."""

    name: str = "H200 (141 GB HBM3e)"
    peak_tflops: float = 989.0     # dense bf16, datasheet
    mfu: float = 0.40              # prefill / forward model-FLOPs utilisation
    hbm_tb_s: float = 4.8
    hbm_efficiency: float = 0.6    # decode reads weights + KV cache each step at this share of the HBM peak
    mem_gb: float = 141.0
    load_gb_s: float = 2.0         # weights read from local disk / page cache per actor
    layer_overhead_ms: float = 0.25  # fixed cost per decoder layer per decode step (kernel launches, Python)
    capture_factor: float = 1.0    # extraction forward with capture hooks / bare forward
    write_mb_s: float = 150.0      # Parquet encode + write of activation shards (float32, BSS + zstd), serial
    hook_forward_factor: float = 1.0   # a forward pass under ablation hooks / bare (scoring: bypass and KL)
    hook_generate_factor: float = 1.0  # generation under ablation hooks / plain (ablation, random_ablation)
    batch: int = 32                # refdir setting: generation and forward batch (compute.batch_size default)
    eval_prompts_per_job: int = 50  # refdir setting: evaluation.prompts_per_job default
    stage_overhead_s: float = 2.0  # Prefect task + Ray dispatch per stage per model
    source: str = "assumed"

    def at_limit(self) -> "Gpu":
        """The same hardware with refdir's own overheads removed: the limit each stage could reach."""
        return replace(self, layer_overhead_ms=0.0, capture_factor=1.0, write_mb_s=float("inf"),
                       hook_forward_factor=1.0, hook_generate_factor=1.0, stage_overhead_s=0.0)


# ---------------------------------------------------------------- per-model work and time

def gpus_needed(a: Arch, g: Gpu, prompt_tokens: float) -> int:
    need = (2 * a.params + g.batch * (prompt_tokens + NEW_TOKENS) * a.kv_bytes_per_token()) * 1.1
    n = 1
    while n * g.mem_gb * 1e9 < need:
        n *= 2
    return n


def forward_s(a: Arch, g: Gpu, n_gpus: int, prompts: int, t: float, logits: bool = True) -> float:
    return prompts * t * a.flops_per_token(t / 2, logits) / (g.mfu * g.peak_tflops * 1e12 * n_gpus)


def decode_step_s(a: Arch, g: Gpu, n_gpus: int, batch: int, ctx: float) -> float:
    compute = batch * a.flops_per_token(ctx) / (g.mfu * g.peak_tflops * 1e12 * n_gpus)
    memory = (2 * a.params + batch * ctx * a.kv_bytes_per_token()) / (g.hbm_tb_s * 1e12 * g.hbm_efficiency * n_gpus)
    return max(compute, memory) + a.layers * g.layer_overhead_ms / 1000


def generate_s(a: Arch, g: Gpu, n_gpus: int, prompts: int, t: float) -> float:
    total = 0.0
    for start in range(0, prompts, g.batch):
        b = min(g.batch, prompts - start)
        total += forward_s(a, g, n_gpus, b, t) + NEW_TOKENS * decode_step_s(a, g, n_gpus, b, t + NEW_TOKENS / 2)
    return total


def activation_bytes(a: Arch, prompts: int) -> float:
    return prompts * a.layers * a.n_pos * a.d * 4                     # float32 shard values


def stage_jobs(a: Arch, g: Gpu, n_gpus: int, t: float) -> dict[str, list[float]]:
    """Seconds of each job of each stage on one actor of n_gpus GPUs (refdir's default job sizes)."""
    extract = [forward_s(a, g, n_gpus, n, t) * g.capture_factor + activation_bytes(a, n) / (g.write_mb_s * 1e6)
               for n in (64, 64, 64, 64, 32, 32)]
    cands = a.n_pos * (a.layers - 1)
    per_cand = forward_s(a, g, n_gpus, 32, t) * (1 + 2 * g.hook_forward_factor)   # bypass + KL ablated, induce
    score = [min(16, cands - i) * per_cand for i in range(0, cands, 16)]
    score[0] += forward_s(a, g, n_gpus, 32, t)                      # baseline harmless logits, once per actor
    hooked = {"ablation", "random_ablation"}
    interventions = ["baseline", "ablation", "actadd", "orthogonalized", "random_ablation", "baseline", "actadd",
                     "random_actadd"]                               # flows.plan.EVAL_PLAN, 100 prompts each
    per_job = g.eval_prompts_per_job
    evals = [generate_s(a, g, n_gpus, min(per_job, 100 - i), t) * (g.hook_generate_factor if iv in hooked else 1.0)
             for iv in interventions for i in range(0, 100, per_job)]
    damage = 3 * (forward_s(a, g, n_gpus, 100, t + NEW_TOKENS) + forward_s(a, g, n_gpus, 300, t))
    return {"extract": extract, "select": score, "evaluate": evals, "damage": [damage]}


def model_flops(a: Arch, t: float) -> float:
    """Forward FLOPs of one model's whole run (the same work as stage_jobs)."""
    fwd = t * a.flops_per_token(t / 2)                                # one prompt forward
    cands = a.n_pos * (a.layers - 1)
    gen = fwd + NEW_TOKENS * a.flops_per_token(t + NEW_TOKENS / 2)
    damage = 3 * (100 * (t + NEW_TOKENS) * a.flops_per_token((t + NEW_TOKENS) / 2) + 300 * fwd)
    return 320 * fwd + (cands * 96 + 32) * fwd + 800 * gen + damage


def makespan(jobs: list[float], workers: int) -> float:
    """Longest-processing-time-first schedule of jobs on identical workers."""
    loads = [0.0] * max(1, min(workers, len(jobs)))
    for j in sorted(jobs, reverse=True):
        i = loads.index(min(loads))
        loads[i] += j
    return max(loads)


def model_plan(a: Arch, g: Gpu, t: float) -> dict:
    n = gpus_needed(a, g, t)
    jobs = stage_jobs(a, g, n, t)
    limit = stage_jobs(a, g.at_limit(), n, t)
    load = 2 * a.params / (g.load_gb_s * 1e9)
    serial = load + sum(sum(v) for v in jobs.values())
    lm_head_share = 2 * a.d * a.vocab * (t - 1) / t / a.flops_per_token(t / 2)
    return {"model": a.name, "params_b": a.params / 1e9, "gpus": n, "load_s": load, "jobs": jobs,
            "stage_s": {k: sum(v) for k, v in jobs.items()}, "serial_s": serial, "gpu_s": serial * n,
            "stage_vs_limit": {k: sum(v) / sum(limit[k]) for k, v in jobs.items()},
            "candidates": a.n_pos * (a.layers - 1), "lm_head_share_of_forward": lm_head_share}


def fanout_s(p: dict, g: Gpu, n_total: int) -> float:
    """One model with its jobs spread over floor(n_total / gpus) actors (each loads the model once)."""
    replicas = n_total // p["gpus"]
    stages = [makespan(p["jobs"][s], replicas) for s in ("extract", "select", "evaluate")] + p["jobs"]["damage"]
    return p["load_s"] + sum(stages) + 4 * g.stage_overhead_s


def schedule_table(plans: list[dict], g: Gpu) -> list[dict]:
    rows = []
    for n in GPU_COUNTS:
        fit = [p for p in plans if p["gpus"] <= n]
        one = sum(p["serial_s"] for p in fit)
        fan = [fanout_s(p, g, n) for p in fit]
        bound = max(sum(p["gpu_s"] for p in fit) / n, max(fan)) if fit else 0.0
        rows.append({"gpus": n, "models": len(fit), "one_at_a_time_h": one / 3600, "refdir_fanout_h": sum(fan) / 3600,
                     "models_parallel_bound_h": bound / 3600,
                     "speedup_fanout": one / sum(fan) if fan else None, "excluded": [p["model"] for p in plans
                                                                                     if p["gpus"] > n]})
    return rows


# ---------------------------------------------------------------- CPU measurements

def _tokens_per_s(cfg, batch: int, seq: int, reps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    times = []
    with torch.inference_mode():
        for r in range(reps + 1):
            t0 = time.perf_counter()
            model(input_ids=ids)
            if r:
                times.append(time.perf_counter() - t0)
    times.sort()
    sec = times[len(times) // 2]
    del model
    return {"batch": batch, "seq": seq, "seconds": sec, "tokens_per_s": batch * seq / sec}


def _arch_of(cfg, name: str) -> Arch:
    return Arch(name, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                cfg.vocab_size, bool(cfg.tie_word_embeddings), 5)


def cpu_costs(quick: bool, reps: int) -> dict:
    """Measured forward cost per token on this CPU, and how well FLOPs predict it across two widths."""
    from transformers import LlamaConfig

    from benchmarks.common import smollm2_config

    small_cfg = smollm2_config(num_hidden_layers=2) if quick else smollm2_config()
    a = LLAMA2_7B
    wide_cfg = LlamaConfig(hidden_size=a.d, intermediate_size=a.ffn, num_attention_heads=a.heads,
                           num_key_value_heads=a.kv_heads, num_hidden_layers=1 if quick else 2, vocab_size=a.vocab,
                           tie_word_embeddings=False)
    out = {}
    for name, cfg, batch in (("smollm2_random", small_cfg, 8), ("llama2_7b_width", wide_cfg, 1 if quick else 2)):
        arch = _arch_of(cfg, name)
        m = _tokens_per_s(cfg, batch, 48, reps)
        m.update(flops_per_token=arch.flops_per_token(24), params=arch.params, layers=cfg.num_hidden_layers,
                 d=cfg.hidden_size, gflops_per_s=m["tokens_per_s"] * arch.flops_per_token(24) / 1e9)
        out[name] = m
    out["cpu_efficiency_wide_over_small"] = out["llama2_7b_width"]["gflops_per_s"] / out["smollm2_random"]["gflops_per_s"]
    return out


def prompt_tokens(lm, n: int = 96) -> float:
    """Mean chat-formatted prompt length (tokens) over builtin harmful + harmless, SmolLM2's tokenizer."""
    from benchmarks.common import prompts

    texts = [r["instruction"] for label in ("harmful", "harmless") for r in prompts(label, n)]
    enc = lm.encode(texts)
    return float(enc["attention_mask"].sum()) / len(texts)


def what_if(g: Gpu, t: float) -> list[dict]:
    """The same 13-model estimate with one cost removed at a time (GPU-hours and refdir fan-out hours)."""
    cases = [("as measured", g),
             ("generation batch 100 (evaluation.prompts_per_job = generation.batch_size = 100)",
              replace(g, batch=100, eval_prompts_per_job=100)),
             ("decode without the per-layer overhead (static KV cache + CUDA graphs / vLLM)",
              replace(g, layer_overhead_ms=0.0)),
             ("extraction at the forward's speed (capture on device, shards encoded off the critical path)",
              replace(g, capture_factor=1.0, write_mb_s=float("inf"))),
             ("all of refdir's own overheads removed, batch 100", replace(g.at_limit(), batch=100,
                                                                         eval_prompts_per_job=100))]
    out = []
    for name, gg in cases:
        plans = [model_plan(a, gg, t) for a in PAPER_MODELS]
        rows = schedule_table(plans, gg)
        out.append({"case": name, "gpu_hours": sum(p["gpu_s"] for p in plans) / 3600,
                    "refdir_fanout_h": {r["gpus"]: r["refdir_fanout_h"] for r in rows}})
    return out


def gpu_from_measurement(gpu: dict | None) -> Gpu:
    """Assumptions, replaced by the H200 measurements of benchmarks/calibrate.py where they exist."""
    base = Gpu()
    if not gpu or "prefill" not in gpu:
        return base
    fit = gpu.get("decode_fit", {})
    ext = gpu.get("extraction", {})
    brk = ext.get("breakdown", {})
    kw = dict(mfu=round(gpu["prefill"]["mfu"], 3))
    if fit:
        kw.update(hbm_efficiency=round(fit["hbm_efficiency"], 3), layer_overhead_ms=round(fit["layer_overhead_ms"], 4))
    if brk and ext.get("bare_s"):
        kw.update(capture_factor=round(brk["forward_capture_s"] / ext["bare_s"], 3),
                  write_mb_s=round(brk["activation_mb"] / brk["parquet_writes_s"], 1))
    if "ablated_forward" in gpu:
        kw["hook_forward_factor"] = round(gpu["ablated_forward"]["ratio"], 3)
    if "generation" in gpu:
        kw["hook_generate_factor"] = round(gpu["generation"]["ratio"], 3)
    return replace(base, **kw, source=f"measured on {gpu.get('device', 'GPU')} ({gpu.get('date', '?')}) "
                                      "by benchmarks/calibrate.py")


def bench_scale(lm, *, quick: bool, reps: int, gpu: dict | None = None) -> dict:
    g = gpu_from_measurement(gpu)
    t = prompt_tokens(lm, 8 if quick else 96)
    cpu = cpu_costs(quick, reps)
    plans = [model_plan(a, g, t) for a in PAPER_MODELS]
    table = schedule_table(plans, g)
    cpu_flops = cpu["smollm2_random"]["gflops_per_s"] * 1e9
    for p, a in zip(plans, PAPER_MODELS):
        p["pflops"] = model_flops(a, t) / 1e15
        p["cpu_days_this_machine"] = model_flops(a, t) / cpu_flops / 86400
        p["jobs"] = {k: len(v) for k, v in p["jobs"].items()}
    out = {"assumptions": asdict(g), "prompt_tokens": t, "new_tokens": NEW_TOKENS, "cpu": cpu, "models": plans,
           "table": table, "what_if": what_if(g, t),
           "gpu_hours": sum(p["gpu_s"] for p in plans) / 3600}
    logger.info("scale: %s", ", ".join(f"N={r['gpus']}: {r['one_at_a_time_h']:.1f}h -> {r['refdir_fanout_h']:.1f}h"
                                     for r in table))
    return out

