"""Optimised abliteration (issue 14).

Fast (tiny random models, no Ray):
- weighted orthogonalisation with every weight 1 is bitwise the paper's orthogonalisation (Linear and Conv1D
  layouts, tied embeddings); partial weights match W - w r rᵀ W done by hand; restore is bitwise exact;
- the kernel over layers matches heretic's shape worked out by hand; direction interpolation and projection;
- Pareto front and the chosen trial on hand-made points; bad [optimize] bounds are one spec error.
Slow (the refusal model organism, a real local Ray cluster, real Prefect for the pipeline that selects):
- a 32-trial study on 2 actors: the front holds a trial other than the paper's with refusals and KL <= the
  paper's; shards name both actors; the view's Pareto flags agree with a brute-force dominance check; the
  chosen trial is evaluated on harmful test as intervention 'optimized';
- the exported chosen trial loads in plain transformers and its greedy completions equal the recorded ones;
- SIGKILL of the driver mid-study, rerun: no trial id twice, the planned count, finished trials not redone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from refdir.schemas import layout
from refdir.schemas.spec import SpecError, parse_spec
from refdir.workers.optimize import Kernel, LayerWeights, TrialParams, trial_direction, weighted_orthogonalize_, \
    weighted_orthogonalized
from refdir.workers.orthogonalize import orthogonalize_

REPO = Path(__file__).resolve().parents[1]


def _state(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


@pytest.mark.parametrize("family, tie", [("llama3", True), ("qwen", None), ("gemma", None)])
def test_all_weights_one_is_the_papers_orthogonalisation(tiny_lm_factory, family, tie):
    kw = {"tie": tie} if tie is not None else {}
    a, b = tiny_lm_factory(family, **kw), tiny_lm_factory(family, **kw)
    r = torch.randn(a.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    orthogonalize_(a, r)
    ones = [1.0] * b.n_layers
    weighted_orthogonalize_(b, r, LayerWeights(1.0, ones, ones))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]


def test_partial_weights_match_hand_edit_and_restore_is_bitwise(tiny_lm_factory):
    lm = tiny_lm_factory("llama3", tie=True)
    before = _state(lm)
    r = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u = (r / r.norm()).float()
    w = LayerWeights(0.25, [0.0, 1.3], [0.7, 0.0])
    with weighted_orthogonalized(lm, r, w):
        blocks = lm.model.model.layers
        emb0 = before["model.embed_tokens.weight"]
        assert torch.allclose(lm.model.model.embed_tokens.weight, emb0 - 0.25 * torch.outer(emb0 @ u, u), atol=1e-5)
        assert torch.equal(blocks[0].self_attn.o_proj.weight, before["model.layers.0.self_attn.o_proj.weight"])
        o1 = before["model.layers.1.self_attn.o_proj.weight"]                       # (d_model, in)
        assert torch.allclose(blocks[1].self_attn.o_proj.weight, o1 - 1.3 * torch.outer(u, u @ o1), atol=1e-5)
        d0 = before["model.layers.0.mlp.down_proj.weight"]
        assert torch.allclose(blocks[0].mlp.down_proj.weight, d0 - 0.7 * torch.outer(u, u @ d0), atol=1e-5)
        assert torch.equal(blocks[1].mlp.down_proj.weight, before["model.layers.1.mlp.down_proj.weight"])
        assert torch.equal(lm.model.lm_head.weight, before["lm_head.weight"])   # untied: the head keeps its weights
    after = lm.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_restore_after_an_error_inside_the_block(tiny_lm_factory):
    lm = tiny_lm_factory("qwen")
    before = _state(lm)
    with pytest.raises(RuntimeError, match="boom"):
        with weighted_orthogonalized(lm, torch.ones(lm.d_model), LayerWeights(1.0, [0.5, 0.5], [1.0, 1.0])):
            raise RuntimeError("boom")
    assert all(torch.equal(lm.model.state_dict()[k], v) for k, v in before.items())


def test_kernel_shape_by_hand():
    # heretic's kernel: peak at its position, linear to the floor at the given distance, zero beyond
    k = Kernel(max_weight=1.2, max_weight_position=2.0, min_weight=0.3, min_weight_distance=2.0)
    assert k.weights(6) == pytest.approx([0.3, 0.75, 1.2, 0.75, 0.3, 0.0])
    frac = Kernel(1.0, 1.5, 0.0, 1.0)
    assert frac.weights(4) == pytest.approx([0.0, 0.5, 0.5, 0.0])
    paper = TrialParams.from_flat(TrialParams.paper_flat(3, 8)).layer_weights(8)
    assert (paper.embed, paper.attn, paper.mlp) == (1.0, [1.0] * 8, [1.0] * 8)
    flat = {**TrialParams.paper_flat(3, 8), "attn.max_weight": 1.4, "attn.min_weight": 0.5}
    assert TrialParams.from_flat(flat).attn.min_weight == pytest.approx(0.7)   # a fraction of the peak


def test_direction_interpolation_and_projection():
    rng = np.random.default_rng(0)
    cands = {(-1, l): rng.normal(size=16) * (l + 1) for l in range(1, 4)}
    means = {(-1, l): rng.normal(size=16) + 3 for l in range(1, 4)}
    assert np.array_equal(trial_direction(cands, means, -1, 2.0, "raw"), cands[(-1, 2)])   # the candidate itself
    mid = trial_direction(cands, means, -1, 1.25, "raw")
    a, b = cands[(-1, 1)] / np.linalg.norm(cands[(-1, 1)]), cands[(-1, 2)] / np.linalg.norm(cands[(-1, 2)])
    want = 0.75 * a + 0.25 * b
    assert np.allclose(mid, want / np.linalg.norm(want))
    proj = trial_direction(cands, means, -1, 3.0, "projected")
    assert abs(proj @ means[(-1, 3)]) < 1e-9 * np.linalg.norm(means[(-1, 3)]) * np.linalg.norm(proj)
    with pytest.raises(ValueError, match="no scored candidate"):
        trial_direction(cands, means, -1, 3.5, "raw")


def test_pareto_front_and_choice_by_hand():
    from refdir.flows.optimize import choose, pareto_mask

    pts = np.array([[0, 0.5], [0, 0.2], [1, 0.1], [3, 0.0], [2, 0.3], [0, 0.2]])
    assert pareto_mask(pts).tolist() == [False, True, True, True, False, True]
    rows = [{"trial": i, "refusals": int(p[0]), "n": 20, "kl": float(p[1]), "pareto": bool(f)}
            for i, (p, f) in enumerate(zip(pts, pareto_mask(pts)))]
    assert choose(rows, 0.05) == 2          # 1/20 <= 0.05: lowest KL among those
    assert choose(rows, 0.0) == 1           # ties in KL: fewer refusals, then the lower id
    hard = [{**r, "refusals": r["refusals"] + 5} for r in rows]
    assert choose(hard, 0.0) == 2           # none qualifies: the knee (nearest the scaled origin)


@pytest.mark.parametrize("field, value, words", [
    ("max_weight", [1.1, 1.5], "must hold 1.0"), ("min_weight_distance", [0.1, 0.9], "must hold 1.0"),
    ("embed_weight", [0.5, 0.2], "low <= high"), ("direction_kinds", ["projected"], "must hold 'raw'"),
    ("objectives", ["kl", "kl"], "twice"),
])
def test_bad_optimize_bounds_are_one_spec_error(field, value, words):
    with pytest.raises(SpecError) as e:
        parse_spec({"name": "t", "models": [{"path": "m"}], "optimize": {field: value}})
    assert words in str(e.value) and "optimize" in str(e.value)


def test_trial_eval_job_is_an_eval_job_of_intervention_optimized():
    from pydantic import ValidationError

    from refdir.schemas.jobs import EvalJob, Prompt, TrialEvalJob
    from refdir.schemas.spec import ModelSpec, StoreSpec

    body = dict(run_id="r", model=ModelSpec(path="m"), store=StoreSpec(uri="file:///tmp/s"), dataset="harmful_test",
                index=3, prompts=[Prompt(prompt_id=0, instruction="hi")], input_digest="d")
    job = TrialEvalJob(**body, trial=7, params={"embed_weight": 1.0}, position=-1)
    assert isinstance(job, EvalJob) and job.intervention == "optimized"
    assert job.job_id == EvalJob(**body, intervention="optimized").job_id == "eval/harmful_test-optimized-00003"
    with pytest.raises(ValidationError, match="optimized"):
        TrialEvalJob(**body, trial=7, params={}, position=-1, intervention="ablation")
    with pytest.raises(ValidationError, match="input_digest"):
        TrialEvalJob(**{k: v for k, v in body.items() if k != "input_digest"}, trial=7, params={}, position=-1)


# ---------------------------------------------------------------- slow: the organism, Ray, Prefect

SRC = "builtin:organism_{}_{}"


def _spec(organism_dir: Path, store: Path, trials: int, **opt):
    from refdir.schemas.spec import (ComputeSpec, EvaluationSpec, ExtractionSpec, GenerationSpec, ModelSpec,
                                     OptimizeSpec, PromptSpec, RunSpec, SelectionSpec, StoreSpec)

    prompts = PromptSpec(**{f"{lab}_{sp}": SRC.format(lab, sp) for lab in ("harmful", "harmless")
                            for sp in ("train", "val", "test")}, n_train=32, n_val=16, n_test=16)
    return RunSpec(name="opt", models=[ModelSpec(key="organism", path=str(organism_dir))], prompts=prompts,
                   extraction=ExtractionSpec(prompts_per_job=16, candidates_per_job=4),
                   selection=SelectionSpec(allow_fallback=True), generation=GenerationSpec(max_new_tokens=6, batch_size=16),
                   evaluation=EvaluationSpec(prompts_per_job=8), store=StoreSpec(uri=str(store)),
                   compute=ComputeSpec(batch_size=16, num_workers=2),
                   optimize=OptimizeSpec(enabled=True, trials=trials, max_new_tokens=12, **opt))


def _optimize(spec, store):
    """The optimize stage of `organism` on a pool of 2 actors; returns its manifest."""
    from refdir.flows.cluster import start_pool
    from refdir.flows.optimize import optimize_model
    from refdir.workers.prompts import draw_prompts

    pools = []

    def pool():
        if not pools:
            pools.append(start_pool(spec, "organism")[0])
        return pools[0]

    try:
        return optimize_model(spec, "organism", store, pool, draw_prompts(spec.prompts))
    finally:
        for p in pools:
            p.close()


@pytest.fixture(scope="module")
def selected_run(prefect_api, ray_cluster, organism_dir, tmp_path_factory):
    """The organism run through the whole pipeline with a 32-trial study (the optimize stage after evaluate)."""
    from refdir.flows.runner import execute
    from refdir.workers.identity import resolve_inputs
    from refdir.workers.store import Store

    store_dir = tmp_path_factory.mktemp("opt") / "store"
    spec = resolve_inputs(_spec(organism_dir, store_dir, 32))
    t0 = time.perf_counter()
    assert execute(spec)["models"]["organism"]["status"] == "done"
    seconds = time.perf_counter() - t0
    store = Store.open(spec.store)
    manifest = store.read_json(layout.optimize_manifest(spec.run_id, "organism"))
    t0 = time.perf_counter()
    assert execute(spec)["models"]["organism"]["status"] == "done"   # finished: from the manifests, no actors
    assert time.perf_counter() - t0 < 15
    return spec, store, manifest, seconds


def _trials(store, spec) -> list[dict]:
    from refdir.flows.sql import connect_views

    con = connect_views(store)
    cur = con.execute("select trial, refusals, n, kl, pareto, chosen, actor, params from trials "
                      "where run_id = ? and model = 'organism' order by trial", [spec.run_id])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


@pytest.mark.slow
def test_search_beats_or_equals_the_paper_on_two_actors(selected_run):
    spec, store, manifest, seconds = selected_run
    rows = _trials(store, spec)
    assert [r["trial"] for r in rows] == list(range(32))
    paper = rows[0]
    assert json.loads(paper["params"])["direction_kind"] == "raw" and json.loads(paper["params"])["embed_weight"] == 1.0
    assert len({r["actor"] for r in rows}) >= 2, "trials should run on both actors"
    pts = np.array([[r["refusals"], r["kl"]] for r in rows])
    dominated = [any((q <= p).all() and (q < p).any() for q in pts) for p in pts]   # brute force, by hand
    assert [r["pareto"] for r in rows] == [not d for d in dominated]
    better = [r for r in rows if r["pareto"] and r["trial"] != 0 and r["refusals"] <= paper["refusals"]
              and r["kl"] <= paper["kl"]]
    assert better, f"no trial on the front matches the paper's {paper['refusals']}/{paper['n']} at KL {paper['kl']:.4f}"
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["trial"] == manifest["chosen"]
    from refdir.flows.sql import connect_views

    evals = connect_views(store).execute(
        "select intervention, value, n from evals where dataset = 'harmful_test' and metric = 'refusal_rate' "
        "and judge = 'substring' and intervention in ('optimized', 'orthogonalized', 'baseline') order by 1").fetchall()
    assert [e[0] for e in evals] == ["baseline", "optimized", "orthogonalized"] and all(e[2] == 16 for e in evals)
    from refdir.flows.report import render_report

    html = render_report(store, spec.run_id)
    part = html[html.index('id="model-organism-trials"'):]
    assert 'data-plot="trials"' in part[:400]
    table = part[:part.index("</table>")]
    assert f'<td class="num">0</td><td class="text">paper&#x27;s direction' in table
    assert all(f'<td class="num">{r["trial"]}</td>' in table for r in rows if r["pareto"])   # the front is listed
    print(f"\nrun with 32 trials in {seconds:.1f} s; paper {paper['refusals']}/{paper['n']} KL {paper['kl']:.4f}; best match "
          f"trial {min(better, key=lambda r: r['kl'])['trial']} KL {min(r['kl'] for r in better):.5f}; evals {evals}")


@pytest.mark.slow
def test_exported_chosen_trial_reproduces_its_completions(selected_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refdir.flows.export import export_model
    from refdir.flows.sql import connect_views

    spec, store, manifest, _ = selected_run
    out = export_model(store.uri, spec.run_id, "organism", tmp_path / "export", trial=manifest["chosen"])
    assert f"trial {manifest['chosen']}" in (out / "README.md").read_text()
    recorded = connect_views(store).execute(
        "select prompt, response from completions where dataset = 'harmful_test' and intervention = 'optimized' "
        "and judge = 'substring' order by prompt_id").fetchall()
    model = AutoModelForCausalLM.from_pretrained(out).eval()       # plain transformers
    tok = AutoTokenizer.from_pretrained(out)
    prompts = [p for p, _ in recorded]
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    tok.padding_side = "left"
    enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        gen = model.generate(**enc, max_new_tokens=spec.generation.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    texts = [t.strip() for t in tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    assert texts == [r for _, r in recorded]


@pytest.mark.slow
def test_sigkill_driver_mid_study_then_rerun(selected_run, tmp_path):
    import shutil

    from refdir.schemas import layout
    from refdir.schemas.spec import StoreSpec
    from refdir.workers.store import Store

    spec0, store0, _, _ = selected_run
    copy = tmp_path / "store"
    shutil.copytree(store0.uri, copy)   # the selected run, on its own store; the study starts afresh there
    spec = spec0.model_copy(update={"store": StoreSpec(uri=str(copy)),
                                    "optimize": spec0.optimize.model_copy(update={"trials": 16})})
    spec = spec.with_inputs(spec0.inputs)
    store = Store.open(spec.store)
    store.delete(f"{layout.model_dir(spec.run_id, 'organism')}/trials", recursive=True)
    store.delete(layout.optimize_manifest(spec.run_id, "organism"))
    store.delete(layout.trials_table(spec.run_id, "organism"))
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    code = ("import json,sys; from refdir.schemas.spec import parse_spec; from refdir.workers.identity import "
            "resolve_inputs; from refdir.workers.store import Store; from tests.test_optimize import _optimize;"
            "s = resolve_inputs(parse_spec(json.load(open(sys.argv[1])))); _optimize(s, Store.open(s.store))")
    markers = layout.trial_markers_dir(spec.run_id, "organism")
    proc = subprocess.Popen([sys.executable, "-c", code, str(spec_path)], env={**os.environ, "REFDIR_LOG": "WARNING"},
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(store.glob(f"{markers}/*.json")) < 4 and proc.poll() is None:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)   # the driver and the Ray cluster it started
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    settled, last, deadline = 0.0, -1, time.time() + 60   # orphaned Ray workers may finish their trial
    while time.time() < deadline and settled < 3.0:
        n = len(store.glob(f"{markers}/*.json"))
        settled, last = (settled + 0.25 if n == last else 0.0), n
        time.sleep(0.25)
    before = {p: store.read_json(p)["written_at"] for p in store.glob(f"{markers}/*.json")}
    assert 4 <= len(before) < 16, f"the driver should die mid-study ({len(before)} trials finished)"
    assert not store.exists(layout.trials_table(spec.run_id, "organism"))
    time.sleep(1.1)
    manifest = _optimize(spec, store)
    after = {p: store.read_json(p)["written_at"] for p in store.glob(f"{markers}/*.json")}
    assert len(after) == 16 and all(after[p] == ts for p, ts in before.items()), "finished trials were redone"
    from refdir.flows.sql import connect_views

    n, distinct, lo, hi = connect_views(store).execute(
        "select count(*), count(distinct trial), min(trial), max(trial) from trials").fetchone()
    assert (n, distinct, lo, hi) == (16, 16, 0, 15), "each trial id exactly once, the planned count"
    assert manifest["planned"] == manifest["done"] == 16
