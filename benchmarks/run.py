"""`python -m benchmarks.run` (= `make bench`): every stage against its limit, one process, one table + JSON.

    python -m benchmarks.run                      # full run, ~10-15 min on 2 cores -> benchmarks/results/latest.json
    python -m benchmarks.run --quick              # tiny sizes, < 60 s (the smoke test) -> results/quick.json.tmp
    python -m benchmarks.run --sections extraction,generation --out /tmp/x.json

Sections (each failure is recorded under "errors" and the others go on):
  aggregation  aggregate_means vs numpy over the same activations in memory; reference scan; peak RSS 1x/10x
  extraction   run_extract vs a bare HF forward pass over the same batches (SmolLM2-135M-Instruct GGUF)
  storage      bytes/value, write and scan MB/s, local folder vs S3 (moto on loopback)
  generation   generate inside hooks.ablate vs plain generate
  scale        the paper's 13 models on 1/8/32 GPUs from measured per-token costs (+ results/calibration-h200.json)
  rerun        execute(spec) on a finished organism run, and a resume after losing k jobs (own process)
The JSON keeps every round's seconds; headline keys: extraction_ratio, aggregation_ratio, generation_ratio,
rerun_seconds, peak_rss_ratio_10x, machine. Torch uses 2 threads on both sides of every ratio.
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
from dataclasses import dataclass, field
from pathlib import Path

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
               ("RAY_USAGE_STATS_ENABLED", "0"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
               ("TQDM_DISABLE", "1")):   # the GGUF loader's progress bar
    os.environ.setdefault(_k, _v)

from benchmarks.aggregation import Sizes  # noqa: E402
from benchmarks.common import REPO, THREADS, machine_info  # noqa: E402

logger = logging.getLogger(__name__)

SECTIONS = ("aggregation", "extraction", "storage", "generation", "scale", "rerun")
RESULTS = REPO / "benchmarks" / "results"


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run."""

    reps: int = 3
    extract_prompts: int = 16
    extract_batch: int = 8
    gen_prompts: int = 16
    gen_tokens: int = 32
    gen_batch: int = 16
    agg: Sizes = field(default_factory=Sizes)
    storage_shards: int = 8
    rerun_k: int = 3


FULL = Plan(reps=5)
QUICK = Plan(reps=1, extract_prompts=4, extract_batch=2, gen_prompts=4, gen_tokens=4, gen_batch=4,
             agg=Sizes(n_shards=4, prompts_per_shard=8, n_layers=4, n_pos=5, d=64), storage_shards=2, rerun_k=1)


class Bench:
    """Runs the chosen sections in order, sharing the model and the extraction shard between them."""

    def __init__(self, plan: Plan, quick: bool, workdir: Path, args: argparse.Namespace):
        self.plan, self.quick, self.workdir, self.args = plan, quick, workdir, args
        self.results: dict = {"errors": {}}
        self._lm = None

    @property
    def lm(self):
        if self._lm is None:
            from benchmarks.common import load_bench_model

            t0 = time.perf_counter()
            self._lm = load_bench_model(self.quick)
            self.results["model"] = {"key": self._lm.spec.key, "layers": self._lm.n_layers, "d": self._lm.d_model,
                                     "eoi_tokens": self._lm.eoi_tokens, "load_s": time.perf_counter() - t0}
        return self._lm

    def run(self, sections: list[str]) -> None:
        for name in sections:
            t0 = time.perf_counter()
            logger.info("section %s ...", name)
            try:
                self.results[name] = getattr(self, f"_{name}")()
            except Exception:  # noqa: BLE001 - one broken section must not hide the others' numbers
                self.results["errors"][name] = traceback.format_exc()
                logger.error("section %s failed:\n%s", name, self.results["errors"][name])
            self.results.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
            # other processes on a shared machine stretch wall times: keep the 1-minute load with each section
            self.results.setdefault("section_load_1min", {})[name] = round(os.getloadavg()[0], 2)

    def _aggregation(self) -> dict:
        from benchmarks.aggregation import bench_aggregation

        return bench_aggregation(self.workdir / "aggregation", self.plan.agg, reps=self.plan.reps,
                                 distinct_10x=self.args.distinct_10x, profile_on_miss=self.args.profile)

    def _extraction(self) -> dict:
        from benchmarks.extraction import bench_extraction

        return bench_extraction(self.lm, self.workdir / "extraction", n_prompts=self.plan.extract_prompts,
                                batch_size=self.plan.extract_batch, reps=self.plan.reps,
                                profile_on_miss=self.args.profile)

    def _activations(self):
        """Real activations for the storage bench: the extraction shard, else one capture."""
        from benchmarks.extraction import shard_activations

        ext = self.results.get("extraction")
        if ext and Path(ext["shard"]).is_file():
            return shard_activations(ext["shard"], ext["n_prompts"])
        from benchmarks.common import prompts
        from refdir.workers.extract import forward_capture

        texts = [r["instruction"] for r in prompts("harmful", self.plan.extract_prompts)]
        return forward_capture(self.lm, texts, self.plan.extract_batch).acts

    def _storage(self) -> dict:
        from benchmarks.storage import bench_storage

        return bench_storage(self._activations(), self.workdir / "storage", n_shards=self.plan.storage_shards,
                             reps=self.plan.reps)

    def _generation(self) -> dict:
        from benchmarks.generation import bench_generation

        return bench_generation(self.lm, n_prompts=self.plan.gen_prompts, max_new_tokens=self.plan.gen_tokens,
                                batch_size=self.plan.gen_batch, reps=self.plan.reps, profile_on_miss=self.args.profile)

    def _scale(self) -> dict:
        from benchmarks.scale import bench_scale

        gpu = json.loads(self.args.gpu_json.read_text()) if self.args.gpu_json.is_file() else None
        out = bench_scale(self.lm, quick=self.quick, reps=self.plan.reps, gpu=gpu)
        if gpu:
            self.results["gpu"] = gpu
        return out

    def _rerun(self) -> dict:
        from benchmarks.common import run_child

        return run_child(["-m", "benchmarks.rerun", str(self.workdir / "rerun"), "--k", str(self.plan.rerun_k),
                          "--reps", str(self.plan.reps)], timeout=900)


def headline(results: dict) -> dict:
    """The keys the issue asks for, None where a section did not run or failed."""
    def get(section: str, key: str):
        return (results.get(section) or {}).get(key)

    return {"extraction_ratio": get("extraction", "ratio"), "aggregation_ratio": get("aggregation", "ratio"),
            "generation_ratio": get("generation", "ratio"), "rerun_seconds": get("rerun", "rerun_seconds"),
            "peak_rss_ratio_10x": get("aggregation", "peak_rss_ratio_10x")}


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=False,
                              default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description="refdir stages against their limits")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke test of the harness")
    p.add_argument("--sections", default=None,
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; --quick: all but rerun)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default results/latest.json, --quick: results/quick.json.tmp)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new temp folder, deleted)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--distinct-10x", action="store_true", help="write 10 distinct copies of the aggregation data "
                   "(~11 GB) instead of hard links of the 1x shards")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="no profile for a missed ratio")
    p.add_argument("--gpu-json", type=Path, default=RESULTS / "calibration-h200.json",
                   help="H200 measurements from benchmarks/calibrate.py, used by the scale estimate when present")
    args = p.parse_args(argv)
    if args.sections is None:
        args.sections = ",".join(s for s in SECTIONS if not (args.quick and s == "rerun"))
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
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
    plan = QUICK if args.quick else FULL
    bench = Bench(plan, args.quick, workdir, args)
    bench.results.update(machine=machine_info(), quick=args.quick, plan=repr(plan),
                         started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    try:
        bench.run(args.sections.split(","))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results = {**headline(bench.results), **bench.results, "wall_seconds": time.perf_counter() - t0}
    results["machine"]["load_avg_end"] = list(os.getloadavg())
    from benchmarks.report import print_table, table_rows

    results["table"] = table_rows(results)
    out = args.out or (RESULTS / ("quick.json.tmp" if args.quick else "latest.json"))
    write_json(out, results)
    print_table(results, out)
    return results


if __name__ == "__main__":
    main()
