"""`python -m benchmarks.run` (= `make bench`): every goal of the performance issue side by side, one process.

    python -m benchmarks.run                      # full run -> benchmarks/results/latest.json (+ latest-detail.json.tmp)
    python -m benchmarks.run --quick              # tiny sizes, one round: a smoke test (tests/test_benchmarks.py)
    python -m benchmarks.run --sections extraction,generation --out /tmp/x.json

Sections (a failing one is recorded under "errors" and the others go on):
  extraction   run_extract vs the bare last-logits forward (SmolLM2-135M-Instruct GGUF), one job and a stream
  aggregation  aggregate_means vs reading its inputs (markers + sums shards); peak RSS at 1x / 10x the data
  generation   ablation / actadd as evaluation runs them vs plain generate (benchmarks/generation.py)
  sql          `refdir sql` vs polars and pyarrow + numpy on the same activation shards (benchmarks/sql.py)
  scale        the 13-model ESTIMATE on 8 H200s from the H200 per-token costs in results/gpu-h200-*.json
  rerun        execute(spec) on a finished organism run, and a resume after losing k jobs (own process)
latest.json is small: the headline keys, each goal with its value and pass / miss, every round's seconds,
machine and load; each section's whole output goes to latest-detail.json.tmp (not committed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
               ("RAY_USAGE_STATS_ENABLED", "0"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
               ("TQDM_DISABLE", "1")):   # the GGUF loader's progress bar
    os.environ.setdefault(_k, _v)

from benchmarks.aggregation import Sizes  # noqa: E402
from benchmarks.common import REPO, THREADS, machine_info  # noqa: E402

logger = logging.getLogger(__name__)

SECTIONS = ("extraction", "aggregation", "generation", "sql", "scale", "rerun")
RESULTS = REPO / "benchmarks" / "results"
# headline key -> (section, key in the section's output, goal: value must be <= it)
GOALS = {"extraction_ratio": ("extraction", "ratio", 1.10),
         "gpu_extraction_ratio": ("gpu", "gpu_extraction_ratio", 1.5),
         "sql_ratio": ("sql", "sql_ratio", 1.2),
         "sql_layer_bytes_fraction": ("sql", "sql_layer_bytes_fraction", None),   # 1.5 / n_layers of the data
         "generation_ratio": ("generation", "generation_ratio", 1.03),
         "actadd_generation_ratio": ("generation", "actadd_generation_ratio", 1.03),
         "rerun_seconds": ("rerun", "rerun_seconds", 5.0),
         "scale_estimate_13_models_8_h200_hours": ("scale", "hours_8_gpus", 0.5),
         "peak_rss_ratio_10x": ("aggregation", "peak_rss_ratio_10x", 1.2)}
INFO = {"extraction_stream_ratio": ("extraction", "stream_ratio"), "extraction_cpu_ratio": ("extraction", "cpu_ratio"),
        "aggregation_vs_reading_inputs": ("aggregation", "ratio"), "aggregation_s": ("aggregation", "refdir_s"),
        "hook_generation_ratio": ("generation", "hook_generation_ratio"),
        "hook_actadd_generation_ratio": ("generation", "hook_actadd_generation_ratio"),
        "sql_cold_ratio": ("sql", "cold_ratio"),
        "resume_jobs_recomputed_of_k": ("rerun", "jobs_recomputed"), "rerun_files_changed": ("rerun", "rerun_files_changed")}


@dataclass(frozen=True)
class Plan:
    reps: int = 5
    extract_prompts: int = 16
    extract_batch: int = 8
    gen_prompts: int = 16
    gen_tokens: int = 32
    agg: Sizes = field(default_factory=Sizes)
    rerun_k: int = 3


QUICK = Plan(reps=1, extract_prompts=4, extract_batch=2, gen_prompts=4, gen_tokens=4,
             agg=Sizes(n_shards=4, prompts_per_shard=8, n_layers=4, n_pos=5, d=64), rerun_k=1)


class Bench:
    """Runs the chosen sections in order, sharing the SmolLM2 model between them."""

    def __init__(self, plan: Plan, args: argparse.Namespace, workdir: Path):
        self.plan, self.args, self.workdir = plan, args, workdir
        self.results: dict = {"errors": {}, "section_seconds": {}, "section_load_1min": {}}
        self._lm = None

    @property
    def lm(self):
        if self._lm is None:
            from benchmarks.common import load_bench_model

            self._lm = load_bench_model(self.args.quick)
        return self._lm

    def run(self, sections: list[str], after_each=lambda: None) -> None:
        for name in sections:
            t0 = time.perf_counter()
            logger.info("section %s ...", name)
            try:
                self.results[name] = getattr(self, f"_{name}")()
            except Exception:  # noqa: BLE001 - one broken section must not hide the others' numbers
                self.results["errors"][name] = traceback.format_exc()
                logger.error("section %s failed:\n%s", name, self.results["errors"][name])
            self.results["section_seconds"][name] = round(time.perf_counter() - t0, 1)
            self.results["section_load_1min"][name] = round(os.getloadavg()[0], 2)   # other processes' share
            after_each()   # the JSON so far: a long run stopped midway keeps its finished sections

    def _extraction(self) -> dict:
        from benchmarks.extraction import bench_extraction

        p = self.plan
        return bench_extraction(self.lm, self.workdir / "extraction", n_prompts=p.extract_prompts,
                                batch_size=p.extract_batch, reps=p.reps, profile_on_miss=self.args.profile)

    def _aggregation(self) -> dict:
        from benchmarks.aggregation import bench_aggregation

        return bench_aggregation(self.workdir / "aggregation", self.plan.agg, reps=self.plan.reps,
                                 profile_on_miss=self.args.profile)

    def _generation(self) -> dict:
        from benchmarks.generation import bench_generation

        p = self.plan
        return bench_generation(self.lm, n_prompts=p.gen_prompts, max_new_tokens=p.gen_tokens, batch_size=p.gen_prompts,
                                reps=p.reps, profile_on_miss=self.args.profile)

    def _sql(self) -> dict:
        from benchmarks.sql import section

        return section(self.workdir / "sql", self.args.quick, self.plan.reps)

    def _scale(self) -> dict:
        from benchmarks.scale import bench_scale

        gpu = latest_gpu()
        return bench_scale(self.lm, quick=self.args.quick, gpu=gpu)

    def _rerun(self) -> dict:
        from benchmarks.common import run_child

        return run_child(["-m", "benchmarks.rerun", str(self.workdir / "rerun"), "--k", str(self.plan.rerun_k),
                          "--reps", str(self.plan.reps)], timeout=1800)


def latest_gpu() -> dict | None:
    """The newest results/gpu-h200-*.json (H200 figures of benchmarks/gpu.py, summarised), with its file name."""
    files = sorted(RESULTS.glob("gpu-h200-*.json"))
    return {**json.loads(files[-1].read_text()), "file": files[-1].name} if files else None


def summarise(results: dict, quick: bool) -> dict:
    """Headline keys, goals with pass / miss, per-round seconds: what latest.json keeps."""
    def get(section, key):
        return (results.get(section) or {}).get(key)

    goals, headline = {}, {}
    for name, (section, key, goal) in GOALS.items():
        value = get(section, key)
        if name == "sql_layer_bytes_fraction" and results.get("sql"):
            goal = 1.5 / results["sql"]["sizes"]["n_layers"]
        status = "not run" if value is None else "quick" if quick else "pass" if value <= goal else "miss"
        headline[name] = value
        goals[name] = {"value": value, "goal": "<= 1.5 / n_layers" if goal is None else f"<= {goal:.4g}",
                       "status": status}
    goals["gpu_extraction_ratio"]["note"] = "no GPU lent to this run; benchmarks/gpu.py measures it on an H200"
    goals["scale_estimate_13_models_8_h200_hours"]["note"] = "an ESTIMATE from measured per-token costs, not a run"
    if results.get("scale"):
        goals["scale_estimate_13_models_8_h200_hours"]["assumptions"] = results["scale"]["assumptions"]
    for name, (section, _key, _goal) in GOALS.items():
        if section in results.get("errors", {}):
            goals[name]["status"] = "error"
    rounds = {s: {"wall": results[s].get("rounds"), "cpu": results[s].get("cpu_rounds")}
              for s in ("extraction", "aggregation", "generation") if results.get(s)}
    if results.get("sql"):
        rounds["sql"] = {q: results["sql"][q]["rounds"] for q in ("a", "b", "c")}
    return {**headline, "goals": goals, "info": {k: get(s, key) for k, (s, key) in INFO.items()}, "rounds": rounds,
            "errors": {s: msg.strip().splitlines()[-1] for s, msg in results.get("errors", {}).items()}}


def print_table(summary: dict, out: Path) -> None:
    m = summary["machine"]
    print(f"refdir benchmarks ({'quick' if summary['quick'] else 'full'}), {summary['date']}, {m['cores']} cores "
          f"{m['cpu_model']}, load {m['load_avg_start'][0]:.1f} -> {m['load_avg_end'][0]:.1f}, {summary['wall_s']:.0f} s")
    for name, g in summary["goals"].items():
        v = "n/a" if g["value"] is None else f"{g['value']:.4g}"
        print(f"  {name:40s} {v:>10s}  {g['goal']:>9s}  {g['status']}")
    for name, v in summary["info"].items():
        print(f"  {name:40s} {'n/a' if v is None else format(v, '.4g'):>10s}  (info)")
    for name, line in summary["errors"].items():
        print(f"  section {name} failed: {line}")
    print(f"JSON: {out}")


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description="refdir's performance goals side by side")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke test of the harness")
    p.add_argument("--sections", default=None,
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; --quick: all but rerun)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default results/latest.json, --quick: results/quick.json.tmp)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new temp folder, deleted)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per comparison (default 5, --quick 1)")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="no profile for a missed ratio")
    args = p.parse_args(argv)
    if args.sections is None:
        args.sections = ",".join(s for s in SECTIONS if not (args.quick and s == "rerun"))
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("REFDIR_BENCH_LOG", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "prefect", "transformers", "filelock", "botocore", "urllib3", "refdir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="refdir-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    plan = QUICK if args.quick else Plan()
    bench = Bench(replace(plan, reps=args.reps) if args.reps else plan, args, workdir)
    machine = machine_info()
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = args.out or (RESULTS / ("quick.json.tmp" if args.quick else "latest.json"))

    def save() -> dict:
        machine["load_avg_end"] = list(os.getloadavg())
        summary = {"date": date, "quick": args.quick, "wall_s": round(time.perf_counter() - t0, 1),
                   "machine": machine, **summarise(bench.results, args.quick),
                   "section_seconds": bench.results["section_seconds"],
                   "section_load_1min": bench.results["section_load_1min"]}
        write_json(out, summary)
        write_json(out.with_name(out.stem + "-detail.json.tmp"), bench.results)
        return summary

    try:
        bench.run(args.sections.split(","), after_each=save)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = save()
    print_table(summary, out)
    return summary


if __name__ == "__main__":
    main()
