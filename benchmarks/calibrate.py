"""GPU calibration on the lent H200: the extraction and generation ratios at a real model size, prefill MFU and
the decode step cost, for the scale estimate. Not part of `make bench` (this CPU machine has no GPU).

    python -m benchmarks.calibrate --prepare                 # here: wheels + SmolLM2 tokenizer into build/bench-calibrate
    # there (device tool, carry ["build/bench-calibrate"]):
    python3 -m benchmarks.calibrate      # ~3.5 min; writes $OUT/calibration-h200.json: copy it to benchmarks/results/

The device image has torch and transformers but not pydantic, and no network: `--prepare` downloads the
pydantic wheels for its Python (3.12) with pip and saves SmolLM2's tokenizer (the 98 MB GGUF cannot travel);
on the device the wheels are installed into a temp folder and the refdir namespace is mapped from the
repository's folders (it is not pip-installed there).

Model: random bf16 weights in Llama-3-8B's shape (32 layers, d=4096, GQA 32/8, MLP 14336) with SmolLM2's
vocabulary (49152) so SmolLM2's tokenizer, chat template and post-instruction positions apply (the smollm2
family). Measured, each side by side and interleaved like the CPU benchmark:
- extraction: `run_extract` (64 prompts, batch 32, float32 shards) vs bare forward, vs last-logits forward;
- generation: 32 prompts x 64 new tokens inside `hooks.ablate` vs plain, and with orthogonalised weights;
- scoring forward: one batch of 32 under `hooks.ablate` vs bare;
- decode step: (64-token generate - 1-token generate) / 63, for this model and a 32-layer d=1024 model;
  the pair gives the per-layer fixed overhead and the effective HBM bandwidth (`decode_fit`).
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
ASSETS = REPO / "build" / "bench-calibrate"
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection")
LLAMA3_8B = dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8)
SMALL = dict(num_hidden_layers=32, hidden_size=1024, intermediate_size=3584, num_attention_heads=8,
             num_key_value_heads=8)
# --dry-run: the same script on CPU with tiny models, to check it here before spending device time
DRY_BIG = dict(LLAMA3_8B, num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
               num_key_value_heads=2)
DRY_SMALL = dict(DRY_BIG, hidden_size=64, intermediate_size=128)


# ---------------------------------------------------------------- here: assets for the device

def prepare(python_version: str = "3.12") -> None:
    """Download the pydantic wheels for the device's Python and save SmolLM2's tokenizer under build/."""
    import importlib.metadata as md

    wheels = ASSETS / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={md.version(name)}" for name in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    python_version, "--platform", "manylinux2014_x86_64", "-d", str(wheels), *pins], check=True)
    from transformers import AutoTokenizer

    from benchmarks.common import SMOLLM2_GGUF, smollm2_folder

    AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF).save_pretrained(ASSETS / "tokenizer")
    print(f"assets in {ASSETS}: carry it to the device")


# ---------------------------------------------------------------- there: bootstrap

def bootstrap() -> None:
    """Make `import refdir.*` and pydantic work on a machine where refdir is not installed."""
    try:
        import pydantic  # noqa: F401
    except ImportError:
        target = Path(tempfile.gettempdir()) / "refdir-gpu-deps"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(target), *map(str, sorted((ASSETS / "wheels").glob("*.whl")))], check=True)
        sys.path.insert(0, str(target))
    try:
        import refdir.workers  # noqa: F401
    except ImportError:   # not installed: the repo's refdir/ holds only the top package; map the rest
        ns = Path(tempfile.gettempdir()) / "refdir-gpu-ns"
        pkg = ns / "refdir"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text((REPO / "refdir" / "__init__.py").read_text())
        for part in ("workers", "schemas", "flows"):
            link = pkg / part
            if not link.exists():
                link.symlink_to(REPO / part)
        sys.modules.pop("refdir", None)       # the repo's bare refdir/ may be imported already
        sys.path.insert(0, str(ns))
        import refdir.workers  # noqa: F401,F811 - fails loudly here if the mapping did not work


def build(config: dict, tokenizer, device: str = "cuda"):
    """A random-weight Llama of `config` (bf16 on GPU, float32 on CPU) as a refdir LoadedModel (smollm2 family)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from refdir.schemas.spec import ModelSpec
    from refdir.workers.model import from_model

    cfg = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    name = f"llama-{config['num_hidden_layers']}x{config['hidden_size']}"
    spec = ModelSpec(key=name, path=name, dtype="bfloat16" if device == "cuda" else "float32")
    return from_model(model, tokenizer, spec=spec, family="smollm2")


def _params(lm) -> int:
    return sum(p.numel() for p in lm.model.parameters())


def _gen_seconds(lm, texts: list[str], new_tokens: int, reps: int = 3) -> float:
    """Median seconds of refdir's generate with exactly new_tokens tokens per sequence."""
    from benchmarks.common import median, sync
    from benchmarks.generation import fixed_length
    from refdir.workers.evaluate import generate

    times = []
    with fixed_length(lm, new_tokens):
        for r in range(reps + 1):
            sync()
            t0 = time.perf_counter()
            generate(lm, texts, new_tokens, len(texts))
            sync()
            if r:
                times.append(time.perf_counter() - t0)
    return median(times)


def decode_step(lm, texts: list[str], new_tokens: int = 64) -> dict:
    """Seconds per decode step at batch len(texts): (new_tokens-token - 1-token generate) / (new_tokens - 1)."""
    tn, t1 = _gen_seconds(lm, texts, new_tokens), _gen_seconds(lm, texts, 1)
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    return {"step_s": (tn - t1) / (new_tokens - 1), "prefill_plus_first_s": t1, "weight_bytes": weight_bytes,
            "layers": lm.n_layers, "batch": len(texts)}


def fit_decode(big: dict, small: dict) -> dict:
    """step = layers x overhead + bytes / bandwidth, solved from two models of the same depth."""
    bw = (big["weight_bytes"] - small["weight_bytes"]) / max(big["step_s"] - small["step_s"], 1e-9)
    overhead = (big["step_s"] - big["weight_bytes"] / bw) / big["layers"]
    return {"effective_hbm_tb_s": bw / 1e12, "hbm_efficiency": bw / 4.8e12, "layer_overhead_ms": overhead * 1e3}


def orthogonalized_generation(lm, texts: list[str], new_tokens: int, reps: int) -> dict:
    from benchmarks.common import Case, paired, ratio
    from benchmarks.generation import fixed_length, random_direction
    from refdir.workers.evaluate import generate, orthogonalized

    r = random_direction(lm.d_model).to(lm.device)

    def ortho(_a) -> None:
        with orthogonalized(lm, r):
            generate(lm, texts, new_tokens, len(texts))

    with fixed_length(lm, new_tokens):
        times = paired({"orthogonalized": Case(ortho), "plain": Case(lambda _a: generate(lm, texts, new_tokens,
                                                                                          len(texts)))}, reps)
    return ratio(times, "orthogonalized", "plain")


def ablated_forward(lm, texts: list[str], reps: int) -> dict:
    import torch

    from benchmarks.common import Case, paired, ratio
    from benchmarks.generation import random_direction
    from refdir.workers.hooks import ablate

    enc = lm.encode(texts)
    r = random_direction(lm.d_model).to(lm.device)

    def bare(_a) -> None:
        with torch.inference_mode():
            lm.model(**enc, logits_to_keep=1)

    def hooked(_a) -> None:
        with ablate(lm, r), torch.inference_mode():
            lm.model(**enc, logits_to_keep=1)

    return ratio(paired({"ablated": Case(hooked), "bare": Case(bare)}, reps), "ablated", "bare")


def run(out: Path, reps: int, dry: bool = False) -> dict:
    import torch
    from transformers import AutoTokenizer

    from benchmarks.common import prompts
    from benchmarks.extraction import bench_extraction
    from benchmarks.generation import bench_generation
    from benchmarks.scale import Arch

    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    device = "cpu" if dry else "cuda"
    big_cfg, small_cfg = (DRY_BIG, DRY_SMALL) if dry else (LLAMA3_8B, SMALL)
    n, new_tokens = (8, 4) if dry else (64, 64)
    result: dict = {"device": "dry run (CPU)" if dry else torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"),
                    "torch": torch.__version__, "model": "random bf16, Llama-3-8B shape, SmolLM2 vocab"}
    lm = build(big_cfg, tok, device)
    result["params"] = _params(lm)
    with tempfile.TemporaryDirectory() as tmp:
        ext = bench_extraction(lm, Path(tmp) / "store", n_prompts=n, batch_size=n // 2, reps=reps, profile_on_miss=False)
    result["extraction"] = ext
    c = big_cfg
    arch = Arch("gpu", c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                c["num_key_value_heads"], c["hidden_size"] // c["num_attention_heads"], len(tok), False, 5)
    tokens = ext["tokens"]
    peak = 989e12
    result["prefill"] = {"model": "Llama-3-8B shape", "tokens": tokens, "peak_tflops": 989,
                         "mfu": tokens * arch.flops_per_token(tokens / n / 2) / ext["bare_s"] / peak,
                         "mfu_last_logits": tokens * arch.flops_per_token(tokens / n / 2, logits=False)
                         / ext["last_logits_s"] / peak}
    texts = [r["instruction"] for r in prompts("harmful", n // 2)]
    result["generation"] = bench_generation(lm, n_prompts=n // 2, max_new_tokens=new_tokens, batch_size=n // 2,
                                            reps=reps)
    result["orthogonalized_generation"] = orthogonalized_generation(lm, texts, new_tokens, reps)
    result["ablated_forward"] = ablated_forward(lm, texts, reps)
    big = decode_step(lm, texts, new_tokens)
    del lm
    if not dry:
        torch.cuda.empty_cache()
    small = decode_step(build(small_cfg, tok, device), texts, new_tokens)
    result["decode"] = {"llama3_8b_shape": big, "small_32x1024": small}
    result["decode_fit"] = fit_decode(big, small)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--prepare", action="store_true", help="here: download wheels, save the tokenizer")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "calibration-h200.json")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models: check the script here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    if args.prepare:
        prepare()
        return
    bootstrap()
    res = run(args.out, args.reps, dry=args.dry_run)
    print(json.dumps({k: res[k] for k in ("device", "params", "prefill", "decode_fit")}, default=str))
    for k in ("extraction", "generation", "orthogonalized_generation", "ablated_forward"):
        print(k, {x: res[k][x] for x in res[k] if "ratio" in x or x.endswith("_s")})


if __name__ == "__main__":
    main()
