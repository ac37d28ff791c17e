"""Figures of the HTML run report: matplotlib Figure objects (rendered by Agg, no pyplot), each returned as a base64 PNG data URI.

    uri = score_heatmap(grid, positions, layers, "bypass", selected=(-1, 2))   # "data:image/png;base64,..."
    uri = bypass_lines(grid, positions, layers, selected=(-1, 2), max_layer=3)
    uri = refusal_bars({"organism": {"harmful_test/baseline": 1.0, ...}})
    uri = projection_plot(layers, {"harmful": (mean, std), "harmless": (mean, std)}, selected_layer=2)

Every function builds one figure, encodes it and closes it (no figure outlives its call). Grids are
numpy arrays of shape (n_positions, n_layers) with NaN where a candidate was skipped or not scored;
NaN cells are drawn blank (hatched) rather than coloured. Nothing here reads the store.
"""

from __future__ import annotations

import base64
import io
import logging

import matplotlib
import numpy as np
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

logger = logging.getLogger(__name__)


def _subplots(*args, figsize=None, **kw):
    """(figure, axes) on a bare Agg-rendered Figure: no pyplot state, no backend chosen at import."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kw)

DPI = 110
HARMFUL, HARMLESS = "#c0392b", "#2471a3"
# what each selection metric means, how to colour it, and its title
METRICS = {
    "bypass": ("mean refusal score, harmful val, ablation (lower = refusal bypassed)", "coolwarm"),
    "induce": ("mean refusal score, harmless val, actadd +r (higher = refusal induced)", "coolwarm"),
    "kl": ("mean KL(baseline || ablation), harmless val (lower = less damage)", "viridis"),
}
_ANNOTATE_MAX_CELLS = 160   # write the value into each cell up to this many cells


def to_data_uri(fig) -> str:
    """Encode a figure as a PNG data URI and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")   # a bare Figure: nothing to close
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _norm(grid: np.ndarray, metric: str):
    """Diverging around 0 for refusal scores (red = refuses), sequential from 0 for KL."""
    finite = grid[np.isfinite(grid)]
    if finite.size == 0:
        return Normalize(-1, 1)
    if metric == "kl":
        return Normalize(0.0, max(float(finite.max()), 1e-9))
    lim = max(float(np.abs(finite).max()), 1e-9)
    return TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)


def _annotate(ax, grid: np.ndarray, norm, cmap) -> None:
    """Write each finite value into its cell, black or white for contrast."""
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            r, g, b, _ = cmap(norm(v))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7, color="white" if dark else "black")


def _mark(ax, positions: list[int], layers: list[int], selected: tuple[int, int] | None) -> None:
    """Outline the selected (position, layer) cell."""
    if selected is None or selected[0] not in positions or selected[1] not in layers:
        return
    i, j = positions.index(selected[0]), layers.index(selected[1])
    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.5))
    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="gold", linewidth=1.2))


def _layer_ticks(ax, layers: list[int], axis: str = "x") -> None:
    """All layer ticks up to 32 layers, every 2nd/4th beyond, so labels never overlap."""
    step = 1 if len(layers) <= 32 else (2 if len(layers) <= 64 else 4)
    idx = list(range(0, len(layers), step))
    if axis == "x":
        ax.set_xticks(idx, [str(layers[k]) for k in idx], fontsize=8)
    else:
        ax.set_yticks(idx, [str(layers[k]) for k in idx], fontsize=8)


def score_heatmap(grid: np.ndarray, positions: list[int], layers: list[int], metric: str,
                  selected: tuple[int, int] | None = None) -> str:
    """Heatmap of one selection metric over (position, layer); grid: (n_positions, n_layers), NaN = unscored."""
    title, cmap_name = METRICS[metric]
    cmap = matplotlib.colormaps.get_cmap(cmap_name).with_extremes(bad=(0, 0, 0, 0))   # unscored: transparent, the hatching shows
    norm = _norm(grid, metric)
    width = min(14.0, 2.2 + 0.42 * len(layers))
    fig, ax = _subplots(figsize=(max(width, 5.5), 1.3 + 0.42 * len(positions)))
    ax.set_facecolor("white")
    ax.add_patch(Rectangle((-0.5, -0.5), len(layers), len(positions), fill=False, hatch="///",
                           edgecolor="#d0d0d0", linewidth=0, zorder=0))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest", zorder=1)
    if grid.size <= _ANNOTATE_MAX_CELLS:
        _annotate(ax, grid, norm, cmap)
    _mark(ax, positions, layers, selected)
    ax.set_yticks(range(len(positions)), [str(p) for p in positions], fontsize=8)
    _layer_ticks(ax, layers)
    ax.set_xlabel("layer (input of block)")
    ax.set_ylabel("position")
    ax.set_title(f"{metric}: {title}", fontsize=9, loc="left")
    fig.colorbar(im, ax=ax, fraction=0.035, pad=0.015)
    return to_data_uri(fig)


def bypass_lines(grid: np.ndarray, positions: list[int], layers: list[int], selected: tuple[int, int] | None = None,
                 max_layer: int | None = None) -> str:
    """Bypass score vs layer, one line per position; grid: (n_positions, n_layers), NaN = gap."""
    fig, ax = _subplots(figsize=(min(12.0, 4.5 + 0.18 * len(layers)), 3.4))
    colors = matplotlib.colormaps.get_cmap("tab10")
    for i, pos in enumerate(positions):
        ax.plot(layers, grid[i], marker="o", markersize=3.5, linewidth=1.4, color=colors(i % 10), label=f"pos {pos}")
    if selected is not None and selected[0] in positions and selected[1] in layers:
        v = grid[positions.index(selected[0]), layers.index(selected[1])]
        ax.plot([selected[1]], [v], marker="*", markersize=16, color="gold", markeredgecolor="black", zorder=5,
                linestyle="none", label=f"selected ({selected[0]}, {selected[1]})")
    ax.axhline(0.0, color="#888888", linewidth=0.8, linestyle=":")
    if max_layer is not None:
        ax.axvspan(max_layer - 0.5, layers[-1] + 0.5, color="#eeeeee", zorder=0, label=f"layer >= {max_layer} (filtered)")
    ax.set_xlim(layers[0] - 0.5, layers[-1] + 0.5)
    _layer_ticks(ax, layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("bypass score")
    ax.set_title("bypass score vs layer (refusal score on harmful val under ablation)", fontsize=9, loc="left")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    return to_data_uri(fig)


def _bar_panel(ax, rates: dict[str, dict[str, float]], interventions: list[str], title: str,
               errors: dict[str, dict[str, tuple[float, float]]] | None = None) -> None:
    """Grouped bars: x = intervention, one bar per model; rates: {model: {intervention: rate}}; errors:
    {model: {intervention: (ci_low, ci_high)}} drawn as error bars (Wilson 95 % intervals)."""
    models = list(rates)
    width = 0.8 / max(len(models), 1)
    colors = matplotlib.colormaps.get_cmap("tab10")
    x = np.arange(len(interventions))
    for k, model in enumerate(models):
        vals = np.array([rates[model].get(iv, np.nan) for iv in interventions], dtype=float)
        ci = [(errors or {}).get(model, {}).get(iv) for iv in interventions]
        lo = np.array([max(v - c[0], 0.0) if c and np.isfinite(v) else 0.0 for v, c in zip(vals, ci)])
        hi = np.array([max(c[1] - v, 0.0) if c and np.isfinite(v) else 0.0 for v, c in zip(vals, ci)])
        bars = ax.bar(x - 0.4 + width * (k + 0.5), np.nan_to_num(vals), width, label=model, color=colors(k % 10),
                      yerr=np.vstack([lo, hi]) if any(ci) else None, capsize=3, error_kw={"elinewidth": 1})
        if len(models) <= 3:
            for b, v, c in zip(bars, vals, ci):
                if np.isfinite(v):
                    top = max(v, c[1]) if c else v
                    ax.text(b.get_x() + b.get_width() / 2, top + 0.02, f"{v:.2f}", ha="center", fontsize=7)
    ax.set_xticks(x, [iv.replace("_", "\n") for iv in interventions], fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_title(title, fontsize=9, loc="left")
    ax.grid(axis="y", alpha=0.3)


def refusal_bars(rates: dict[str, dict[str, float]], datasets: dict[str, list[str]] | None = None,
                 intervals: dict[str, dict[str, tuple[float, float]]] | None = None) -> str:
    """Refusal rate by model x intervention, one panel per dataset; rates: {model: {"dataset/intervention": rate}};
    intervals: the same keys -> (ci_low, ci_high), drawn as error bars."""
    if datasets is None:
        datasets = {}
        for per_model in rates.values():
            for name in per_model:
                ds, iv = name.split("/", 1)
                if iv not in datasets.setdefault(ds, []):
                    datasets[ds].append(iv)
    names = [ds for ds in datasets if datasets[ds]] or ["(no evaluations)"]
    widths = [max(len(datasets.get(ds, [])), 1) for ds in names]
    fig, axes = _subplots(1, len(names), figsize=(max(6.0, 1.3 * sum(widths) + 2.5), 3.4), sharey=True,
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, ds in zip(axes[0], names):
        ivs = datasets.get(ds, [])
        sub = {m: {iv: r[f"{ds}/{iv}"] for iv in ivs if f"{ds}/{iv}" in r} for m, r in rates.items()}
        err = {m: {iv: e[f"{ds}/{iv}"] for iv in ivs if f"{ds}/{iv}" in e} for m, e in (intervals or {}).items()}
        _bar_panel(ax, sub, ivs, f"refusal rate on {ds} (bars: Wilson 95 % interval)", err)
    axes[0][0].set_ylabel("refusal rate")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=8, loc="upper center", ncol=min(len(labels), 6),
                   bbox_to_anchor=(0.5, 0.0), frameon=False)
    return to_data_uri(fig)


def projection_plot(layers: list[int], stats: dict[str, tuple[np.ndarray, np.ndarray]],
                    selected_layer: int | None = None, position: int | None = None) -> str:
    """Mean ± std of activations projected on the unit direction, per label; stats: {label: (mean, std)} (n_layers,)."""
    fig, ax = _subplots(figsize=(min(12.0, 4.5 + 0.18 * len(layers)), 3.4))
    for label, (mean, std) in stats.items():
        color = HARMFUL if label == "harmful" else HARMLESS if label == "harmless" else None
        ax.plot(layers, mean, marker="o", markersize=3.5, color=color, label=f"{label} (mean ± std)")
        ax.fill_between(layers, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    if selected_layer is not None:
        ax.axvline(selected_layer, color="black", linestyle="--", linewidth=1, label=f"direction's layer {selected_layer}")
    ax.axhline(0.0, color="#888888", linewidth=0.8, linestyle=":")
    ax.set_xlim(layers[0] - 0.5, layers[-1] + 0.5)
    _layer_ticks(ax, layers)
    ax.set_xlabel("layer (input of block)")
    ax.set_ylabel("projection on r̂")
    where = f" at position {position}" if position is not None else ""
    ax.set_title(f"train activations projected on the unit direction{where}", fontsize=9, loc="left")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    return to_data_uri(fig)


def trials_plot(rows: list[dict]) -> str:
    """Optimize trials (flows/optimize.py): refusals (harmful val) against first-token KL (harmless val, log
    scale) with the Pareto front, the paper's direction (trial 0) and the chosen trial marked; and the chosen
    trial's weight kernels over layers. rows: trial, refusals, n, kl, pareto, chosen, attn_weights, mlp_weights,
    embed_weight."""
    fig, (ax, kx) = _subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    kl = np.array([max(r["kl"], 1e-6) for r in rows])
    ref = np.array([r["refusals"] for r in rows])
    ax.scatter(kl, ref, s=18, color="#999999", label="trial")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["kl"])
    if front:
        ax.step([max(r["kl"], 1e-6) for r in front], [r["refusals"] for r in front], where="post", color=HARMLESS,
                lw=1.5, label="Pareto front")
    for r in rows:
        if r["trial"] == 0:
            ax.scatter([max(r["kl"], 1e-6)], [r["refusals"]], s=140, marker="*", color=HARMFUL, zorder=3,
                       label="paper's direction (trial 0)")
        if r["chosen"]:
            ax.scatter([max(r["kl"], 1e-6)], [r["refusals"]], s=90, facecolors="none", edgecolors="black", lw=1.5,
                       zorder=4, label=f"chosen (trial {r['trial']})")
    ax.set_xscale("log")
    ax.set_xlabel("first-token KL(baseline || trial), harmless val")
    ax.set_ylabel(f"refusals, harmful val (of {rows[0]['n']})")
    ax.legend(fontsize=8, loc="best")
    chosen = next((r for r in rows if r["chosen"]), rows[0])
    layers = np.arange(len(chosen["attn_weights"]))
    kx.plot(layers, chosen["attn_weights"], marker="o", label="attention-out")
    kx.plot(layers, chosen["mlp_weights"], marker="s", label="MLP-down")
    kx.axhline(chosen["embed_weight"], color="#777777", ls=":", label="embedding")
    kx.axhline(1.0, color=HARMFUL, ls="--", lw=0.8, label="paper (1 everywhere)")
    kx.set_xlabel("layer")
    kx.set_ylabel("ablation weight")
    kx.set_title(f"trial {chosen['trial']} kernels", fontsize=10)
    kx.legend(fontsize=8)
    _layer_ticks(kx, list(layers))
    return to_data_uri(fig)
