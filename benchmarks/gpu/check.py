"""GPU check, part 1: extraction, scoring and generation throughput on random-weight models of real sizes.

    python benchmarks/gpu/check.py OUT_DIR          # on a CUDA machine; writes OUT_DIR/gpu_check.json

Throughput is a property of the architecture and size, not of the trained weights, so models are built
from real configurations (Llama-3-8B, Qwen2.5-7B) with random bf16 weights on the GPU; the tokenizer is a
small word-level one with the family's chat template (prompts of realistic length). Measured side by
side, each the median of 3 after a warm-up:
- extraction: refdir's job (resid_pre capture + refusal scores + Arrow + Parquet write) vs a bare forward
  pass over the same batches; tokens/s and ratio;
- generation: greedy generate under ablation hooks vs plain generate; new tokens/s and ratio;
- candidate scoring: seconds per candidate (bypass + induce + KL on 32 + 32 val prompts).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.append(str(REPO))   # for tests.fixtures; refdir itself comes from the install or the shim

CONFIGS = {
    "llama3-8b": ("llama3", dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                 max_position_embeddings=8192, rope_theta=500000.0)),
    "qwen2.5-7b": ("qwen2", dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 max_position_embeddings=32768)),
}


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Without a GPU (a dry run of the script itself) the configurations shrink to a few MB.
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int = 3) -> float:
    fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def build(name: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from refdir.workers.families import get_family
    from refdir.workers.model import from_model
    from tests.fixtures.tiny import build_tokenizer

    family, cfg = CONFIGS[name]
    cfg = cfg if DEVICE == "cuda" else {**cfg, **SMALL}
    fam = get_family(family)
    tok = build_tokenizer([t for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>",
                                       "<|im_start|>", "<|im_end|>")], fam.chat_template)
    config = AutoConfig.for_model(**cfg, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    return from_model(model, tok, family=family)


def bench_model(name: str, prompts: list[str], out_dir: Path) -> dict:
    from refdir.schemas.jobs import ExtractJob, Prompt, ScoreJob
    from refdir.schemas.spec import ModelSpec, StoreSpec
    from refdir.workers.evaluate import generate
    from refdir.workers.extract import run_extract
    from refdir.workers.hooks import ablate
    from refdir.workers.scoring import Baseline, score_candidate
    from refdir.workers.store import Store

    t0 = time.perf_counter()
    lm = build(name)
    load_s = time.perf_counter() - t0
    store = Store.open(str(out_dir / name))
    ps = [Prompt(prompt_id=i, instruction=p) for i, p in enumerate(prompts)]
    n_tokens = sum(int(lm.encode([p]).attention_mask.sum()) for p in prompts)
    batch = 64
    counter = iter(range(10**6))

    def extract():
        job = ExtractJob(run_id="gpu", model=ModelSpec(key=name, path="random"), store=StoreSpec(uri=store.uri),
                         split="train", label="harmful", index=next(counter), prompts=ps, batch_size=batch)
        run_extract(lm, store, job)

    def bare():
        with torch.inference_mode():
            for i in range(0, len(prompts), batch):
                lm.model(**lm.encode(prompts[i:i + batch]))

    t_ext, t_bare = timed(extract), timed(bare)

    def concurrent(k: int = 3):
        """k jobs at once, as a GPU actor with extract_concurrency=k runs them (threads, per-thread capture)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(k) as pool:
            list(pool.map(lambda _: extract(), range(k)))

    t_conc = timed(concurrent) / 3
    gen_prompts, new = prompts[:64], 64
    r = torch.randn(lm.d_model, device=DEVICE)

    def plain():
        generate(lm, gen_prompts, new, 64)

    def hooked():
        with ablate(lm, r):
            generate(lm, gen_prompts, new, 64)

    t_plain, t_hooked = timed(plain), timed(hooked)

    def ortho():
        from refdir.workers.evaluate import orthogonalized

        with orthogonalized(lm, r):
            generate(lm, gen_prompts, new, 64)

    t_ortho = timed(ortho)
    sj = ScoreJob(run_id="gpu", model=ModelSpec(key=name, path="random"), store=StoreSpec(uri=store.uri), index=0,
                  candidates=[(-1, 2)], harmful_val=ps[:32], harmless_val=ps[32:64], batch_size=64)
    base = Baseline.compute(lm, sj)
    t_score = timed(lambda: score_candidate(lm, r, lm.n_layers // 2, sj, base))
    res = {"model": name, "params_b": sum(p.numel() for p in lm.model.parameters()) / 1e9, "build_s": load_s,
           "n_prompts": len(prompts), "prompt_tokens": n_tokens, "batch": batch,
           "extract_s": t_ext, "bare_forward_s": t_bare, "extraction_ratio": t_ext / t_bare,
           "extract_concurrent3_s_per_job": t_conc, "extraction_ratio_concurrent3": t_conc / t_bare,
           "extract_tokens_per_s": n_tokens / t_ext, "forward_tokens_per_s": n_tokens / t_bare,
           "generate_plain_s": t_plain, "generate_hooked_s": t_hooked, "generation_ratio": t_hooked / t_plain,
           "generate_orthogonalized_s": t_ortho, "orthogonalized_generation_ratio": t_ortho / t_plain,
           "generate_new_tokens_per_s": len(gen_prompts) * new / t_plain,
           "generate_hooked_new_tokens_per_s": len(gen_prompts) * new / t_hooked,
           "score_s_per_candidate": t_score,
           "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None}
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return res


def main() -> None:
    from refdir.workers.prompts import load_source

    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    prompts = [r["instruction"] for r in load_source("builtin:harmful") + load_source("builtin:harmless")][:128]
    results = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (dry run, small configs)",
               "torch": torch.__version__, "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CONFIGS:
            res = bench_model(name, prompts, Path(tmp))
            print(json.dumps(res, indent=1), flush=True)
            results["models"].append(res)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
