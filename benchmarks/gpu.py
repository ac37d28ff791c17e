"""The one prepared GPU script: what `make bench` cannot measure here, at Llama-3-8B's shape on a lent H200.

    python -m benchmarks.gpu --prepare    # here: pydantic wheels + SmolLM2's tokenizer into build/bench-gpu
    python3 -m benchmarks.gpu             # device tool, carry ["build/bench-gpu"]: < 8 min, writes $OUT/gpu.json
    python -m benchmarks.gpu --dry-run    # here, CPU, tiny shapes: the same code path (tests/test_benchmarks.py)

The device has torch and transformers but no pydantic and no network; refdir is not installed there, so
`bootstrap` installs the carried wheels into a temp folder and maps the refdir namespace onto the checkout.
Model: random bf16 weights in Llama-3-8B's shape (32 layers, d=4096, GQA 32/8, MLP 14336) with SmolLM2's
vocabulary, so SmolLM2's tokenizer, chat template and positions apply (throughput is a property of the shape,
not of the weights). Measured, each side by side and interleaved (benchmarks.common.paired / the sections):
- extraction (`benchmarks.extraction.bench_extraction`): run_extract vs the bare forward with last-position
  logits, one job at a time and `jobs` jobs in flight through the actor's writer -> gpu_extraction_ratio;
- generation (`benchmarks.generation.bench_generation`, the evaluation engineer's section): plain vs ablation
  through orthogonalised weights vs ablation hooks, actadd through a bias vs the actadd hook;
- decode: refdir's generate with HF's static KV cache (compiled decode step) vs the default dynamic cache;
- decode step of this model and of a 32 x 1024 model at the generation batch: the fixed per-layer cost and
  the effective HBM bandwidth the 13-model estimate (benchmarks/scale.py) uses; prefill MFU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "build" / "bench-gpu"
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection")
LLAMA3_8B = dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8)
SMALL = dict(LLAMA3_8B, hidden_size=1024, intermediate_size=3584, num_attention_heads=8)
DRY = dict(LLAMA3_8B, num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
           num_key_value_heads=2)
DRY_SMALL = dict(DRY, hidden_size=64, intermediate_size=128)
PEAK_TFLOPS = 989.0     # H200 dense bf16, datasheet


def prepare(python_version: str = "3.12") -> None:
    """Download the pydantic wheels for the device's Python and save SmolLM2's tokenizer under build/."""
    import importlib.metadata as md

    from transformers import AutoTokenizer

    from benchmarks.common import SMOLLM2_GGUF, smollm2_folder

    pins = [f"{name}=={md.version(name)}" for name in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    python_version, "--platform", "manylinux2014_x86_64", "-d", str(ASSETS / "wheels"), *pins],
                   check=True)
    AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF).save_pretrained(ASSETS / "tokenizer")
    print(f"assets in {ASSETS}: carry it to the device")


def bootstrap() -> None:
    """Make `import refdir.*` and pydantic work where refdir is not installed."""
    try:
        import pydantic  # noqa: F401
    except ImportError:
        target = Path(tempfile.gettempdir()) / "refdir-gpu-deps"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(target), *map(str, sorted((ASSETS / "wheels").glob("*.whl")))], check=True)
        sys.path.insert(0, str(target))
    try:
        import refdir.workers  # noqa: F401
    except ImportError:   # the repo's refdir/ holds only the top package: map the rest onto the checkout
        pkg = Path(tempfile.gettempdir()) / "refdir-gpu-ns" / "refdir"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text((REPO / "refdir" / "__init__.py").read_text())
        for part in ("workers", "schemas", "flows"):
            if not (pkg / part).exists():
                (pkg / part).symlink_to(REPO / part)
        sys.modules.pop("refdir", None)
        sys.path.insert(0, str(pkg.parent))
        import refdir.workers  # noqa: F401,F811 - fails loudly here if the mapping did not work


def tokenizer():
    from transformers import AutoTokenizer

    if (ASSETS / "tokenizer").is_dir():
        return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    from benchmarks.common import SMOLLM2_GGUF, smollm2_folder   # here (dry run): straight from the GGUF

    return AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)


def build(config: dict, tok, device: str):
    """A random-weight Llama of `config` (bf16 on GPU, float32 on CPU) as a refdir LoadedModel (smollm2 family)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from refdir.schemas.spec import ModelSpec
    from refdir.workers.model import from_model

    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **config)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    name = f"llama-{config['num_hidden_layers']}x{config['hidden_size']}"
    return from_model(model, tok, spec=ModelSpec(key=name, path=name, dtype=str(dtype).replace("torch.", "")),
                      family="smollm2")


def _generate_s(lm, texts: list[str], new_tokens: int, reps: int, cache: str | None = None) -> list[float]:
    """Seconds of refdir's generate (exactly new_tokens per sequence) per round, with cache_implementation=cache."""
    from benchmarks.common import sync
    from benchmarks.generation import fixed_length
    from refdir.workers.evaluate import generate

    cfg = lm.model.generation_config
    old, cfg.cache_implementation = cfg.cache_implementation, cache
    out = []
    try:
        with fixed_length(lm, new_tokens):
            for r in range(reps + 1):      # round 0 warms up (and compiles the static-cache decode step)
                sync()
                t0 = time.perf_counter()
                generate(lm, texts, new_tokens, len(texts))
                sync()
                out.append(time.perf_counter() - t0)
    finally:
        cfg.cache_implementation = old
    return out


def static_vs_eager(lm, texts: list[str], new_tokens: int, reps: int) -> dict:
    """HF's static KV cache (generate compiles its decode step on CUDA) vs the dynamic cache, same tokens."""
    import statistics

    static = _generate_s(lm, texts, new_tokens, reps, "static")
    eager = _generate_s(lm, texts, new_tokens, reps, None)
    s, e = statistics.median(static[1:]), statistics.median(eager[1:])
    return {"static_compiled_s": s, "eager_s": e, "ratio": s / e, "first_static_round_s": static[0],
            "rounds": {"static_compiled": static[1:], "eager": eager[1:]}, "batch": len(texts), "new_tokens": new_tokens}


def decode_step(lm, texts: list[str], new_tokens: int, reps: int) -> dict:
    """Seconds per decode step at batch len(texts): (new_tokens-token - 1-token generate) / (new_tokens - 1)."""
    import statistics

    tn = statistics.median(_generate_s(lm, texts, new_tokens, reps)[1:])
    t1 = statistics.median(_generate_s(lm, texts, 1, reps)[1:])
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    return {"step_s": (tn - t1) / (new_tokens - 1), "weight_bytes": weight_bytes, "layers": lm.n_layers,
            "batch": len(texts)}


def fit_decode(big: dict, small: dict, hbm_tb_s: float = 4.8) -> dict:
    """step = layers x overhead + bytes / bandwidth, solved from two models of the same depth."""
    bw = (big["weight_bytes"] - small["weight_bytes"]) / max(big["step_s"] - small["step_s"], 1e-9)
    overhead = (big["step_s"] - big["weight_bytes"] / bw) / big["layers"]
    return {"effective_hbm_tb_s": bw / 1e12, "hbm_efficiency": bw / (hbm_tb_s * 1e12), "layer_overhead_ms": overhead * 1e3}


def run(reps: int, dry: bool, work: Path) -> dict:
    import torch

    from benchmarks.common import machine_info, prompts
    from benchmarks.extraction import bench_extraction
    from benchmarks.generation import bench_generation
    from benchmarks.scale import Arch

    device = "cpu" if dry else "cuda"
    big_cfg, small_cfg = (DRY, DRY_SMALL) if dry else (LLAMA3_8B, SMALL)
    n, batch, new_tokens = (8, 4, 4) if dry else (128, 32, 64)    # generation batch: GenerationSpec.batch_size
    tok = tokenizer()
    lm = build(big_cfg, tok, device)
    res: dict = {"date": time.strftime("%Y-%m-%d"), "dry_run": dry, "machine": machine_info(),
                 "device": torch.cuda.get_device_name(0) if not dry else "CPU (dry run, tiny shapes)",
                 "model": f"random {lm.spec.dtype}, {'tiny' if dry else 'Llama-3-8B'} shape, SmolLM2 vocabulary"}
    res["extraction"] = bench_extraction(lm, work / "store", n_prompts=n, batch_size=batch, reps=reps, jobs=3,
                                         profile_on_miss=False)
    ext, c = res["extraction"], big_cfg
    arch = Arch("gpu", c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                c["num_key_value_heads"], c["hidden_size"] // c["num_attention_heads"], len(tok), False, 5)
    flops = ext["tokens"] * arch.flops_per_token(ext["tokens"] / n / 2, logits=False)
    res["prefill"] = {"tokens": ext["tokens"], "mfu": flops / ext["bare_s"] / (PEAK_TFLOPS * 1e12)}
    res["generation"] = bench_generation(lm, n_prompts=batch, max_new_tokens=new_tokens, batch_size=batch,
                                         reps=reps, profile_on_miss=False)
    texts = [r["instruction"] for r in prompts("harmful", batch)]
    res["static_cache"] = static_vs_eager(lm, texts, new_tokens, reps)
    big = decode_step(lm, texts, new_tokens, reps)
    del lm
    if not dry:
        torch.cuda.empty_cache()
    small = decode_step(build(small_cfg, tok, device), texts, new_tokens, reps)
    res["decode"] = {"llama3_8b_shape": big, "small_32x1024": small, "fit": fit_decode(big, small)}
    res["summary"] = summary(res)
    return res


def summary(res: dict) -> dict:
    """The figures latest.json and the README quote (the full sections stay in gpu.json)."""
    ext, gen, fit = res["extraction"], res["generation"], res["decode"]["fit"]
    return {"date": res["date"], "device": res["device"], "commit": res["machine"].get("git", {}).get("commit"),
            "gpu_extraction_ratio": ext["stream_ratio"], "extraction_ratio_one_job": ext["ratio"],
            "generation_ratio": gen.get("generation_ratio"), "actadd_generation_ratio": gen.get("actadd_generation_ratio"),
            "hook_generation_ratio": gen.get("hook_generation_ratio"),
            "hook_actadd_generation_ratio": gen.get("hook_actadd_generation_ratio"),
            "static_cache_decode_ratio": res["static_cache"]["ratio"], "prefill_mfu": res["prefill"]["mfu"],
            "decode_step_s_8b_batch32": res["decode"]["llama3_8b_shape"]["step_s"],
            "layer_overhead_ms": fit["layer_overhead_ms"], "hbm_efficiency": fit["hbm_efficiency"]}


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--prepare", action="store_true", help="here: download wheels, save the tokenizer")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check the script here")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu.json")
    p.add_argument("--reps", type=int, default=None, help="rounds per comparison (default 5; dry run 1)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    if args.prepare:
        prepare()
        return None
    bootstrap()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: run it on the lent GPU machine, or use --dry-run here")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = run(args.reps or (1 if args.dry_run else 5), args.dry_run, Path(tmp))
    res["wall_s"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res["summary"], indent=1))
    return res


if __name__ == "__main__":
    main()
