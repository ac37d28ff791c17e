"""Run reports: the summary table the CLI prints and the self-contained HTML report.

    rows = summary_table_rows(summary)      # model x intervention refusal rates
    rel = write_report(store, run_id)       # runs/{run_id}/report.html
"""

from __future__ import annotations

import html

from refdir.flows.summary import rates
from refdir.schemas import layout


def summary_table_rows(summary: dict) -> list[dict]:
    """One row per model: direction and refusal rates per (dataset, intervention)."""
    rows = []
    for key, s in summary["models"].items():
        d = s.get("direction") or {}
        row = {"model": key, "status": s.get("status", "?"),
               "direction": f"pos {d['position']} layer {d['layer']}" if d else "-"}
        for name, metrics in sorted(s.get("rates", {}).items()):
            if "refusal_rate" in metrics:
                row[name] = metrics["refusal_rate"]
        rows.append(row)
    return rows


def write_report(store, run_id: str) -> str:
    models = sorted({p.split("/")[2] for p in store.glob(f"{layout.run_dir(run_id)}/*/_manifest.json")})
    parts = [f"<h1>refdir run {html.escape(run_id)}</h1>"]
    for key in models:
        parts.append(f"<h2>{html.escape(key)}</h2><table>")
        for name, metrics in sorted(rates(store, run_id, key).items()):
            cells = "".join(f"<td>{html.escape(k)}={v:.3f}</td>" for k, v in sorted(metrics.items()))
            parts.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
        parts.append("</table>")
    rel = layout.report_html(run_id)
    store.write_bytes(rel, ("<!doctype html><meta charset=utf-8>" + "\n".join(parts)).encode())
    return rel
