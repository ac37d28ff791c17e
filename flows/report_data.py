"""What the report reads from the store: run document, per-model data, score grids, examples, projections.

    doc = run_doc(store, run_id); m = ModelData.load(store, run_id, key)
    layers, stats = projections(store, run_id, key, unit, position, n_layers)

Every reader goes through the done-markers or the stage outputs; activations are streamed one shard at a
time, reading only the layer, position, label and vector columns.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc

from refdir.flows.summary import manifest, model_status
from refdir.schemas import layout

logger = logging.getLogger(__name__)

DAMAGE = ("ce_pile", "ce_alpaca", "ce_on_distribution", "kl_first_token")   # the paper's three CE losses + KL
CE = DAMAGE[:3]
INTERVENTIONS = ("baseline", "ablation", "actadd", "orthogonalized", "random_ablation", "random_actadd")
_DATASETS = ("harmful_test", "harmless_test", "damage")


class ReportError(ValueError):
    """No such run in the store; the message lists the runs that are there."""


def intervention_order(iv: str) -> tuple[int, str]:
    return (INTERVENTIONS.index(iv) if iv in INTERVENTIONS else len(INTERVENTIONS), iv)


def dataset_order(names) -> list[str]:
    return sorted(names, key=lambda d: (_DATASETS.index(d) if d in _DATASETS else len(_DATASETS), d))


def run_doc(store, run_id: str) -> dict:
    """run.json of the run ({} when only model folders exist); ReportError when the run is not there."""
    rel = layout.run_json(run_id)
    if store.exists(rel):
        return store.read_json(rel)
    if store.glob(layout.model_manifest_glob(run_id)):
        return {}
    runs = sorted({p.split("/")[1] for p in store.glob(layout.run_json("*"))})
    raise ReportError(f"no run {run_id!r} in {store.uri} (no {rel}); runs there: {runs or 'none'}")


def model_keys(store, run_id: str, doc: dict) -> list[str]:
    """Models of the spec in spec order, then any other model folder holding a manifest."""
    keys = [m["key"] for m in doc.get("spec", {}).get("models", [])]
    found = {p.split("/")[2] for p in store.glob(layout.model_manifest_glob(run_id))}
    return keys + sorted(found - set(keys))


@dataclass
class Grids:
    """Selection scores over (position, layer): values[metric] has shape (n_positions, n_layers), NaN = unscored."""

    positions: list[int]
    layers: list[int]
    values: dict[str, np.ndarray]
    scores: list[dict]
    n_skipped: int

    def best(self, k: int) -> list[dict]:
        nan_last = lambda r: (r["bypass_score"] is None or np.isnan(r["bypass_score"]), r["bypass_score"] or 0)  # noqa: E731
        return sorted(self.scores, key=nan_last)[:k]


def drop_counts(g: Grids) -> list[tuple[str, int]]:
    """(outcome, count): skipped for a near-zero norm, passed, or the kind of filter that dropped it."""
    kinds = {"nan": "NaN score", "layer": "layer >= max_layer_fraction·L", "kl": "KL above threshold",
             "induce": "induce below threshold"}
    counts = Counter({"skipped (norm below prune_norm)": g.n_skipped})
    for r in g.scores:
        reason = r["drop_reason"]
        counts["passed every filter" if reason is None else kinds.get(reason.split(" ", 1)[0], reason)] += 1
    return sorted(counts.items(), key=lambda kv: -kv[1])


@dataclass
class ModelData:
    """What the report knows about one model: manifest, model row, direction and evals (small files only)."""

    store: object
    run_id: str
    key: str
    status: str
    manifest: dict
    info: dict | None = None
    direction: dict | None = None
    evals: list[dict] = field(default_factory=list)
    error: str | None = None

    @classmethod
    def load(cls, store, run_id: str, key: str, error: str | None = None) -> "ModelData":
        m = manifest(store, run_id, key)
        if not m["stages"]:
            return cls(store, run_id, key, "failed" if error else "missing", {}, error=error)
        status = model_status(m)
        out = cls(store, run_id, key, "failed" if error and status != "done" else status, m, error=error)
        if store.exists(layout.model_row(run_id, key)):
            out.info = store.read_table(layout.model_row(run_id, key)).to_pylist()[0]
        drel = layout.direction_json(run_id, key)
        if store.exists(drel):
            out.direction = {k: v for k, v in store.read_json(drel).items() if k not in ("vector", "candidates")}
        for erel in store.glob(layout.evals_glob(run_id, key)):
            out.evals += store.read_table(erel).to_pylist()
        return out

    def stages(self) -> dict[str, dict]:
        got = self.manifest.get("stages", {})
        return {s: got.get(s, {}) for s in ("extract", "aggregate", "select", "evaluate")} | got

    def n_layers(self) -> int | None:
        return (self.info or {}).get("n_layers") or (self.direction or {}).get("n_layers")

    def max_layer(self) -> int | None:
        frac, n = (self.direction or {}).get("thresholds", {}).get("max_layer_fraction"), self.n_layers()
        return int(frac * n) if frac is not None and n else None

    def rates(self) -> dict[str, float]:
        """{"dataset/intervention": refusal rate} by the substring judge (or the only judge there is)."""
        out: dict[str, float] = {}
        for r in sorted(self.evals, key=lambda r: r["judge"] not in ("substring", "")):
            if r["metric"] == "refusal_rate":
                out.setdefault(f"{r['dataset']}/{r['intervention']}", r["value"])
        return out

    def intervals(self) -> dict[str, tuple[float, float]]:
        """{"dataset/intervention": (ci_low, ci_high)}: the Wilson 95 % interval of the rate rates() shows."""
        out: dict[str, tuple[float, float]] = {}
        for r in sorted(self.evals, key=lambda r: r["judge"] not in ("substring", "")):
            if r["metric"] == "refusal_rate" and r.get("ci_low") is not None:
                out.setdefault(f"{r['dataset']}/{r['intervention']}", (r["ci_low"], r["ci_high"]))
        return out

    def rate_table(self, dataset: str) -> tuple[list[str], dict[str, dict]]:
        """Metric columns ("refusal_rate", "metric:judge", ...) and {intervention: {column: value, "n": n}}."""
        rows = sorted((r for r in self.evals if r["dataset"] == dataset),
                      key=lambda r: (intervention_order(r["intervention"]), r["metric"] != "refusal_rate", r["judge"]))
        cols: list[str] = []
        out: dict[str, dict] = {}
        for r in rows:
            col = r["metric"] if r["judge"] in ("", "substring") else f"{r['metric']}:{r['judge']}"
            cols += [] if col in cols else [col]
            cell = out.setdefault(r["intervention"], {"n": r["n"]})
            cell[col], cell["n"] = r["value"], max(cell["n"], r["n"])
            if r.get("ci_low") is not None:
                cell[f"ci:{col}"] = (r["ci_low"], r["ci_high"])
        return cols, out

    def damage_table(self) -> dict[str, dict]:
        """{intervention: {metric: value, "n:metric": n}} from the evals rows of dataset 'damage'."""
        out: dict[str, dict] = {}
        rows = [r for r in self.evals if r["dataset"] == "damage"]
        for r in sorted(rows, key=lambda r: intervention_order(r["intervention"])):
            out.setdefault(r["intervention"], {}).update({r["metric"]: r["value"], f"n:{r['metric']}": r["n"]})
        return out

    def damage_delta(self, intervention: str) -> dict[str, float | None]:
        """CE metrics minus the baseline's; KL as is (it is already a difference from the baseline)."""
        table = self.damage_table()
        vals, base = table.get(intervention, {}), table.get("baseline", {})
        out = {k: (vals[k] - base[k] if k in vals and k in base else None) for k in CE}
        out["kl_first_token"] = vals.get("kl_first_token")
        return out

    def grids(self) -> Grids:
        cands = self.store.read_table(layout.candidates_table(self.run_id, self.key),
                                      columns=["position", "layer", "skipped"]).to_pylist()
        scores = self.store.read_table(layout.scores_table(self.run_id, self.key)).to_pylist()
        positions = sorted({r["position"] for r in cands + scores})
        n = self.n_layers() or 1 + max(r["layer"] for r in cands + scores)
        layers = list(range(n))
        values = {k: np.full((len(positions), n), np.nan) for k in ("bypass", "induce", "kl")}
        for r in scores:
            for k in values:
                v = r[f"{k}_score"]
                values[k][positions.index(r["position"]), r["layer"]] = np.nan if v is None else v
        return Grids(positions, layers, values, scores, sum(bool(r["skipped"]) for r in cands))

    def unit_direction(self) -> np.ndarray:
        """r̂, shape (d_model,), float64, from directions.parquet."""
        t = self.store.read_table(layout.directions_table(self.run_id, self.key), columns=["vector"])
        r = np.asarray(t["vector"][0].as_py(), dtype=np.float64)
        return r / np.linalg.norm(r)


def examples(store, run_id: str, key: str, k: int) -> dict[tuple[str, str], list[dict]]:
    """The first k completions per (dataset, intervention), one judge's rows, read through done-markers."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for rel in store.glob(f"{layout.completion_markers_dir(run_id, key)}/*.json"):
        ds, iv = rel.rsplit("/", 1)[1][: -len(".json")].rsplit("-", 1)[0].split("-", 1)
        rows = groups.setdefault((ds, iv), [])
        marker = store.marker(rel)
        if len(rows) >= k or not marker or not store.exists(marker["data"]):
            continue
        t = store.read_table(marker["data"], columns=["prompt_id", "prompt", "response", "judge", "refused"])
        t = t.to_pylist()
        judge = "substring" if any(r["judge"] == "substring" for r in t) else t[0]["judge"]   # a refusal judge
        rows += [r for r in t if r["judge"] == judge][: k - len(rows)]
    order = lambda g: (dataset_order([g[0], *_DATASETS]).index(g[0]), intervention_order(g[1]))  # noqa: E731
    return {g: groups[g] for g in sorted(groups, key=order) if groups[g]}


def projections(store, run_id: str, key: str, unit: np.ndarray, position: int, n_layers: int):
    """Mean, std and n of (activation · r̂) per label and layer at `position`, over train shards.

    Streams one marked shard at a time, reading only layer, position, label and vector. Returns
    (layers, {label: (mean (L,), std (L,), n (L,))}).
    """
    acc: dict[str, np.ndarray] = {}   # label -> (3, n_layers): n, sum, sum of squares
    for rel in store.glob(f"{layout.activation_markers_dir(run_id, key)}/train-*.json"):
        marker = store.marker(rel)
        if not marker:
            continue
        t = store.read_table(marker["data"], columns=["layer", "position", "label", "vector"])
        t = t.filter(pc.equal(t["position"], position))
        if t.num_rows == 0:
            continue
        vec = t["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(t.num_rows, -1)  # (rows, d)
        proj = vec.astype(np.float64) @ unit                                                                   # (rows,)
        layer, label = t["layer"].to_numpy(), np.asarray(t["label"].to_pylist())
        for lab in np.unique(label):
            m = label == lab
            part = [np.bincount(layer[m], w, minlength=n_layers) for w in (None, proj[m], proj[m] ** 2)]  # 3 x (L,)
            acc[str(lab)] = acc.get(str(lab), 0.0) + np.stack(part).astype(np.float64)
    out = {}
    for lab in sorted(acc):
        n, s, ss = acc[lab]
        mean = np.divide(s, n, out=np.full(n_layers, np.nan), where=n > 0)
        std = np.sqrt(np.maximum(np.divide(ss, n, out=np.full(n_layers, np.nan), where=n > 0) - mean ** 2, 0.0))
        out[lab] = (mean, std, n.astype(int))
    return list(range(n_layers)), out
