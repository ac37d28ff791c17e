"""The benchmark's summary: one row per metric with its goal and pass / miss, printed with rich.

    rows = table_rows(results)     # [{"metric", "value", "goal", "status"}], also stored in the JSON
    print_table(results, path)

Status: "pass" / "miss" against the goal, "info" for numbers without a goal, "quick" instead of pass /
miss in --quick runs (tiny sizes measure nothing), "error" when the section failed (its traceback is in
results["errors"]).
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def _row(metric: str, value, goal: str = "", ok: bool | None = None, fmt: str = "{:.3f}") -> dict:
    text = "n/a" if value is None else (fmt.format(value) if isinstance(value, (int, float)) else str(value))
    status = "info" if ok is None else ("pass" if ok else "miss")
    return {"metric": metric, "value": text, "goal": goal, "status": status}


def _alt(section: dict) -> str:
    """The same comparison by other estimators: they agree on a quiet machine, not on a busy one."""
    cpu = section.get("cpu_ratio")
    return f"{section['ratio_of_mins']:.3f} / " + ("n/a" if cpu is None else f"{cpu:.3f}")


def _le(value, goal: float) -> bool | None:
    return None if value is None else value <= goal


def _section_rows(results: dict) -> list[dict]:
    rows: list[dict] = []
    ext = results.get("extraction")
    if ext:
        rows += [_row("extraction_ratio (run_extract / bare forward)", ext["ratio"], "<= 1.10", _le(ext["ratio"], 1.10)),
                 _row("  ratio of minimum rounds / of CPU time", _alt(ext)),
                 _row("  vs forward with last-position logits only", ext["ratio_vs_last_logits"]),
                 _row("  bare full-logits / last-logits forward", ext["full_vs_last_logits_forward"]),
                 _row("  bare forward tokens/s (CPU)", ext["tokens_per_s_bare"], fmt="{:.0f}")]
    agg = results.get("aggregation")
    if agg:
        rows += [_row("aggregation_ratio (aggregate_means / numpy in memory)", agg["ratio"], "<= 1.0",
                      _le(agg["ratio"], 1.0)),
                 _row("  ratio of minimum rounds / of CPU time", _alt(agg)),
                 _row("  data: activation shards on disk (GB)", agg["activation_bytes_on_disk"] / 1e9, fmt="{:.2f}"),
                 _row("  means_from_activations (DuckDB scan) / numpy", agg["reference_vs_numpy"], fmt="{:.1f}"),
                 _row("  aggregate_means / means_from_activations s", f"{agg['refdir_s']:.2f} / {agg['reference_s']:.2f}"),
                 _row("peak_rss_ratio_10x (aggregate_means)", agg["peak_rss_ratio_10x"], f"<= {agg['rss_goal']}",
                      _le(agg["peak_rss_ratio_10x"], agg["rss_goal"])),
                 _row("  means_from_activations RSS 10x / 1x", agg["rss"]["means_from_activations"]["peak_rss_ratio_10x"])]
    gen = results.get("generation")
    if gen:
        rows += [_row("generation_ratio (ablate hooks / plain generate)", gen["ratio"], "<= 1.10",
                      _le(gen["ratio"], 1.10)),
                 _row("  ratio of minimum rounds / of CPU time", _alt(gen)),
                 _row("  plain new tokens/s (CPU)", gen["new_tokens_per_s_plain"], fmt="{:.0f}")]
    rr = results.get("rerun")
    if rr:
        rows += [_row("rerun_seconds (execute on a finished run)", rr["rerun_seconds"], "<= 5 s",
                      _le(rr["rerun_seconds"], 5.0)),
                 _row("  files changed by the rerun", rr["rerun_files_changed"], "0", rr["rerun_files_changed"] == 0, "{}"),
                 _row("  rerun in a fresh process (imports incl.) s", rr["rerun_cold_process_s"], fmt="{:.2f}"),
                 _row(f"  resume after losing k={rr['k']} of {rr['n_extract_jobs']} jobs: s", rr["resume_s"], fmt="{:.1f}"),
                 _row("  jobs recomputed by the resume", rr["jobs_recomputed"], f"== {rr['k']}",
                      rr["jobs_recomputed"] == rr["k"] and rr["recomputed_are_lost"], "{}")]
    return rows


def _storage_rows(st: dict) -> list[dict]:
    bpv = st["bytes_per_value"]
    rows = [_row("bytes/value float16 + zstd (real activations)", bpv["real_float16_zstd"]),
            _row("bytes/value float32 + BSS + zstd (real)", bpv["real_float32_bss_zstd"]),
            _row("  float32 zstd without BSS (real) / Gaussian f32 BSS", f"{bpv['real_float32_zstd_no_bss']:.3f} / "
                 f"{bpv['gaussian_float32_bss_zstd']:.3f}")]
    for where in ("local", "s3"):
        s = st[where]
        rows.append(_row(f"{where}: write / transport / scan MB/s", f"{s['write_mb_per_s']:.0f} / "
                         f"{s['transport_mb_per_s']:.0f} / {s['scan_mb_per_s']:.0f}"))
    return rows


def _scale_rows(sc: dict) -> list[dict]:
    rows = [_row(f"scale: GPU assumptions ({sc['assumptions']['source']})",
                 f"MFU {sc['assumptions']['mfu']:.2f}, HBM eff {sc['assumptions']['hbm_efficiency']:.2f}, "
                 f"{sc['assumptions']['layer_overhead_ms']:.2f} ms/layer/step")]
    for r in sc["table"]:
        note = f" ({r['models']} fit)" if r["excluded"] else ""
        rows.append(_row(f"13 models on {r['gpus']} GPU(s){note}: one-at-a-time / refdir / parallel bound (h)",
                         f"{r['one_at_a_time_h']:.2f} / {r['refdir_fanout_h']:.2f} / {r['models_parallel_bound_h']:.2f}"))
    for w in sc.get("what_if", []):
        rows.append(_row(f"  GPU-hours: {w['case']}", w["gpu_hours"], fmt="{:.2f}"))
    return rows


def _gpu_rows(gpu: dict) -> list[dict]:
    where = f"GPU {gpu.get('device', '')}"
    rows = []
    if "extraction" in gpu:
        r = gpu["extraction"]["ratio"]
        rows.append(_row(f"{where}: extraction ratio", r, "<= 1.10", _le(r, 1.10)))
    if "generation" in gpu:
        r = gpu["generation"]["ratio"]
        rows.append(_row(f"{where}: generation ratio (ablate / plain)", r, "<= 1.10", _le(r, 1.10)))
    if "ablated_forward" in gpu:
        rows.append(_row(f"{where}: scoring forward under ablate / bare", gpu["ablated_forward"]["ratio"]))
    if "orthogonalized_generation" in gpu:
        rows.append(_row(f"{where}: orthogonalized() generate / plain (64 tokens)",
                         gpu["orthogonalized_generation"]["ratio"]))
    if "prefill" in gpu:
        rows.append(_row(f"{where}: prefill MFU ({gpu['prefill'].get('model', '')})", gpu["prefill"]["mfu"]))
    if "decode_fit" in gpu:
        fit = gpu["decode_fit"]
        rows.append(_row(f"{where}: decode: effective HBM TB/s / fixed ms per layer per step",
                         f"{fit['effective_hbm_tb_s']:.2f} / {fit['layer_overhead_ms']:.2f}"))
    return rows


def table_rows(results: dict) -> list[dict]:
    rows = _section_rows(results)
    if results.get("storage"):
        rows += _storage_rows(results["storage"])
    if results.get("scale"):
        rows += _scale_rows(results["scale"])
    if results.get("gpu"):
        rows += _gpu_rows(results["gpu"])
    if results.get("quick"):   # tiny sizes: the numbers exercise the harness, they are not measurements
        rows = [{**r, "status": "quick"} if r["status"] in ("pass", "miss") else r for r in rows]
    for name in results.get("errors", {}):
        rows.append({"metric": f"section {name}", "value": "failed", "goal": "", "status": "error"})
    return rows


def print_table(results: dict, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    colour = {"pass": "green", "miss": "red", "error": "red", "info": "dim", "quick": "yellow"}
    m = results["machine"]
    table = Table(title=f"refdir benchmarks ({'quick' if results['quick'] else 'full'}; {m['cores']} cores, "
                        f"{m['cpu_model']}, torch threads {m['torch_threads']})")
    for col in ("metric", "value", "goal", "status"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for r in results["table"]:
        table.add_row(r["metric"], r["value"], r["goal"], f"[{colour[r['status']]}]{r['status']}[/]")
    console = Console(width=140)
    console.print(table)
    console.print(f"wall {results['wall_seconds']:.0f} s; load average {m['load_avg_start']} -> {m['load_avg_end']}; "
                  f"JSON: {path}")
