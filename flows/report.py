"""Run reports: the summary table the CLI prints and the self-contained HTML report.

    rows = summary_table_rows(summary)      # model x intervention refusal rates (CLI table)
    rel = write_report(store, run_id)       # runs/{run_id}/report.html, one file, images as data URIs

The HTML report has a header (run id, store, created_at, versions, models and their status), one
table and one grouped bar chart across models, and a section per model (id `model-{key}`): selection
heatmaps over (layer, position), bypass vs layer, drop reasons, refusal rates with counts, CE/KL
damage, example completions and the projection of train activations on the direction. Every part
reads only what its stage wrote; a part whose files are missing says so, and a model that failed or
is incomplete gets a section saying that, so one bad model never sinks the report. Figures live in
`flows/plots.py`; activations are streamed one shard at a time (only layer, position, label, vector).
"""

from __future__ import annotations

import html
import json
import logging
from datetime import datetime, timezone

from refdir.flows import plots
from refdir.flows.report_data import (CE, DAMAGE, INTERVENTIONS, ModelData, dataset_order, drop_counts,
                                      examples, intervention_order, model_keys, projections, run_doc)
from refdir.schemas import layout

logger = logging.getLogger(__name__)

EXAMPLES = 3   # example completions per (dataset, intervention)

CSS = """
body{font:14px/1.45 system-ui,sans-serif;color:#1c1c1c;margin:0;background:#f6f7f9}h4{font-size:13px;margin:14px 0 6px}
main{max-width:1400px;margin:0 auto;padding:24px 28px 60px;background:#fff}h1{font-size:24px;margin:0 0 6px}
h2{font-size:19px;margin:34px 0 10px;padding-top:10px;border-top:2px solid #e3e6ea}h3{font-size:15px;margin:22px 0 8px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:12.5px}th{background:#f0f2f5}.scroll{overflow-x:auto}
th,td{border:1px solid #dde1e6;padding:3px 7px;text-align:left;vertical-align:top}td.num{text-align:right;white-space:nowrap}
.badge{display:inline-block;padding:1px 8px;border-radius:9px;font-size:12px;font-weight:600;color:#fff}
.done{background:#2e8540}.incomplete{background:#d58512}.failed,.missing{background:#c0392b}.note{color:#555;font-style:italic}
.box{border-left:4px solid #d58512;background:#fff8ec;padding:8px 12px}.bad{border-color:#c0392b;background:#fdf0ee}
img{max-width:100%;display:block;margin:6px 0 12px}.plots{display:flex;flex-wrap:wrap;gap:0 24px}.report-error{color:#a00}
td.text{max-width:520px;white-space:pre-wrap;word-break:break-word;font:12px ui-monospace,monospace}nav a{margin-right:12px}
pre{background:#f4f5f7;padding:8px;overflow-x:auto;font-size:11.5px;max-height:360px}.meta td:first-child{color:#555}
.bar{display:inline-block;height:9px;background:#c0392b;margin-left:8px;border-radius:2px}
"""

_STATUS_TEXT = {
    "incomplete": "some stages are not done; results below are partial",
    "missing": "no manifest: this model failed before finishing any stage (see the run log) or has not started",
    "failed": "the model failed; whatever its finished stages wrote is shown below",
}


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
            rows.append({"model": key, "direction": (f"pos {d['position']} layer {d['layer']}" + (" FALLBACK" if d.get("fallback") else "")) if d else "-",
                         "intervention": name, "harmful refusal": _with_ci(harmful, "refusal_rate"),
                         "harmless refusal": _with_ci(harmless, "refusal_rate"),
                         **{label: damage.get(k, "-") for label, k in _CLI_DAMAGE.items()}})
        if not rows or rows[-1]["model"] != key:
            rows.append({"model": key, "direction": "-", "intervention": s.get("status", "?"), "harmful refusal": "-",
                         "harmless refusal": "-", **{label: "-" for label in _CLI_DAMAGE}})
    return rows


_CLI_DAMAGE = {"CE pile": "ce_pile", "CE alpaca": "ce_alpaca", "CE own": "ce_on_distribution", "KL": "kl_first_token"}


def _with_ci(rates: dict, metric: str):
    """A rate with its Wilson 95 % interval, '0.030 [0.010, 0.085]', when the summary carries one."""
    v, ci = rates.get(metric, "-"), rates.get(f"{metric}_ci")
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(v, float) and ci else v


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.{digits}f}" if abs(v) >= 10 ** -digits or v == 0 else f"{v:.2e}"
    return _e(v)


def _td(v, *, rate: bool = False, bar: bool = False, text: bool = False) -> str:
    """One cell; rates get a red shade by value (and a bar), numbers align right, text keeps its line breaks."""
    if rate and isinstance(v, float) and v == v:
        extra = f'<span class="bar" style="width:{int(100 * min(max(v, 0.0), 1.0))}px"></span>' if bar else ""
        return f'<td class="num" style="background:rgba(192,57,43,{0.08 + 0.5 * v:.2f})">{v:.2f}{extra}</td>'
    cls = "num" if isinstance(v, (int, float)) and not isinstance(v, bool) else "text" if text else ""
    return f'<td class="{cls}">{_fmt(v)}</td>' if cls else f"<td>{_fmt(v)}</td>"


def _table(head: list[str] | str, rows: list[list[str]], cls: str = "") -> str:
    """head: column names (escaped here) or ready <tr> HTML; rows: lists of ready <td> cells."""
    thead = head if isinstance(head, str) else "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f'<div class="scroll"><table class="{cls}"><thead>{thead}</thead><tbody>{body}</tbody></table></div>'


def _img(uri: str, name: str, alt: str) -> str:
    return f'<img data-plot="{_e(name)}" alt="{_e(alt)}" src="{uri}">'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _badge(status: str) -> str:
    return f'<span class="badge {_e(status)}">{_e(status)}</span>'


def _part(anchor: str, title: str, render, *args) -> str:
    """A titled sub-section; a missing input becomes a note and any other error a visible message."""
    try:
        body = render(*args)
    except FileNotFoundError as e:
        body = _note(f"not available: {e}")
    except Exception as e:  # noqa: BLE001 - one broken part must not sink the report
        logger.warning("report part %s failed", anchor, exc_info=True)
        body = f'<p class="report-error">could not render this part: {_e(type(e).__name__)}: {_e(e)}</p>'
    return f'<div class="part" id="{_e(anchor)}"><h3>{_e(title)}</h3>{body}</div>'


# ---------------------------------------------------------------- header and summary

def _header(store, run_id: str, doc: dict, models: list[ModelData]) -> str:
    versions = doc.get("versions") or {}
    meta = [["run id", run_id], ["store", store.uri], ["created at", doc.get("created_at", "–")],
            ["spec hash", doc.get("spec_hash", "–")],
            ["versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v) or "–"]]
    rows = [[f"<td>{_e(k)}</td>", f"<td>{_e(v)}</td>"] for k, v in meta]
    items = "".join(f'<li><a href="#model-{_e(m.key)}">{_e(m.key)}</a> {_badge(m.status)}'
                    f'{" – " + _e(m.error) if m.error else ""}</li>' for m in models)
    spec = json.dumps(doc.get("spec", {}), indent=1, sort_keys=True)
    nav = '<nav><a href="#summary">across models</a>' + "".join(
        f'<a href="#model-{_e(m.key)}">{_e(m.key)}</a>' for m in models) + "</nav>"
    return (f'<header id="header"><h1>refdir run {_e(run_id)}</h1>{nav}{_table([], rows, "meta")}'
            f"<h3>models</h3><ul>{items or '<li>none</li>'}</ul>"
            f"<details><summary>spec</summary><pre>{_e(spec)}</pre></details></header>")


def _summary_columns(models: list[ModelData]) -> tuple[dict[str, list[str]], list[str]]:
    """Interventions per test dataset, and damage interventions other than baseline, in display order."""
    found: dict[str, set[str]] = {}
    for m in models:
        for r in m.evals:
            found.setdefault(r["dataset"], set()).add(r["intervention"])
    order = lambda ivs: sorted(ivs, key=intervention_order)  # noqa: E731
    rates = {ds: order(found[ds]) for ds in dataset_order(found) if ds != "damage"}
    damage = [iv for iv in order(found.get("damage", set())) if iv != "baseline"]
    return rates, damage


def _summary_head(rates: dict[str, list[str]], damage: list[str]) -> str:
    fixed = ["model", "family", "layers", "chosen (pos, layer)", "status"]
    top = "".join(f'<th rowspan="2">{_e(h)}</th>' for h in fixed)
    top += "".join(f'<th colspan="{len(ivs)}">refusal rate, {_e(ds)}</th>' for ds, ivs in rates.items())
    top += "".join(f'<th colspan="{len(DAMAGE)}">damage, {_e(iv)}</th>' for iv in damage)
    sub = "".join(f"<th>{_e(iv).replace('_', '_<wbr>')}</th>" for ivs in rates.values() for iv in ivs)
    sub += "".join("<th>ΔCE pile</th><th>ΔCE alpaca</th><th>ΔCE own</th><th>KL</th>" for _ in damage)
    return f"<tr>{top}</tr><tr>{sub}</tr>"


def _summary_row(m: ModelData, rates: dict[str, list[str]], damage: list[str]) -> list[str]:
    d = m.direction or {}
    chosen = f"({d['position']}, {d['layer']})" + (" fallback" if d.get("fallback") else "") if d else "–"
    info = m.info or {}
    cells = [f'<td><a href="#model-{_e(m.key)}">{_e(m.key)}</a></td>', _td(info.get("family")),
             _td(info.get("n_layers")), _td(chosen), f"<td>{_badge(m.status)}</td>"]
    rate = m.rates()
    cells += [_td(rate.get(f"{ds}/{iv}"), rate=True) for ds, ivs in rates.items() for iv in ivs]
    for iv in damage:
        dmg = m.damage_delta(iv)
        cells += [_td(dmg.get(k)) for k in DAMAGE]
    return cells


def _summary(models: list[ModelData]) -> str:
    rates, damage = _summary_columns(models)
    table = _table(_summary_head(rates, damage), [_summary_row(m, rates, damage) for m in models], "summary")
    caption = _note("refusal rate = share of completions judged refusals (substring judge); bars show its Wilson 95 % "
                    "interval. actadd subtracts r on harmful prompts and adds r on harmless ones. ΔCE = CE under the "
                    "intervention minus baseline CE (nats/token) on Pile-like text, Alpaca-like responses and the "
                    "model's own harmless completions; KL = first-token KL(baseline || intervention) on harmless prompts.")
    bars = {m.key: m.rates() for m in models if m.rates()}
    errs = {m.key: m.intervals() for m in models if m.rates()}
    chart = _img(plots.refusal_bars(bars, rates, errs), "refusal-bars", "refusal rate by model and intervention") \
        if bars else _note("no model has evaluation results yet")
    return f'<section id="summary"><h2>Across models</h2>{table}{caption}{chart}</section>'


# ---------------------------------------------------------------- per-model parts

def _overview(m: ModelData) -> str:
    info, d = m.info or {}, m.direction or {}
    rows = [["family", info.get("family")], ["model path", info.get("model_path")], ["layers", info.get("n_layers")],
            ["d_model", info.get("d_model")], ["end-of-instruction tokens", " ".join(info.get("eoi_tokens") or [])],
            ["chosen (position, layer)", f"({d['position']}, {d['layer']})" if d else None],
            ["bypass / induce / KL", " / ".join(_fmt(d.get(k)) for k in ("bypass_score", "induce_score", "kl_score"))
             if d else None], ["direction norm", d.get("norm")], ["fallback", d.get("fallback")]]
    meta = _table([], [[f"<td>{_e(k)}</td>", _td(v)] for k, v in rows], "meta")
    stages = [[_td(s), _td(st.get("status") or "pending"), _td(st.get("done")), _td(st.get("planned")),
               _td(st.get("finished_at"))] for s, st in m.stages().items()]
    return meta + "<h4>stages</h4>" + _table(["stage", "status", "done", "planned", "finished at"], stages)


def _outcome(r: dict, sel: tuple[int, int] | None) -> str:
    if (r["position"], r["layer"]) == sel:
        return f"selected (fallback; {r['drop_reason']})" if r["drop_reason"] else "selected"
    return r["drop_reason"] or "passed"


def _selection(m: ModelData) -> str:
    g = m.grids()
    sel = (m.direction["position"], m.direction["layer"]) if m.direction else None
    imgs = [_img(plots.score_heatmap(g.values[k], g.positions, g.layers, k, sel), f"heatmap-{k}", f"{k} heatmap")
            for k in ("bypass", "induce", "kl")]
    imgs.append(_img(plots.bypass_lines(g.values["bypass"], g.positions, g.layers, sel, m.max_layer()),
                     "bypass-lines", "bypass score vs layer per position"))
    caption = _note("Blank (hatched) cells: candidates skipped for a near-zero norm or not scored. "
                    "The outlined cell / star is the selected direction.")
    counts = _table(["outcome", "candidates"], [[_td(k), _td(v)] for k, v in drop_counts(g)])
    best = [[_td(r["position"]), _td(r["layer"]), _td(r["bypass_score"]), _td(r["induce_score"]), _td(r["kl_score"]),
             _td(_outcome(r, sel))] for r in g.best(10)]
    ranked = _table(["position", "layer", "bypass", "induce", "KL", "drop reason"], best)
    return (f'<div class="plots">{"".join(imgs)}</div>{caption}<h4>drop reasons</h4>{counts}'
            f"<h4>best candidates by bypass</h4>{ranked}")


def _rates(m: ModelData) -> str:
    if not m.evals:
        raise FileNotFoundError("no evals files (the evaluate stage has not finished)")
    parts = []
    for ds in dataset_order({r["dataset"] for r in m.evals} - {"damage"}):
        cols, table = m.rate_table(ds)
        title = {"harmful_test": "harmful test: refusal (bypass when low)",
                 "harmless_test": "harmless test: induced refusal"}.get(ds, ds)
        body = [[_td(iv)] + [cell for c in cols for cell in (_td(vals.get(c), rate=c.split(":")[0].endswith("_rate"),
                                                                 bar=True), _ci_td(vals.get(f"ci:{c}")))]
                + [_td(vals["n"])] for iv, vals in table.items()]
        head = ["intervention", *[h for c in cols for h in (c, "95 % CI")], "n"]
        parts.append(f"<h4>{_e(title)}</h4>" + _table(head, body))
    return "".join(parts) + _note("95 % CI: Wilson score interval of the rate over n completions.")


def _ci_td(ci) -> str:
    return f'<td class="num">{ci[0]:.3f} – {ci[1]:.3f}</td>' if ci else "<td></td>"


def _damage(m: ModelData) -> str:
    table = m.damage_table()
    if not table:
        raise FileNotFoundError("no damage rows (evals dataset 'damage')")
    head = ["intervention"] + [f"{k}" for k in DAMAGE] + [f"Δ {k}" for k in CE] + ["n (tokens: pile / alpaca / own)"]
    rows = []
    for iv, vals in table.items():
        delta = m.damage_delta(iv)
        ns = " / ".join(str(vals.get(f"n:{k}", "–")) for k in CE)
        rows.append([_td(iv), *(_td(vals.get(k)) for k in DAMAGE), *(_td(delta.get(k)) for k in CE), _td(ns)])
    return _table(head, rows) + _note("CE in nats per token, as the paper's evaluate_loss: plain documents (ce_pile), "
                                      "instruction -> reference response with loss on the response only (ce_alpaca), "
                                      "the model's own baseline harmless completions (ce_on_distribution); actadd "
                                      "here is the bypass intervention (−r).")


def _clip(text: str, limit: int = 600) -> str:
    return text if len(text) <= limit else f"{text[:limit]} … ({len(text) - limit} more characters)"


def _examples(store, run_id: str, m: ModelData) -> str:
    """Per dataset: each prompt once, then its response under every intervention (refusals shaded)."""
    by_ds: dict[str, dict[int, list]] = {}
    for (ds, iv), rows in examples(store, run_id, m.key, EXAMPLES).items():
        for r in rows:
            by_ds.setdefault(ds, {}).setdefault(r["prompt_id"], []).append((iv, r))
    if not by_ds:
        raise FileNotFoundError("no completion shards with a done-marker")
    parts = []
    for ds, prompts in by_ds.items():
        body = []
        for items in prompts.values():
            for i, (iv, r) in enumerate(items):
                shade = ' style="background:#fbe3e0"' if r["refused"] else ""
                first = [f'<td class="text" rowspan="{len(items)}">{_e(_clip(r["prompt"]))}</td>'] if i == 0 else []
                body.append(first + [_td(iv), f'<td class="text"{shade}>{_e(_clip(r["response"]))}</td>',
                                     _td("yes" if r["refused"] else "no")])
        parts.append(f"<h4>{_e(ds)}</h4>" + _table(["prompt", "intervention", "response", "refusal"], body, "examples"))
    return "".join(parts)


def _projection(store, run_id: str, m: ModelData) -> str:
    if not m.direction or not m.n_layers():
        raise FileNotFoundError("no direction (the select stage has not finished)")
    pos = m.direction["position"]
    layers, stats = projections(store, run_id, m.key, m.unit_direction(), pos, m.n_layers())
    if not stats:
        raise FileNotFoundError("no train activation shards with a done-marker")
    uri = plots.projection_plot(layers, {k: (v[0], v[1]) for k, v in stats.items()}, m.direction["layer"], pos)
    sel = layers.index(m.direction["layer"]) if m.direction["layer"] in layers else None
    rows = [[_td(lab), _td(float(v[0][sel])), _td(float(v[1][sel])), _td(int(v[2][sel]))]
            for lab, v in stats.items()] if sel is not None else []
    return (_img(uri, "projection", "projection of train activations on the direction")
            + _table(["label", f"mean at layer {m.direction['layer']}", "std", "n"], rows)
            + _note("all train prompts (kept or not), activations at the input of each block"))


def _trials(store, run_id: str, m: ModelData) -> str:
    """The optimize study (flows/optimize.py): refusals x KL with the Pareto front, the paper's direction and the
    chosen trial's kernels; the front as a table."""
    rows = store.read_table(layout.trials_table(run_id, m.key)).to_pylist()
    front = sorted((r for r in rows if r["pareto"] or r["trial"] == 0 or r["chosen"]), key=lambda r: r["kl"])
    body = [[_td(r["trial"]), _td(("paper's direction" if r["trial"] == 0 else "") + (" chosen" if r["chosen"] else ""),
                                 text=True),
             _td(f"{r['refusals']}/{r['n']}", text=True), _td(r["kl"]), _td(r["direction_kind"], text=True),
             _td(r["direction_layer"]), _td("yes" if r["pareto"] else "no", text=True)] for r in front]
    return (_img(plots.trials_plot(rows), "trials", "refusals against KL of the optimize trials")
            + _table(["trial", "", "refusals (harmful val)", "KL (harmless val)", "direction", "layer", "Pareto"], body)
            + _note(f"{len(rows)} trials; the chosen trial is evaluated on harmful test as intervention 'optimized'"))


def _model_section(store, run_id: str, m: ModelData) -> str:
    a = f"model-{m.key}"
    head = f'<h2>{_e(m.key)} {_badge(m.status)}</h2>'
    if m.status != "done":
        cls = "box bad" if m.status in ("missing", "failed") else "box"
        head += f'<div class="{cls}">model {_e(m.key)}: {_e(_STATUS_TEXT.get(m.status, m.status))}' \
                f'{"<br>error: " + _e(m.error) if m.error else ""}</div>'
    if not m.manifest:
        return f'<section class="model" id="{_e(a)}" data-status="{_e(m.status)}">{head}</section>'
    parts = [_part(f"{a}-overview", "overview", _overview, m),
             _part(f"{a}-selection", "direction selection", _selection, m),
             _part(f"{a}-rates", "refusal rates", _rates, m),
             _part(f"{a}-damage", "CE / KL damage", _damage, m),
             _part(f"{a}-projection", "projection on the direction", _projection, store, run_id, m),
             _part(f"{a}-examples", "example completions", _examples, store, run_id, m)]
    if store.exists(layout.trials_table(run_id, m.key)):
        parts.append(_part(f"{a}-trials", "optimised abliteration: refusals x KL", _trials, store, run_id, m))
    return f'<section class="model" id="{_e(a)}" data-status="{_e(m.status)}">{head}{"".join(parts)}</section>'


# ---------------------------------------------------------------- entry point

def render_report(store, run_id: str, errors: dict[str, str] | None = None) -> str:
    """The report's HTML text (nothing written)."""
    doc = run_doc(store, run_id)
    models = [ModelData.load(store, run_id, key, (errors or {}).get(key)) for key in model_keys(store, run_id, doc)]
    body = [_header(store, run_id, doc, models), _summary(models)]
    body += [_model_section(store, run_id, m) for m in models]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>refdir {_e(run_id)}</title>'
            f'<style>{CSS}</style></head><body><main>{"".join(body)}'
            f'<footer class="note">written by refdir at {now}</footer></main></body></html>')


def write_report(store, run_id: str, errors: dict[str, str] | None = None) -> str:
    """Write runs/{run_id}/report.html; returns its store-relative path. `errors`: {model: why it failed}."""
    rel = layout.report_html(run_id)
    store.write_bytes(rel, render_report(store, run_id, errors).encode("utf-8"))
    logger.info("report written to %s", store.url(rel))
    return rel
