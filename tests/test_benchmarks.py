"""The benchmark harness: `python -m benchmarks.run --quick` end to end, the GPU script's dry run, pure parts.

- the quick run (tiny sizes, every section but rerun) exits 0 and writes a small latest.json: every goal of
  the performance issue with value and status, per-round seconds, no section errors, means equal to numpy's;
- `python -m benchmarks.gpu --dry-run` runs the one GPU script's whole code path on CPU at tiny shapes;
- the quick run, the dry run and the rerun section (Prefect + Ray + the organism) are slow and marked so
  (minutes each on 2 cores: every section loads SmolLM2 or writes shards);
- timing, scheduling, parameter counts and the decode fit are checked on known numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.common import Case, paired, ratio
from benchmarks.gpu import fit_decode
from benchmarks.run import GOALS
from benchmarks.scale import PAPER_MODELS, Gpu, estimate, free_bytes, gen_batches, gpus_needed, makespan

REPO = Path(__file__).resolve().parents[1]


def run_bench(tmp_path: Path, *args: str, timeout: float) -> tuple[dict, float]:
    out = tmp_path / "bench.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out), "--workdir",
                           str(tmp_path / "work"), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), wall


@pytest.mark.slow
def test_quick_run_writes_every_goal(tmp_path):
    res, wall = run_bench(tmp_path, timeout=600)
    assert res["errors"] == {}, res["errors"]
    assert set(res["goals"]) == set(GOALS)
    for key in GOALS:
        assert key in res
    for key in ("extraction_ratio", "generation_ratio", "actadd_generation_ratio", "sql_ratio",
                "sql_layer_bytes_fraction", "peak_rss_ratio_10x", "scale_estimate_13_models_8_h200_hours"):
        assert isinstance(res[key], float) and res[key] > 0, key
        assert res["goals"][key]["status"] == "quick"
    assert res["rerun_seconds"] is None and res["goals"]["rerun_seconds"]["status"] == "not run"
    assert res["gpu_extraction_ratio"] is None            # no GPU here
    ext = res["rounds"]["extraction"]["wall"]
    assert set(ext) == {"refdir", "bare", "stream"} and all(len(v) == 1 for v in ext.values())
    assert res["info"]["extraction_stream_ratio"] > 0 and res["info"]["aggregation_vs_reading_inputs"] > 0
    m = res["machine"]
    assert m["cores"] >= 1 and m["torch_threads"] == 2 and len(m["load_avg_end"]) == 3
    detail = json.loads((tmp_path / "bench-detail.json.tmp").read_text())
    assert detail["aggregation"]["max_abs_diff_vs_numpy"] < 1e-9     # aggregate_means == numpy's float64 means
    assert detail["extraction"]["rows_per_job"] == 4 * 2 * 6         # prompts x layers x positions
    bpv = detail["extraction"]["breakdown"]
    assert 0 < bpv["bytes_per_value_float16"] < bpv["bytes_per_value_float32"] <= 4.5
    assert len(json.dumps(res)) < 30_000                             # latest.json stays a summary


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path):
    """The one prepared GPU script, whole code path, on CPU at tiny shapes (no device time spent)."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--out", str(tmp_path / "gpu.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    s = res["summary"]
    assert res["dry_run"] and s["commit"]
    for key in ("gpu_extraction_ratio", "extraction_ratio_one_job", "generation_ratio", "actadd_generation_ratio",
                "hook_generation_ratio", "static_cache_decode_ratio", "prefill_mfu", "decode_step_s_8b_batch32"):
        assert isinstance(s[key], float) and s[key] > 0, key


def test_bad_section_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--sections", "extraction,nope"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "nope" in proc.stderr


@pytest.mark.slow
def test_rerun_section_recomputes_exactly_the_lost_jobs(tmp_path):
    res, _ = run_bench(tmp_path, "--sections", "rerun", timeout=600)
    assert res["errors"] == {}
    assert res["rerun_seconds"] < 5 and res["goals"]["rerun_seconds"]["status"] == "quick"
    rr = json.loads((tmp_path / "bench-detail.json.tmp").read_text())["rerun"]   # latest.json is the summary
    assert rr["rerun_status"] == "done" and rr["rerun_files_changed"] == 0 and rr["rerun_seconds"] < 5
    assert rr["jobs_recomputed"] == rr["k"] == 1 and rr["recomputed_are_lost"]


def test_paired_interleaves_and_ratio_uses_rounds():
    order: list[str] = []
    times = paired({"a": Case(lambda _x: (order.append("a"), time.sleep(0.04))),
                    "b": Case(lambda _x: (order.append("b"), time.sleep(0.01)))}, reps=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert len(times["a"]) == len(times["b"]) == 3
    r = ratio(times, "a", "b")
    assert 1.5 < r["ratio"] < 8 and r["a_s"] > r["b_s"]   # 4x nominal; sleeps only overshoot


def test_makespan_is_longest_processing_time_first():
    assert makespan([3, 3, 2, 2, 2], 2) == 7        # LPT, not the optimum (6): the estimate is not optimistic
    assert makespan([4, 1, 1, 1, 1], 2) == 4
    assert makespan([5, 1, 1], 8) == 5
    assert makespan([1] * 10, 1) == 10


def test_paper_model_sizes_and_gpu_counts():
    by_name = {a.name: a for a in PAPER_MODELS}
    assert len(PAPER_MODELS) == 13
    for name, billions in (("Llama-2-7B-chat", 6.74), ("Llama-3-8B-Instruct", 8.03), ("Llama-2-70B-chat", 68.98),
                           ("Gemma-2B-it", 2.51), ("Yi-34B-chat", 34.39)):     # the models' published sizes
        assert abs(by_name[name].params / 1e9 - billions) / billions < 0.02, name
    g = Gpu()
    assert gpus_needed(by_name["Llama-3-70B-Instruct"], g, 40) == 2
    assert gpus_needed(by_name["Yi-34B-chat"], g, 40) == 1
    fixed, sized = estimate(Gpu(fixed_batch=True), 40.0, 80), estimate(g, 40.0, 80)
    jobs50 = estimate(Gpu(eval_prompts_per_job=50), 40.0, 80)      # two batches per (test set, intervention)
    fast = estimate(Gpu(layer_overhead_ms=0.0), 40.0, 80)
    assert fast["hours_8_gpus"] < sized["hours_8_gpus"] < jobs50["hours_8_gpus"] < fixed["hours_8_gpus"]
    assert max(fixed["stage_gpu_hours"], key=fixed["stage_gpu_hours"].get) == "evaluate"


def test_scale_sizes_generation_batches_from_the_memory_the_weights_leave():
    """Free memory and batch sizes written out from the public configs (bf16, 141 GB per H200, 1 GB context)."""
    by_name, g = {a.name: a for a in PAPER_MODELS}, Gpu()
    # Llama-3-8B on one GPU: params 32 x (4096 x (2x32x128 + 2x8x128) + 3 x 4096 x 14336) + 2 x 4096 x 128256
    params = 32 * (4096 * 10240 + 3 * 4096 * 14336) + 2 * 4096 * 128256
    assert params == 8_029_995_008
    snapshot = 2 * (4096 * 128256 + 32 * 4096 * (32 * 128 + 14336))   # embeddings, attention-out, MLP-down
    assert free_bytes(by_name["Llama-3-8B-Instruct"], g, 1) == 141_000_000_000 - 2 * params - snapshot - 10**9
    assert gen_batches(by_name["Llama-3-8B-Instruct"], g, 1, 50, 80) == [50]     # ~560 fit: the job's 50
    assert gen_batches(by_name["Llama-3-8B-Instruct"], g, 1, 100, 80) == [100]   # the paper's 100 test prompts
    # Qwen-72B (no GQA: 64 kv heads) on two GPUs, 40 layers each, remote code (every prompt position's logits,
    # config intermediate_size 49152 = 2 x 24576), longest prompt 80 tokens + 512 new = 592
    params = 80 * (8192 * 4 * 64 * 128 + 3 * 8192 * 24576) + 2 * 8192 * 152064
    snapshot = 2 * (8192 * 152064 + 80 * 8192 * (64 * 128 + 24576))
    free = 141_000_000_000 - (2 * params + snapshot) // 2 - 10**9
    assert free == 44_994_820_096
    kv = 2 * 64 * 128 * 2 * 592 * (40 + 1)
    logits = 80 * 152064 * (2 + 4) + 152064 * 4
    work = 80 * (4 * 8192 + 3 * 64 * 128 + 3 * 49152) * 2 + 64 * 80 * 592 * (2 + 4)
    fit = int((0.6 * free - 2**30) // (kv + logits + work))
    assert fit == 28
    assert gen_batches(by_name["Qwen-72B-chat"], g, 2, 50, 80) == [28, 22]
    assert gen_batches(by_name["Qwen-72B-chat"], g, 2, 100, 80) == [28, 28, 28, 16]
    assert gen_batches(by_name["Qwen-72B-chat"], Gpu(fixed_batch=True), 2, 50, 80) == [32, 18]


def test_decode_fit_recovers_bandwidth_and_overhead():
    bw, c = 3.0e12, 0.2e-3                                         # bytes/s, s per layer
    big = {"weight_bytes": 16e9, "layers": 32, "step_s": 32 * c + 16e9 / bw}
    small = {"weight_bytes": 1e9, "layers": 32, "step_s": 32 * c + 1e9 / bw}
    fit = fit_decode(big, small)
    assert fit["effective_hbm_tb_s"] == pytest.approx(3.0)
    assert fit["layer_overhead_ms"] == pytest.approx(0.2)
