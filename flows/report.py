"""Run reports: the summary table the CLI prints and the self-contained HTML report.

    rows = summary_table_rows(summary)      # model x intervention refusal rates
    rel = write_report(store, run_id)       # runs/{run_id}/report.html
"""

from __future__ import annotations

import html

from refdir.flows.summary import rates
from refdir.schemas import layout


DAMAGE = ("ce_harmless_text", "ce_own_completions", "kl_first_token")
INTERVENTIONS = ("baseline", "ablation", "actadd", "orthogonalized", "random_ablation", "random_actadd")


def summary_table_rows(summary: dict) -> list[dict]:
    """One row per (model, intervention): refusal on harmful and harmless test, CE/KL damage.

    actadd subtracts r on harmful prompts and in the damage metrics (bypass) and adds r on harmless
    prompts (induce), as in the paper.
    """
    rows = []
    for key, s in summary["models"].items():
        d = s.get("direction") or {}
        rates = s.get("rates", {})
        for name in INTERVENTIONS:
            harmful, harmless = rates.get(f"harmful_test/{name}", {}), rates.get(f"harmless_test/{name}", {})
            damage = rates.get(f"damage/{name}", {})
            if not (harmful or harmless or damage):
                continue
            rows.append({"model": key, "direction": f"pos {d['position']} layer {d['layer']}" if d else "-",
                         "intervention": name, "harmful refusal": harmful.get("refusal_rate", "-"),
                         "harmless refusal": harmless.get("refusal_rate", "-"),
                         "CE text": damage.get("ce_harmless_text", "-"),
                         "CE own": damage.get("ce_own_completions", "-"), "KL": damage.get("kl_first_token", "-")})
        if not rows or rows[-1]["model"] != key:
            rows.append({"model": key, "direction": "-", "intervention": s.get("status", "?"), "harmful refusal": "-",
                         "harmless refusal": "-", "CE text": "-", "CE own": "-", "KL": "-"})
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
