"""GPU check, part 2: the two-model spec through the real stages on Ray actors with num_gpus=1, in bf16.

    python benchmarks/gpu/pipeline.py ORGANISM_DIR OUT_DIR     # writes OUT_DIR/gpu_pipeline.json

Models: the refusal organism and a random-weight Qwen2.5-1.5B (real configuration, bf16), saved with
save_pretrained and loaded by the actors like any model. The stages run as `flows/stages.ModelRun`
drives them inside the Prefect tasks (extract -> aggregate -> select -> evaluate, jobs fanned out to Ray
actors); Prefect itself is left out here only because its wheels do not fit the GPU machine's transfer
limit, and the Prefect path is tested on CPU. Wall time per stage and the actors' device/dtype are
recorded.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.append(str(REPO))   # for tests.fixtures; refdir itself comes from the install or the shim


def random_qwen(folder: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from refdir.workers.families import get_family
    from tests.fixtures.tiny import build_tokenizer

    tok = build_tokenizer(["<|im_start|>", "<|im_end|>"], get_family("qwen2").chat_template)
    size = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                num_key_value_heads=2, vocab_size=151936)
    if not torch.cuda.is_available():   # a dry run of the script itself: a few MB
        size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=512)
    cfg = AutoConfig.for_model("qwen2", **size, max_position_embeddings=32768, tie_word_embeddings=True,
                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def main() -> None:
    from refdir.flows.cluster import actor_resources, ensure_ray
    from refdir.flows.stages import ModelRun, write_run_json
    from refdir.flows.summary import model_summary, versions
    from refdir.schemas.spec import (ComputeSpec, EvaluationSpec, ExtractionSpec, GenerationSpec, ModelSpec, PromptSpec,
                                     RunSpec, SelectionSpec, StoreSpec)
    from refdir.workers.identity import resolve_inputs
    from refdir.workers.prompts import draw_prompts
    from refdir.workers.store import Store

    organism, out = Path(sys.argv[1]), Path(sys.argv[2])
    work = Path(os.environ.get("REFDIR_GPU_WORK", "/tmp/refdir-gpu"))
    t0 = time.perf_counter()
    qwen = random_qwen(work / "qwen2.5-1.5b-random")
    save_s = time.perf_counter() - t0
    src = "builtin:organism_{}_{}"
    spec = RunSpec(
        name="gpu-two-model",
        models=[ModelSpec(key="organism", path=str(organism), dtype="bfloat16"),
                ModelSpec(key="qwen2.5-1.5b-random", path=str(qwen), family="qwen2", dtype="bfloat16")],
        prompts=PromptSpec(harmful_train=src.format("harmful", "train"), harmless_train=src.format("harmless", "train"),
                           harmful_val=src.format("harmful", "val"), harmless_val=src.format("harmless", "val"),
                           harmful_test=src.format("harmful", "test"), harmless_test=src.format("harmless", "test"),
                           n_train=128, n_val=32, n_test=64, filter_train=False, filter_val=False),
        extraction=ExtractionSpec(prompts_per_job=32, candidates_per_job=16),
        selection=SelectionSpec(allow_fallback=True),
        generation=GenerationSpec(max_new_tokens=64, batch_size=64),
        evaluation=EvaluationSpec(prompts_per_job=32),
        store=StoreSpec(uri=str(work / "store")),
        compute=ComputeSpec(gpus_per_worker=1.0, batch_size=64))
    spec = resolve_inputs(spec)   # the run id comes from the prompts' and models' content
    store = Store.open(spec.store)
    write_run_json(store, spec, versions())
    draw = draw_prompts(spec.prompts, spec.models)
    ensure_ray(spec.compute)
    import ray

    result = {"ray_gpus": ray.cluster_resources().get("GPU", 0), "actor_resources": actor_resources(spec.compute),
              "save_random_model_s": save_s, "models": {}}
    for m in spec.models:
        mr = ModelRun(spec, m.key, store, draw)
        times = {}
        t = time.perf_counter()
        mr.actors()
        times["actor_start_and_load_s"] = time.perf_counter() - t
        for stage in ("extract", "aggregate", "select", "evaluate"):
            t = time.perf_counter()
            getattr(mr, stage)()
            times[f"{stage}_s"] = time.perf_counter() - t
        info = dict(mr.info)
        mr.close()
        summary = model_summary(store, spec, m.key)
        result["models"][m.key] = {"device": info["device"], "dtype": info["dtype"], "family": info["family"],
                                   "n_layers": info["n_layers"], "d_model": info["d_model"], **times,
                                   "status": summary["status"], "direction": summary.get("direction"),
                                   "rates": summary["rates"]}
        print(json.dumps({m.key: result["models"][m.key]}, indent=1, default=str), flush=True)
    t = time.perf_counter()
    for m in spec.models:
        ModelRun(spec, m.key, store, draw).extract()     # rerun: manifests only
    result["rerun_extract_s"] = time.perf_counter() - t
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_pipeline.json").write_text(json.dumps(result, indent=2, default=str))
    ray.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
