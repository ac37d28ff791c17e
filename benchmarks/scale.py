"""An ESTIMATE, not a measurement: the paper's 13 models on 8 H200s with refdir, from measured per-token costs.

    out = bench_scale(lm, gpu=summary)   # summary: results/gpu-h200-*.json "summary" (or a newer gpu.json's)
    out["hours_8_gpus"]                  # goal <= 0.5 h

Per-token costs measured on an H200 (benchmarks/gpu.py; the file and date are in the output): prefill MFU,
and the decode step of a Llama-3-8B-shaped model at batch 32 split into a fixed per-layer cost and weights +
KV cache read at an effective HBM bandwidth; intervention factors from the same run. Measured here: the mean
chat-formatted prompt length (SmolLM2's tokenizer over builtin prompts). Work per model from the paper's
sizes and refdir's defaults (schemas/spec.py): 128+128 train and 32+32 val prompts forwarded (extraction),
n_pos x (L-1) candidates x 96 val forwards under hooks (scoring), 100+100 test prompts x the 8 evaluations of
flows.plan.EVAL_PLAN x 512 greedy tokens, evaluation.prompts_per_job per job, damage. Generation batches are
what refdir's own sizing (workers/batching.plan_batches) picks on each model's GPUs from the memory the weights
leave free, for the longest measured prompt, up to generation.max_batch_size and the job's prompts.
Assumptions (listed in the output, `stated`): a model takes g GPUs so that bf16 weights + KV cache at
generation.batch_size + 10% fit in 141 GB; loading reads weights at 2 GB/s; extraction costs `extract_factor`
bare forwards; decode compute at the prefill MFU; the decode step at a batch other than 32 is extrapolated from
the batch-32 measurement; models run one after another, each stage's jobs LPT-scheduled over floor(8 / g) actors.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace

from refdir.workers.batching import GenShape, fixed_batches, plan_batches

logger = logging.getLogger(__name__)

NEW_TOKENS = 512
N_GPUS = 8
GOAL_H = 0.5
INTERVENTIONS = ["baseline", "ablation", "actadd", "orthogonalized", "random_ablation", "baseline", "actadd",
                 "random_actadd"]                                   # flows.plan.EVAL_PLAN, 100 prompts each


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
    remote_code: bool = False    # Qwen v1: its own modeling code (no logits_to_keep; config ffn = 2x the width)

    @property
    def params(self) -> int:
        layer = self.d * (2 * self.heads * self.head_dim + 2 * self.kv_heads * self.head_dim) + 3 * self.d * self.ffn
        return self.layers * layer + self.d * self.vocab * (1 if self.tied else 2)

    def flops_per_token(self, ctx: float, logits: bool = True) -> float:
        """Forward FLOPs of one token with `ctx` tokens of context (2 per multiply-add)."""
        body = 2 * (self.params - self.d * self.vocab * (1 if self.tied else 2))
        return body + 4 * self.layers * ctx * self.heads * self.head_dim + (2 * self.d * self.vocab if logits else 0)

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2        # K and V, bf16

    def gen_shape(self, n_gpus: int) -> GenShape:
        """What refdir's batch sizing reads from this model's config, for the fullest of its n GPUs."""
        return GenShape(layers=math.ceil(self.layers / n_gpus), heads=self.heads, kv_heads=self.kv_heads,
                        head_dim=self.head_dim, hidden=self.d, intermediate=self.ffn * (2 if self.remote_code else 1),
                        vocab=self.vocab, dtype_bytes=2, last_logits_only=not self.remote_code)

    def snapshot_bytes(self) -> int:
        """evaluate.orthogonalized's on-GPU copy of the weights it edits (embeddings, attention-out, MLP-down)."""
        return 2 * (self.d * self.vocab + self.layers * self.d * (self.heads * self.head_dim + self.ffn))


# The paper's 13 chat models (public config.json values; Qwen v1's intermediate_size is 2x the MLP width).
PAPER_MODELS = [
    Arch("Qwen-1.8B-chat", 24, 2048, 5504, 16, 16, 128, 151936, False, 5, remote_code=True),
    Arch("Qwen-7B-chat", 32, 4096, 11008, 32, 32, 128, 151936, False, 5, remote_code=True),
    Arch("Qwen-14B-chat", 40, 5120, 13696, 40, 40, 128, 152064, False, 5, remote_code=True),
    Arch("Qwen-72B-chat", 80, 8192, 24576, 64, 64, 128, 152064, False, 5, remote_code=True),
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


@dataclass(frozen=True)
class Gpu:
    """Per-token costs (from the H200 summary when given) and refdir's settings (from schemas/spec.py)."""

    peak_tflops: float = 989.0       # dense bf16, datasheet
    hbm_tb_s: float = 4.8
    mem_gb: float = 141.0
    load_gb_s: float = 2.0
    mfu: float = 0.40
    hbm_efficiency: float = 0.6
    layer_overhead_ms: float = 0.25  # fixed cost per decoder layer per eager decode step
    extract_factor: float = 1.0      # an extraction job / a bare forward of its prompts
    hook_forward_factor: float = 1.0  # scoring forwards under hooks.ablate / bare
    ablation_factor: float = 1.0     # ablation / plain generation (orthogonalised weights where exact)
    actadd_factor: float = 1.0       # actadd / plain generation (a bias where exact)
    batch: int = 32                  # GenerationSpec.batch_size: sizes the GPUs per model only
    max_batch: int = 256             # GenerationSpec.max_batch_size: generation batches sized from free memory
    fixed_batch: bool = False        # True: generation at `batch` (refdir before memory-sized batches)
    context_gb: float = 1.0          # CUDA context, cuBLAS workspaces: not free for batches
    eval_prompts_per_job: int = 100  # EvaluationSpec.prompts_per_job
    stage_overhead_s: float = 2.0    # Prefect task + Ray dispatch per stage per model
    source: str = "assumed"


def gpu_from_summary(summary: dict | None, source: str = "") -> Gpu:
    """Today's code paths: the spec's batch sizes, H200 per-token costs where measured, stated factors otherwise."""
    from refdir.schemas.spec import EvaluationSpec, GenerationSpec

    gen = GenerationSpec()
    g = Gpu(batch=gen.batch_size, max_batch=gen.max_batch_size, eval_prompts_per_job=EvaluationSpec().prompts_per_job)
    if not summary:
        return g

    def worst(key, default):
        v = summary.get(key)
        return default if v is None else max(v) if isinstance(v, list) else v

    return replace(g, mfu=summary["prefill_mfu"], hbm_efficiency=summary["hbm_efficiency"],
                   layer_overhead_ms=summary["layer_overhead_ms"],
                   extract_factor=worst("gpu_extraction_ratio", g.extract_factor),
                   hook_forward_factor=worst("hook_forward_ratio", g.hook_forward_factor),
                   ablation_factor=worst("generation_ratio", g.ablation_factor),
                   actadd_factor=worst("actadd_generation_ratio", g.actadd_factor), source=source)


def gpus_needed(a: Arch, g: Gpu, t: float) -> int:
    need = (2 * a.params + g.batch * (t + NEW_TOKENS) * a.kv_bytes_per_token()) * 1.1
    n = 1
    while n * g.mem_gb * 1e9 < need:
        n *= 2
    return n


def forward_s(a: Arch, g: Gpu, n: int, prompts: int, t: float) -> float:
    return prompts * t * a.flops_per_token(t / 2) / (g.mfu * g.peak_tflops * 1e12 * n)


def free_bytes(a: Arch, g: Gpu, n: int) -> int:
    """Free memory on the fullest of a model's n GPUs once its weights, the orthogonalisation snapshot (counted
    for every intervention) and the CUDA context are in."""
    return int(g.mem_gb * 1e9 - (2 * a.params + a.snapshot_bytes()) / n - g.context_gb * 1e9)


def gen_batches(a: Arch, g: Gpu, n: int, prompts: int, longest: int) -> list[int]:
    """Generation batch sizes of one job: refdir's sizing from free memory for its longest prompt (or fixed)."""
    if g.fixed_batch:
        return fixed_batches(prompts, g.batch)
    return plan_batches([longest] * prompts, free_bytes(a, g, n), a.gen_shape(n), NEW_TOKENS, g.max_batch)


def generate_s(a: Arch, g: Gpu, n: int, prompts: int, t: float, longest: int) -> float:
    total = 0.0
    for b in gen_batches(a, g, n, prompts, longest):
        ctx = t + NEW_TOKENS / 2
        compute = b * a.flops_per_token(ctx) / (g.mfu * g.peak_tflops * 1e12 * n)
        memory = (2 * a.params + b * ctx * a.kv_bytes_per_token()) / (g.hbm_tb_s * 1e12 * g.hbm_efficiency * n)
        step = max(compute, memory) + a.layers * g.layer_overhead_ms / 1000
        total += forward_s(a, g, n, b, t) + NEW_TOKENS * step
    return total


def stage_jobs(a: Arch, g: Gpu, n: int, t: float, longest: int) -> dict[str, list[float]]:
    """Seconds of each job of each stage on one actor of n GPUs (refdir's default job sizes)."""
    extract = [forward_s(a, g, n, k, t) * g.extract_factor for k in (64, 64, 64, 64, 32, 32)]
    cands = a.n_pos * (a.layers - 1)
    per_cand = forward_s(a, g, n, 32, t) * 3 * g.hook_forward_factor      # bypass + KL ablated, induce
    score = [min(16, cands - i) * per_cand for i in range(0, cands, 16)]
    factor = {"ablation": g.ablation_factor, "random_ablation": g.ablation_factor, "actadd": g.actadd_factor,
              "random_actadd": g.actadd_factor}
    k = g.eval_prompts_per_job
    evals = [generate_s(a, g, n, min(k, 100 - i), t, longest) * factor.get(iv, 1.0) for iv in INTERVENTIONS
             for i in range(0, 100, k)]
    damage = 3 * (forward_s(a, g, n, 100, t + NEW_TOKENS) + forward_s(a, g, n, 300, t))
    return {"extract": extract, "select": score, "evaluate": evals, "damage": [damage]}


def makespan(jobs: list[float], workers: int) -> float:
    """Longest-processing-time-first schedule of jobs on identical workers."""
    loads = [0.0] * max(1, min(workers, len(jobs)))
    for j in sorted(jobs, reverse=True):
        loads[loads.index(min(loads))] += j
    return max(loads)


def model_hours(a: Arch, g: Gpu, t: float, longest: int, n_total: int = N_GPUS) -> dict:
    """One model with its jobs spread over floor(n_total / g) actors (each loads the model once)."""
    n = gpus_needed(a, g, t)
    jobs = stage_jobs(a, g, n, t, longest)
    wall = 2 * a.params / (g.load_gb_s * 1e9) + 4 * g.stage_overhead_s + sum(
        makespan(v, n_total // n) for v in jobs.values())
    return {"model": a.name, "gpus": n, "hours": wall / 3600,
            "free_gb_per_gpu": round(free_bytes(a, g, n) / 1e9, 1),
            "generation_batches": gen_batches(a, g, n, min(g.eval_prompts_per_job, 100), longest),
            "stage_gpu_hours": {k: sum(v) * n / 3600 for k, v in jobs.items()}}


def estimate(g: Gpu, t: float, longest: int) -> dict:
    rows = [model_hours(a, g, t, longest) for a in PAPER_MODELS]
    gpu_h = {k: sum(r["stage_gpu_hours"][k] for r in rows) for k in rows[0]["stage_gpu_hours"]}
    return {"hours_8_gpus": sum(r["hours"] for r in rows), "models": rows, "stage_gpu_hours": gpu_h}


def prompt_tokens(lm, n: int = 96) -> tuple[float, int]:
    """(mean, longest) chat-formatted prompt length in tokens over builtin harmful + harmless, this tokenizer."""
    from benchmarks.common import prompts

    texts = [r["instruction"] for label in ("harmful", "harmless") for r in prompts(label, n)]
    lengths = lm.encode(texts)["attention_mask"].sum(dim=1)
    return float(lengths.sum()) / len(texts), int(lengths.max())


STATED = [
    "a model takes g GPUs (powers of 2) so that bf16 weights + KV cache at generation.batch_size + 10% fit in 141 GB",
    "generation batches: refdir's sizing (workers/batching.plan_batches) on the fullest of the model's GPUs, with "
    "141 GB less its share of the weights, of the orthogonalisation snapshot and 1 GB of CUDA context free, for "
    "the longest measured prompt + 512 new tokens, up to generation.max_batch_size and the job's prompts",
    "decode step at batch b: the per-layer overhead measured at batch 32 (fixed), the weights read once per step "
    "and the KV cache of b sequences read at the measured effective bandwidth, or compute at the prefill MFU if "
    "larger; measured at batch 32 only, so steps at other batches are this model's extrapolation",
    "weights load at load_gb_s; extraction costs extract_factor bare forwards; actadd through a bias costs what "
    "plain generation costs unless measured; stage_overhead_s of dispatch per stage",
    "models run one after another, each stage's jobs LPT-scheduled over floor(8 / g) actors",
]


def bench_scale(lm, *, quick: bool = False, gpu: dict | None = None) -> dict:
    summary = (gpu or {}).get("summary")
    g = gpu_from_summary(summary, f"measured: {gpu.get('file', '?')} ({gpu.get('date', '?')})" if summary else "")
    t, longest = prompt_tokens(lm, 8 if quick else 96)
    out = {"estimate": True, "goal_h": GOAL_H, "assumptions": {**asdict(g), "stated": STATED}, "prompt_tokens": t,
           "longest_prompt_tokens": longest, "new_tokens": NEW_TOKENS, **estimate(g, t, longest)}
    out["generation_batches"] = {r["model"]: r["generation_batches"] for r in out["models"]}
    out["what_it_takes"] = {   # the same estimate with one of today's settings or costs changed
        "fixed generation batch 32 (refdir before memory-sized batches)":
            estimate(replace(g, fixed_batch=True), t, longest)["hours_8_gpus"],
        "evaluation.prompts_per_job 50 (the default before 100)":
            estimate(replace(g, eval_prompts_per_job=50), t, longest)["hours_8_gpus"],
        "decode without the per-layer cost (compiled static-cache step)":
            estimate(replace(g, layer_overhead_ms=0.0), t, longest)["hours_8_gpus"]}
    logger.info("scale estimate: 13 models on %d GPUs %.2f h (goal %.1f h)", N_GPUS, out["hours_8_gpus"], GOAL_H)
    return out
