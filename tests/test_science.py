"""The paper's claims, checked on the refusal model organism through the whole pipeline.

One run (real Prefect API, real local Ray, the organism trained once per session) then:
- the selected candidate passes every paper filter (no fallback);
- harmful refusal >= 0.95 at baseline -> <= 0.05 under ablation and under weight orthogonalisation;
- actadd(+r) induces refusal on harmless prompts (rate >= 0.5, mean refusal score > 0);
- a random direction of the same norm changes neither;
- ablation damages less than actadd(-r) (first-token KL and CE on the model's own completions); ce_pile,
  ce_alpaca and ce_on_distribution exist for baseline / ablation / actadd;
- `refdir export` writes a folder that plain transformers loads and that refuses like the ablated model;
- `refdir export-official` writes the paper's run layout (mean_diffs (n_pos, n_layer, d) float64, ...);
- `refdir sql` answers refusal rate per model x intervention and the candidates' drop reasons.
"""

from __future__ import annotations

import json

import pytest
import torch

from refdir.flows.export import export_model, export_official
from refdir.flows.runner import execute
from refdir.flows.sql import run_sql
from refdir.schemas import layout
from refdir.schemas.spec import ModelSpec
from refdir.workers.identity import resolve_inputs
from refdir.workers.store import Store
from tests.test_pipeline import make_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def science_run(prefect_api, ray_cluster, organism_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("science") / "store"
    spec = make_spec("science", [ModelSpec(key="organism", path=str(organism_dir))], str(root), prompts_per_job=16)
    spec = resolve_inputs(spec.model_copy(update={   # the run id comes from the prompts' and model's content
        "prompts": spec.prompts.model_copy(update={"n_train": 64, "n_val": 32, "n_test": 48}),
        "selection": spec.selection.model_copy(update={"allow_fallback": False})}))
    summary = execute(spec)
    assert summary["models"]["organism"]["status"] == "done", summary
    return spec, Store.open(str(root)), summary["models"]["organism"]["rates"]


def test_selected_candidate_passes_every_filter(science_run):
    spec, store, _ = science_run
    d = store.read_json(layout.direction_json(spec.run_id, "organism"))
    assert d["fallback"] is False
    chosen = [c for c in d["candidates"] if (c["position"], c["layer"]) == (d["position"], d["layer"])]
    assert chosen and chosen[0]["drop_reason"] is None
    assert d["layer"] < int(0.8 * d["n_layers"]) and d["kl_score"] <= 0.1 and d["induce_score"] >= 0


def test_refusal_mediated_by_the_direction(science_run):
    _, _, rates = science_run
    assert rates["harmful_test/baseline"]["refusal_rate"] >= 0.95
    assert rates["harmless_test/baseline"]["refusal_rate"] <= 0.05
    assert rates["harmful_test/ablation"]["refusal_rate"] <= 0.05
    assert rates["harmful_test/orthogonalized"]["refusal_rate"] <= 0.05
    assert rates["harmless_test/actadd"]["refusal_rate"] >= 0.5
    assert rates["harmless_test/actadd"]["mean_refusal_score"] > 0 > rates["harmless_test/baseline"]["mean_refusal_score"]


def test_random_direction_changes_neither(science_run):
    _, _, rates = science_run
    assert rates["harmful_test/random_ablation"]["refusal_rate"] >= 0.95
    assert rates["harmless_test/random_actadd"]["refusal_rate"] <= 0.05


def test_ablation_damages_less_than_actadd(science_run):
    _, _, rates = science_run
    abl, act = rates["damage/ablation"], rates["damage/actadd"]
    assert abl["kl_first_token"] < act["kl_first_token"]
    assert abl["ce_on_distribution"] < act["ce_on_distribution"]
    assert rates["damage/baseline"]["kl_first_token"] == pytest.approx(0.0, abs=1e-6)
    for name in ("baseline", "ablation", "actadd"):   # the paper's three losses for each intervention
        got = rates[f"damage/{name}"]
        assert all(0 < got[m] < 50 for m in ("ce_pile", "ce_alpaca", "ce_on_distribution")), got


def test_exported_model_refuses_like_the_ablated_one(science_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refdir.workers.judges import SubstringJudge
    from refdir.workers.organism import organism_prompts

    spec, store, _ = science_run
    out = export_model(store.uri, spec.run_id, "organism", tmp_path / "export")
    assert (out / "model.safetensors").exists() and (out / "README.md").read_text().count("layer") >= 1
    model = AutoModelForCausalLM.from_pretrained(out).eval()       # plain transformers
    tok = AutoTokenizer.from_pretrained(out)
    prompts = [r["instruction"] for r in organism_prompts("test", "harmful")][:48]
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        gen = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    refused = [v.refused for v in SubstringJudge().judge(prompts, texts)]
    assert sum(refused) / len(refused) <= 0.05


def test_official_format_export(science_run, tmp_path):
    spec, store, _ = science_run
    out = export_official(store.uri, spec.run_id, "organism", tmp_path / "official")
    diffs = torch.load(out / "generate_directions" / "mean_diffs.pt", weights_only=True)
    row = store.read_table(layout.model_row(spec.run_id, "organism")).to_pylist()[0]
    assert diffs.dtype == torch.float64
    assert tuple(diffs.shape) == (len(row["eoi_tokens"]), row["n_layers"], row["d_model"])
    meta = json.loads((out / "direction_metadata.json").read_text())
    d = store.read_json(layout.direction_json(spec.run_id, "organism"))
    assert meta == {"pos": d["position"], "layer": d["layer"]}
    assert torch.allclose(diffs[d["position"] + diffs.shape[0], d["layer"]], torch.tensor(d["vector"], dtype=torch.float64))
    assert (out / "completions" / "harmful_test_ablation_completions.json").exists()   # organism sets keep their names
    assert (out / "loss_evals" / "actadd_loss_eval.json").exists()
    assert (out / "select_direction" / "direction_evaluations_filtered.json").exists()


def test_sql_answers_rates_and_drop_reasons(science_run):
    spec, store, _ = science_run
    rates = json.loads(run_sql(store, "select model, intervention, value from evals where dataset = 'harmful_test' "
                                      "and metric = 'refusal_rate' order by intervention", "json"))
    by = {r["intervention"]: r["value"] for r in rates}
    assert by["baseline"] >= 0.95 and by["ablation"] <= 0.05
    reasons = json.loads(run_sql(store, "select coalesce(drop_reason, 'kept') r, count(*) n from scores group by 1", "json"))
    assert sum(r["n"] for r in reasons) > 0 and any(r["r"] == "kept" for r in reasons)


def test_selection_and_evaluation_resume_without_duplicates(science_run):
    """Kill between jobs, simulated exactly: drop the stage manifests, some job markers and their shards."""
    from refdir.flows.sql import connect_views

    spec, store, _ = science_run
    r, k = spec.run_id, "organism"
    for stage in ("select", "evaluate"):
        store.delete(layout.stage_manifest(r, k, stage))
    score_markers = sorted(store.glob(f"{layout.model_dir(r, k)}/scores/_done/*.json"))
    eval_markers = sorted(store.glob(f"{layout.model_dir(r, k)}/completions/_done/*.json"))
    lost = [score_markers[0], eval_markers[0], eval_markers[-1]]
    for m in lost:
        store.delete(store.read_json(m)["data"])
        store.delete(m)
    before = {m: store.read_json(m)["written_at"] for m in score_markers + eval_markers if m not in lost}
    summary = execute(spec)
    assert summary["models"][k]["status"] == "done"
    after = {m: store.read_json(m)["written_at"] for m in score_markers + eval_markers}
    assert all(after[m] == ts for m, ts in before.items()), "finished jobs were recomputed"
    assert all(m in after for m in lost)
    con = connect_views(store)
    n, distinct = con.execute("select count(*), count(distinct (dataset, intervention, prompt_id, judge)) "
                              "from completions where run_id = ?", [r]).fetchone()
    assert n == distinct > 0
    n, distinct = con.execute("select count(*), count(distinct (position, layer)) from scores where run_id = ?", [r]).fetchone()
    assert n == distinct > 0
    assert summary["models"][k]["rates"]["harmful_test/ablation"]["refusal_rate"] <= 0.05


def test_verify_redoes_corrupt_and_missing_shards(science_run):
    """`refdir run --verify`: a corrupted activation shard and a deleted completion shard are recomputed."""
    from refdir.flows.runner import verify_run

    spec, store, _ = science_run
    r, k = spec.run_id, "organism"
    act_marker = sorted(store.glob(f"{layout.model_dir(r, k)}/activations/_done/*.json"))[1]
    shard = store.read_json(act_marker)["data"]
    blob = bytearray(store.read_bytes(shard))
    blob[len(blob) // 2] ^= 0xFF
    store.write_bytes(shard, bytes(blob))
    eval_marker = sorted(store.glob(f"{layout.model_dir(r, k)}/completions/_done/*.json"))[2]
    store.delete(store.read_json(eval_marker)["data"])
    assert execute(spec)["models"][k]["status"] == "done"          # without --verify: manifests answer
    assert not store.verify(act_marker)
    others = {m: store.read_json(m)["written_at"] for m in store.glob(f"{layout.model_dir(r, k)}/*/_done/*.json")
              if m not in (act_marker, eval_marker)}
    time_before = store.read_json(act_marker)["written_at"]
    assert verify_run(store, spec) == {k: [act_marker, eval_marker]}
    import time as _time
    _time.sleep(1.1)
    summary = execute(spec, verify=True)
    assert summary["models"][k]["status"] == "done"
    assert store.verify(act_marker) and store.verify(eval_marker)
    assert store.read_json(act_marker)["written_at"] != time_before
    # everything derived from the recomputed activation shard is redone (aggregate -> scores -> every evaluation
    # that reads the direction); the other extraction jobs and the baseline completions are not
    redone = {m for m, ts in others.items() if store.read_json(m)["written_at"] != ts}
    derived = {m for m in others if "/scores/_done/" in m or ("/completions/_done/" in m and "-baseline-" not in m)}
    assert redone == derived and derived


def test_every_rate_carries_its_wilson_interval(science_run):
    """evals rows of every rate hold the Wilson 95 % interval of k/n (checked against the score-test roots), the
    run summary carries it for the CLI table, and other metrics have none."""
    from refdir.flows.report import summary_table_rows
    from tests.test_judges import _wilson_by_hand

    spec, store, rates = science_run
    rows = json.loads(run_sql(store, "select metric, value, n, ci_low, ci_high from evals", "json"))
    rated = [r for r in rows if r["metric"].endswith("_rate")]
    assert rated and all(r["ci_low"] is None and r["ci_high"] is None for r in rows if r not in rated)
    for r in rated:
        k = round(r["value"] * r["n"])
        assert (r["ci_low"], r["ci_high"]) == pytest.approx(_wilson_by_hand(k, r["n"]), abs=1e-9)
        assert r["ci_low"] <= r["value"] <= r["ci_high"]
    lo, hi = rates["harmful_test/ablation"]["refusal_rate_ci"]
    table = summary_table_rows({"models": {"organism": {"rates": rates}}})
    cell = next(t["harmful refusal"] for t in table if t["intervention"] == "ablation")
    assert cell == f"{rates['harmful_test/ablation']['refusal_rate']:.3f} [{lo:.3f}, {hi:.3f}]"
