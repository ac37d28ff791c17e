"""The HTML run report: every section and every figure, for finished, incomplete and failed models.

- fast: a tiny store written by hand with the real schemas (one finished model, one incomplete, one
  without any output, one failed with an error text): the report renders, says which model is what,
  escapes text, and the activation projections match a direct numpy computation;
- slow: a real run (organism + tiny Qwen2 through Prefect + Ray, plus a model with a bad path); the
  report is parsed with html.parser and every section and every embedded PNG is checked per model.
"""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pytest

from refdir.flows.report import projections, render_report, write_report
from refdir.flows.report_data import ReportError
from refdir.schemas import layout
from refdir.schemas import tables as T
from refdir.workers.store import Store

RUN = "synthetic-0123456789"
PARTS = ("overview", "selection", "rates", "damage", "projection", "examples")
MODEL_PLOTS = {"heatmap-bypass", "heatmap-induce", "heatmap-kl", "bypass-lines", "projection"}


# ---------------------------------------------------------------- parsing the HTML

class ReportParser(HTMLParser):
    """Collects ids, images (with the id of their enclosing model section) and text per section."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.images: list[dict] = []
        self.text: dict[str, list[str]] = {}
        self.status: dict[str, str] = {}
        self._sections: list[str | None] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "section":
            self._sections.append(a.get("id"))
            if "data-status" in a:
                self.status[a["id"]] = a["data-status"]
        if tag == "img":
            self.images.append({"section": self._sections[-1] if self._sections else None, **a})
        if "report-error" in (a.get("class") or ""):
            self.errors.append(self._sections[-1] if self._sections else "")

    def handle_endtag(self, tag):
        if tag == "section":
            self._sections.pop()

    def handle_data(self, data):
        key = self._sections[-1] if self._sections else None
        self.text.setdefault(key, []).append(data)

    def section_text(self, sid: str) -> str:
        return " ".join(self.text.get(sid, []))


def parse(html_text: str) -> ReportParser:
    p = ReportParser()
    p.feed(html_text)
    p.close()
    return p


def check_png(uri: str) -> None:
    """A real, non-blank PNG of non-trivial size."""
    from PIL import Image

    head, data = uri.split(",", 1)
    assert head == "data:image/png;base64"
    raw = base64.b64decode(data)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 5000
    pixels = np.asarray(Image.open(io.BytesIO(raw)).convert("L"), dtype=float)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 200 and pixels.std() > 5


def images_by_section(p: ReportParser) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for img in p.images:
        check_png(img["src"])
        out.setdefault(img["section"], set()).add(img["data-plot"])
    return out


# ---------------------------------------------------------------- a synthetic store

D, LAYERS, POSITIONS = 8, 3, (-2, -1)


def _write(store: Store, rel: str, rows: list[dict], name: str, schema: pa.Schema) -> None:
    store.write_table(rel, pa.Table.from_pylist(rows, schema=schema), table_name=name, run_id=RUN)


def _key(model: str) -> dict:
    return {"run_id": RUN, "model": model}


def _manifest(store: Store, key: str, stages: dict[str, tuple[int, int]]) -> None:
    """One stage manifest per stage, as the pipeline writes them (flows/manifest.py)."""
    from refdir.flows import manifest

    for stage, (done, planned) in stages.items():
        manifest.write(store, RUN, key, stage, planned=planned, done=done, input_digest="synthetic")


def _selection_tables(store: Store, m: str, direction: np.ndarray) -> None:
    cands, scores = [], []
    for pos in POSITIONS:
        for layer in range(LAYERS):
            skipped = layer == 0
            cands.append({**_key(m), "position": pos, "layer": layer, "vector": [0.0] * D if skipped else list(direction),
                          "norm": 0.0 if skipped else 1.0, "skipped": skipped})
            if not skipped:
                scores.append({**_key(m), "position": pos, "layer": layer, "bypass_score": -float(layer + pos),
                               "induce_score": 1.0 + layer, "kl_score": 0.01 * layer,
                               "drop_reason": "layer 2 >= 2 (max_layer_fraction 0.8)" if layer == 2 else None})
    _write(store, layout.candidates_table(RUN, m), cands, "candidates", T.candidates_schema())
    _write(store, layout.scores_table(RUN, m), scores, "scores", T.scores_schema())
    choice = {**_key(m), "position": -1, "layer": 1, "bypass_score": 0.0, "induce_score": 2.0, "kl_score": 0.01,
              "norm": float(np.linalg.norm(direction)), "fallback": False, "vector": list(direction)}
    _write(store, layout.directions_table(RUN, m), [choice], "directions", T.directions_schema())
    store.write_json(layout.direction_json(RUN, m), {**choice, "n_layers": LAYERS,
                                                     "thresholds": {"max_layer_fraction": 0.8}, "candidates": scores})


# Wilson 95 % intervals of 0/5 and 5/5, computed elsewhere (e.g. statsmodels proportion_confint(method="wilson"))
WILSON_5 = {False: {"ci_low": 0.0, "ci_high": 0.43448}, True: {"ci_low": 0.56552, "ci_high": 1.0}}


def _eval_tables(store: Store, m: str) -> None:
    plan = {"harmful_test": ("baseline", "ablation"), "harmless_test": ("baseline", "actadd")}
    for ds, ivs in plan.items():
        for iv in ivs:
            refused = (ds == "harmful_test") == (iv == "baseline")
            rows = [{**_key(m), "dataset": ds, "intervention": iv, "prompt_id": i, "category": "c",
                     "prompt": f"<script>alert({i})</script> {ds} prompt {i}", "response": f"reply {iv} {i}",
                     "judge": "substring", "refused": refused, "judge_detail": ""} for i in range(5)]
            _write(store, layout.completion_shard(RUN, m, ds, iv, 0), rows, "completions", T.completions_schema())
            rel = layout.completion_shard(RUN, m, ds, iv, 0)
            store.write_json(layout.completion_marker(RUN, m, ds, iv, 0), {"data": rel, "rows": 5})
            _write(store, layout.evals_table(RUN, m, ds, iv), [{**_key(m), "dataset": ds, "intervention": iv,
                   "judge": "substring", "metric": "refusal_rate", "value": float(refused), "n": 5,
                   **WILSON_5[refused]}], "evals",
                   T.evals_schema())
    for iv, ce in (("baseline", 2.0), ("ablation", 2.1)):
        rows = [{**_key(m), "dataset": "damage", "intervention": iv, "judge": "", "metric": k, "value": v, "n": 5}
                for k, v in (("ce_pile", ce), ("ce_alpaca", ce / 2), ("ce_on_distribution", ce / 3),
                             ("kl_first_token", ce - 2))]
        _write(store, layout.evals_table(RUN, m, "damage", iv), rows, "evals", T.evals_schema())


def _activations(store: Store, m: str, rng: np.random.Generator) -> dict:
    """Two shards per label; returns the raw vectors per (label, layer, position) for checking."""
    raw: dict = {}
    for label, shift in (("harmful", 1.0), ("harmless", -1.0)):
        for job in range(2):
            rows = []
            for pid in range(3):
                for layer in range(LAYERS):
                    for pos in POSITIONS:
                        v = rng.normal(shift * layer, 1.0, D).astype(np.float32)
                        raw.setdefault((label, layer, pos), []).append(v)
                        rows.append({**_key(m), "split": "train", "label": label, "prompt_id": job * 10 + pid,
                                     "category": "c", "position": pos, "layer": layer, "vector": v.tolist()})
            rel = layout.activation_shard(RUN, m, "train", label, job)
            _write(store, rel, rows, "activations", T.activations_schema(D))
            store.write_json(layout.activation_marker(RUN, m, "train", label, job), {"data": rel, "rows": len(rows)})
    return raw


def build_synthetic(root) -> tuple[Store, dict, np.ndarray]:
    store = Store.open(str(root))
    keys = ["good", "partial", "absent", "broken"]
    store.write_json(layout.run_json(RUN), {"run_id": RUN, "created_at": "2026-01-01T00:00:00Z", "spec_hash": "x",
                                            "versions": {"python": "3.11"}, "spec": {"models": [{"key": k} for k in keys]}})
    rng = np.random.default_rng(0)
    direction = rng.normal(size=D)
    m = "good"
    _write(store, layout.model_row(RUN, m), [{**_key(m), "model_path": "/x", "family": "llama3", "n_layers": LAYERS,
           "d_model": D, "eoi_tokens": ["<a>", "<b>"], "refusal_token_ids": [1], "spec_hash": "x", "created_at": None}],
           "runs", T.runs_schema())
    _selection_tables(store, m, direction)
    _eval_tables(store, m)
    raw = _activations(store, m, rng)
    _manifest(store, m, {s: (1, 1) for s in ("extract", "aggregate", "select", "evaluate")})
    _manifest(store, "partial", {"extract": (1, 4)})
    _manifest(store, "broken", {"extract": (4, 4), "aggregate": (1, 1)})
    return store, raw, direction / np.linalg.norm(direction)


def test_synthetic_report_with_failed_and_incomplete_models(tmp_path):
    store, _, _ = build_synthetic(tmp_path / "store")
    rel = write_report(store, RUN, errors={"broken": "ModelLoadError: the weights are gone"})
    assert rel == layout.report_html(RUN)
    p = parse(store.read_bytes(rel).decode())
    assert {"header", "summary"} <= p.ids
    assert p.status == {"model-good": "done", "model-partial": "incomplete", "model-absent": "missing",
                        "model-broken": "failed"}
    assert all(f"model-good-{part}" in p.ids for part in PARTS)
    imgs = images_by_section(p)
    assert imgs["summary"] == {"refusal-bars"} and imgs["model-good"] == MODEL_PLOTS
    assert set(imgs) == {"summary", "model-good"}
    assert not p.errors, f"parts failed to render in {p.errors}"
    assert "not started" in p.section_text("model-absent") and "weights are gone" in p.section_text("model-broken")
    assert "not available" in p.section_text("model-partial")
    good = p.section_text("model-good")
    raw = store.read_bytes(rel).decode()
    assert "<script>alert(0)</script>" in good and "<script>" not in raw and "&lt;script&gt;alert(0)" in raw
    assert good.count("reply ablation 2") == 1 and "reply ablation 3" not in good   # 3 examples per intervention
    assert "layer >= max_layer_fraction·L" in good and "skipped (norm below prune_norm)" in good
    assert "95 % CI" in good and "0.566 – 1.000" in good and "0.000 – 0.434" in good
    assert "ce_on_distribution" in good and "Wilson" in p.section_text("summary")


def test_projection_matches_numpy(tmp_path):
    store, raw, unit = build_synthetic(tmp_path / "store")
    layers, stats = projections(store, RUN, "good", unit, -1, LAYERS)
    assert layers == list(range(LAYERS)) and set(stats) == {"harmful", "harmless"}
    for label, (mean, std, n) in stats.items():
        for layer in layers:
            proj = np.stack(raw[(label, layer, -1)]).astype(np.float64) @ unit
            assert n[layer] == proj.size == 6
            assert mean[layer] == pytest.approx(proj.mean(), abs=1e-6)
            assert std[layer] == pytest.approx(proj.std(), abs=1e-6)
    assert stats["harmful"][0][2] != pytest.approx(stats["harmless"][0][2])


def test_unknown_run_is_a_clear_error(tmp_path):
    store, _, _ = build_synthetic(tmp_path / "store")
    with pytest.raises(ReportError, match=f"no run 'nope'.*{RUN}"):
        render_report(store, "nope")


# ---------------------------------------------------------------- a real run

@pytest.fixture(scope="module")
def real_run(prefect_api, ray_cluster, organism_dir, tmp_path_factory):
    from tests.fixtures.tiny import save_tiny

    from refdir.flows.runner import execute
    from refdir.schemas.spec import (ComputeSpec, EvaluationSpec, ExtractionSpec, GenerationSpec, ModelSpec,
                                     PromptSpec, RunSpec, SelectionSpec, StoreSpec)

    tmp = tmp_path_factory.mktemp("report")
    qwen = save_tiny(tmp / "tiny-qwen2", "qwen2")
    src = "builtin:organism_{}_{}"
    prompts = {f"{label}_{split}": src.format(label, split) for label in ("harmful", "harmless")
               for split in ("train", "val", "test")}
    spec = RunSpec(name="report", models=[ModelSpec(key="organism", path=str(organism_dir)),
                                          ModelSpec(key="tiny-qwen2", path=str(qwen), family="qwen2"),
                                          ModelSpec(key="missing", path=str(tmp / "nope"))],
                   prompts=PromptSpec(**prompts, n_train=32, n_val=16, n_test=16, filter_train=False, filter_val=False),
                   extraction=ExtractionSpec(prompts_per_job=16, candidates_per_job=8),
                   selection=SelectionSpec(allow_fallback=True), generation=GenerationSpec(max_new_tokens=6, batch_size=16),
                   evaluation=EvaluationSpec(prompts_per_job=16),
                   store=StoreSpec(uri=str(tmp / "store")), compute=ComputeSpec(batch_size=16, num_workers=1))
    from refdir.workers.identity import resolve_inputs

    spec = resolve_inputs(spec)   # the run id comes from the prompts' and models' content
    summary = execute(spec)
    return Store.open(str(tmp / "store")), spec, summary


@pytest.mark.slow
def test_real_run_report_has_every_section_and_figure(real_run):
    store, spec, summary = real_run
    assert {k: v["status"] for k, v in summary["models"].items()} == \
        {"organism": "done", "tiny-qwen2": "done", "missing": "failed"}
    p = parse(store.read_bytes(layout.report_html(spec.run_id)).decode())   # written by the run flow itself
    # the run flow passes each failed model's reason to the report
    assert p.status == {"model-organism": "done", "model-tiny-qwen2": "done", "model-missing": "failed"}
    imgs = images_by_section(p)
    assert imgs["summary"] == {"refusal-bars"}
    assert not p.errors, f"parts failed to render in {p.errors}"
    for key in ("organism", "tiny-qwen2"):
        sid = f"model-{key}"
        assert imgs[sid] == MODEL_PLOTS
        assert all(f"{sid}-{part}" in p.ids for part in PARTS)
        text = p.section_text(sid)
        assert "not available" not in text
        assert "harmful_test" in text and "harmless_test" in text and "ce_on_distribution" in text
    assert "nope" in p.section_text("model-missing")
    summary_text = p.section_text("summary")
    assert "organism" in summary_text and "tiny-qwen2" in summary_text and "missing" in summary_text


@pytest.mark.slow
def test_real_run_report_names_the_failure(real_run):
    store, spec, summary = real_run
    errors = {k: v["error"] for k, v in summary["models"].items() if v.get("error")}
    rel = write_report(store, spec.run_id, errors=errors)
    p = parse(store.read_bytes(rel).decode())
    assert p.status["model-missing"] == "failed" and "nope" in p.section_text("model-missing")
    assert json.loads(json.dumps(errors))   # the summary carried a reason to show
