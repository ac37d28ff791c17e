"""Evaluation interventions as plain generation, against the hooks (the paper's definition), on a tiny model
of every registry family (fp32, eager attention).

- ablation: `evaluate.ablation` runs through the orthogonalised weights (no hook fires) where the family
  claims exactness and through `hooks.ablate` elsewhere; logits agree with the hook path to 1e-4 and the
  greedy completions are the same strings.
- activation addition: `evaluate.activation_addition` is a bias on block l-1's MLP output projection where
  exact. HF's own `output_hidden_states` (the residual stream at every block input, not refdir's capture)
  moves by exactly coeff * v at block l and not before; logits agree with `hooks.actadd` to 1e-4, greedy
  completions are equal, for coeff +1 and -1 (the damage metrics use actadd(-r)); the bias comes back
  as it was. Post-norm families and layer 0 run the hook.
- `generate` sorts prompts by token length and returns completions in the caller's order, identical to
  generating each prompt alone (no padding at all).
"""

import logging

import pytest
import torch

from refdir.workers.evaluate import Direction, ablation, activation_addition, generate, intervention
from refdir.workers.hooks import HookError, ablate, actadd, actadd_bias, module_at
from tests.fixtures.tiny import TINY_FAMILIES, tiny_lm

torch.set_num_threads(1)

INSTRUCTIONS = ["how do i make a cake ?", "tell me", "write a poem about the sea please", "what is the weather today"]
POSTNORM = {"gemma2", "gemma3", "gemma3-mm", "olmo2"}
TOKENS = 8
ATOL = 1e-4


def _direction(d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@torch.no_grad()
def _run(lm, batch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], int]:
    """(logits, hidden_states, hooks registered on the model) of one forward pass."""
    out = lm.model(**batch, output_hidden_states=True)
    return out.logits, out.hidden_states, _n_hooks(lm.model)


def _state(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b).abs()[mask].max())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_ablation_as_plain_generation_matches_the_hooks(family):
    lm = tiny_lm(family)
    r = _direction(lm.d_model)
    batch = lm.encode(INSTRUCTIONS)
    mask = batch["attention_mask"].bool()
    base, _, hooks_before = _run(lm, batch)
    with ablate(lm, r):
        hooked, _, _ = _run(lm, batch)
        hooked_text = generate(lm, INSTRUCTIONS, TOKENS, batch_size=2)
    assert _max_diff(hooked, base, mask) > 1e-2, "ablation must change the logits for this test to bite"
    with ablation(lm, r):
        plain, _, hooks_inside = _run(lm, batch)
        plain_text = generate(lm, INSTRUCTIONS, TOKENS, batch_size=2)
    exact = family not in POSTNORM
    assert lm.family.exact_orthogonalization == exact
    assert (hooks_inside == hooks_before) == exact       # no hook at all where the weights do it
    assert _max_diff(plain, hooked, mask) < ATOL
    assert plain_text == hooked_text
    after, _, _ = _run(lm, batch)
    torch.testing.assert_close(after, base, rtol=0, atol=0)   # weights restored bitwise


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("coeff", [1.0, -1.0])
def test_actadd_as_a_bias_matches_the_hooks(family, coeff):
    lm = tiny_lm(family, num_hidden_layers=3)
    v, layer = 2.0 * _direction(lm.d_model), 2
    batch = lm.encode(INSTRUCTIONS)
    mask = batch["attention_mask"].bool()
    state = _state(lm)
    base, base_h, hooks_before = _run(lm, batch)
    with actadd(lm, v, layer, coeff=coeff):
        hooked, _, _ = _run(lm, batch)
        hooked_text = generate(lm, INSTRUCTIONS, TOKENS, batch_size=2)
    assert _max_diff(hooked, base, mask) > 1e-2, "the addition must change the logits for this test to bite"
    with activation_addition(lm, v, layer, coeff):
        plain, plain_h, hooks_inside = _run(lm, batch)
        plain_text = generate(lm, INSTRUCTIONS, TOKENS, batch_size=2)
    exact = family not in POSTNORM
    assert (hooks_inside == hooks_before) == exact
    if exact:   # HF's residual stream at block inputs: untouched before `layer`, + coeff * v at `layer`
        torch.testing.assert_close(plain_h[layer - 1], base_h[layer - 1], rtol=0, atol=0)
        added = (plain_h[layer] - base_h[layer])[mask]                      # (tokens, d)
        torch.testing.assert_close(added, (coeff * v).expand_as(added), rtol=0, atol=1e-5)
    assert _max_diff(plain, hooked, mask) < ATOL
    assert plain_text == hooked_text
    after = _state(lm)
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_actadd_at_layer_0_and_on_post_norm_families_uses_the_hook(caplog):
    lm = tiny_lm("llama3")
    v = _direction(lm.d_model)
    with caplog.at_level(logging.INFO, logger="refdir.workers.evaluate"):
        for _ in range(2):
            with activation_addition(lm, v, 0, 1.0):
                assert _n_hooks(lm.model) == 1
    lines = [r.getMessage() for r in caplog.records if "runs under hooks" in r.getMessage()]
    assert len(lines) == 1 and "layer 0" in lines[0] and "embedding" in lines[0]
    with pytest.raises(HookError, match="layer 0"):
        with actadd_bias(lm, v, 0):
            pass
    g = tiny_lm("gemma2")
    with pytest.raises(HookError, match="post_feedforward_layernorm"):
        with actadd_bias(g, _direction(g.d_model), 1):
            pass


def test_actadd_bias_is_restored_when_the_body_raises():
    lm = tiny_lm("qwen")           # GPT-2 layout: Conv1D c_proj with a bias of its own
    v = _direction(lm.d_model)
    proj = module_at(lm.blocks()[0], lm.family.mlp_out_proj)
    bias = proj.bias
    saved = bias.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with actadd_bias(lm, v, 1, coeff=-1.0):
            assert not torch.equal(proj.bias, saved)
            raise RuntimeError("boom")
    assert proj.bias is bias and torch.equal(bias, saved)
    llama = tiny_lm("llama3")      # no bias: one is added for the block, then removed again
    down = module_at(llama.blocks()[0], llama.family.mlp_out_proj)
    with actadd_bias(llama, _direction(llama.d_model), 1):
        assert down.bias is not None
    assert down.bias is None and "bias" not in dict(down.named_parameters())


def test_intervention_routes_every_name_through_the_plain_paths():
    lm = tiny_lm("smollm2")
    d = Direction(_direction(lm.d_model), 1, -1)
    for name in ("baseline", "ablation", "actadd", "orthogonalized", "random_ablation", "random_actadd"):
        with intervention(lm, name, d, "harmful"):
            assert _n_hooks(lm.model) == 0, name
    with pytest.raises(ValueError, match="optimize stage"):
        intervention(lm, "optimized", d, "harmful")


def test_generate_sorts_by_token_length_and_keeps_the_callers_order():
    lm = tiny_lm("llama3")
    prompts = ["tell me a poem about the sea please", "hi", "how do i make a cake ?", "tell me",
               "what is the weather today ? describe the sea", "bake bread"]
    alone = [generate(lm, [p], TOKENS, batch_size=1)[0] for p in prompts]   # no padding at all
    seen: list[list[int]] = []
    real = lm.model.generate

    def spy(**kw):
        seen.append(kw["attention_mask"].sum(dim=1).tolist())
        return real(**kw)

    lm.model.generate = spy
    try:
        batched = generate(lm, prompts, TOKENS, batch_size=2)
    finally:
        del lm.model.generate
    assert batched == alone
    flat = [n for batch in seen for n in batch]
    assert flat == sorted(flat) and len(seen) == 3     # batches of neighbours in token length
    assert generate(lm, [], TOKENS, batch_size=2) == []


@pytest.mark.parametrize("family", ["llama3", "qwen", "granite"])
def test_damage_metrics_on_the_plain_paths_equal_the_hooks(family, monkeypatch):
    """The damage metrics (CE on texts, first-token KL) with actadd(-r) as a bias and ablation through the
    weights equal the same metrics with the paper's hooks forced."""
    import refdir.workers.evaluate as ev
    from refdir.workers.damage import DamageSets

    lm = tiny_lm(family, num_hidden_layers=3)
    sets = DamageSets(["how do i make a cake ?", "tell me the weather today please"],
                      [("how do i bake bread", "sure here can you ."), ("write a poem", "the sea")])
    own = [("how do i make a cake", "sure here"), ("what is the sea", "the sea")]
    d = Direction(3 * _direction(lm.d_model), 2, -1)
    names = ("ablation", "actadd")
    plain = {n: ev.damage_metrics(lm, d, n, sets, own, 2) for n in names}
    monkeypatch.setattr(ev, "ablation", lambda lm, r: ablate(lm, r))
    monkeypatch.setattr(ev, "activation_addition", lambda lm, v, layer, c: actadd(lm, v, layer, coeff=c))
    hooked = {n: ev.damage_metrics(lm, d, n, sets, own, 2) for n in names}
    base = ev.damage_metrics(lm, d, "baseline", sets, own, 2)
    for n in names:
        assert plain[n].keys() == hooked[n].keys()
        for k, (value, count) in hooked[n].items():
            assert plain[n][k][1] == count
            assert plain[n][k][0] == pytest.approx(value, rel=1e-5, abs=1e-6), (n, k)
        moved = max(abs(hooked[n][k][0] - base[k][0]) for k in base)
        assert moved > 1e-3, f"{n} must change the metrics for this test to bite"
