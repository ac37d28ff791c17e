"""Hooks (capture, ablation, actadd) and weight orthogonalisation, on a tiny model of every family.

For every registry family: capture hooks fire on every layer and agree with output_hidden_states;
hook ablation changes the logits, and where the family claims exactness the orthogonalised model
reproduces it (max |Δlogit| < 1e-4, fp32); where it does not (post-norm families) the deviation is
measured and reported. Qwen v1 is covered through a GPT-2-layout model (GPT2LMHeadModel config,
family "qwen" given explicitly), which also exercises Conv1D weights and a tied, extra (position)
embedding.
"""

import dataclasses
import logging

import pytest
import torch

from refdir.workers.hooks import HookError, ablate, actadd, capture_resid_pre
from refdir.workers.orthogonalize import max_logit_deviation, orthogonalize_
from tests.fixtures.tiny import TINY_FAMILIES, tiny_lm

logger = logging.getLogger(__name__)
torch.set_num_threads(1)

INSTRUCTIONS = ["how do i make a cake ?", "tell me", "write a poem about the sea please"]


def _direction(d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@torch.no_grad()
def _logits(lm, batch):
    return lm.model(**batch).logits


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_capture_fires_on_every_layer_and_matches_hidden_states(family):
    lm = tiny_lm(family)
    batch = lm.encode(INSTRUCTIONS)
    n = len(lm.eoi_ids)
    with torch.no_grad():
        out = lm.model(**batch, output_hidden_states=True)  # transformers installs its own recording hooks
    before = _n_hooks(lm.model)
    with torch.no_grad(), capture_resid_pre(lm, n_last=n) as cap:
        lm.model(**batch)
    acts = cap.activations()
    assert acts.shape == (3, lm.n_layers, n, lm.d_model) and acts.dtype == torch.float32
    expected = torch.stack([h[:, -n:, :] for h in out.hidden_states[: lm.n_layers]], dim=1)
    torch.testing.assert_close(acts, expected.float())
    assert _n_hooks(lm.model) == before
    cap.clear()
    with pytest.raises(HookError, match="fired unevenly or not at all"):
        cap.activations()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_ablation_matches_orthogonalisation_where_exact(family):
    lm = tiny_lm(family)
    r = _direction(lm.d_model)
    batch = lm.encode(INSTRUCTIONS)
    mask = batch["attention_mask"].bool()
    base = _logits(lm, batch)
    with ablate(lm, r):
        hooked = _logits(lm, batch)
    assert _n_hooks(lm.model) == 0
    assert (hooked - base).abs()[mask].max() > 1e-2, "ablation must change the logits for this test to bite"
    dev = max_logit_deviation(lm, r, INSTRUCTIONS)
    torch.testing.assert_close(_logits(lm, batch), base, rtol=0, atol=0)  # lm itself untouched
    if lm.family.exact_orthogonalization:
        assert dev < 1e-4, f"{family}: hook ablation and orthogonalisation differ by {dev}"
    else:
        assert dev > 1e-3, f"{family}: post-norm family unexpectedly exact ({dev})"
        logger.info("%s: orthogonalisation deviates from hook ablation by max |Δlogit| = %.3g", family, dev)
    orthogonalize_(lm, r)
    edited = _logits(lm, batch)
    assert ((edited - hooked).abs()[mask].max() < 1e-4) == lm.family.exact_orthogonalization


@pytest.mark.parametrize("family", ["llama3", "gemma2"])
def test_ablation_leaves_no_component_along_the_direction(family):
    lm = tiny_lm(family)
    r = _direction(lm.d_model)
    r_hat = r / r.norm()
    with torch.no_grad(), ablate(lm, r), capture_resid_pre(lm, n_last=4) as cap:
        lm.model(**lm.encode(INSTRUCTIONS))
    assert (cap.activations() @ r_hat).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["qwen", "gemma", "llama2"])
def test_tied_embeddings_are_untied_and_survive_save_and_reload(family, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = tiny_lm(family, tie=True)
    head, embed = lm.model.get_output_embeddings(), lm.model.get_input_embeddings()
    assert head.weight is embed.weight
    original = embed.weight.detach().clone()
    r = _direction(lm.d_model)
    orthogonalize_(lm, r)
    head, embed = lm.model.get_output_embeddings(), lm.model.get_input_embeddings()
    assert head.weight is not embed.weight and not lm.model.config.tie_word_embeddings
    torch.testing.assert_close(head.weight, original, rtol=0, atol=0)  # the unembedding is unchanged
    assert (embed.weight @ (r / r.norm())).abs().max() < 1e-5
    batch = lm.encode(INSTRUCTIONS)
    lm.model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(_logits(lm, batch), reloaded(**batch).logits.detach(), rtol=0, atol=1e-6)


def test_ablation_holds_during_generate():
    lm = tiny_lm("llama3")
    r = _direction(lm.d_model)
    batch = lm.encode(INSTRUCTIONS)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    with torch.no_grad():
        plain = lm.model.generate(**batch, **kw)
        with ablate(lm, r):
            hooked = lm.model.generate(**batch, **kw)
        orthogonalize_(lm, r)
        edited = lm.model.generate(**batch, **kw)
    assert torch.equal(hooked, edited) and not torch.equal(plain, hooked)


def test_hooks_are_removed_even_when_the_body_raises():
    lm = tiny_lm("qwen2")
    r = _direction(lm.d_model)
    for ctx in (ablate(lm, r), actadd(lm, r, layer=1), capture_resid_pre(lm, 2)):
        with pytest.raises(RuntimeError, match="boom"):
            with ctx:
                assert _n_hooks(lm.model) > 0
                raise RuntimeError("boom")
        assert _n_hooks(lm.model) == 0


def test_missing_hook_point_raises_hook_error_naming_the_path():
    lm = tiny_lm("llama3")
    lm.family = dataclasses.replace(lm.family, mlp="feed_forward")
    with pytest.raises(HookError, match="feed_forward"):
        with ablate(lm, _direction(lm.d_model)):
            pass
    assert _n_hooks(lm.model) == 0
    lm.family = dataclasses.replace(lm.family, blocks="model.blocks")
    with pytest.raises(HookError, match="model.blocks"):
        with capture_resid_pre(lm, 2):
            pass


def test_actadd_changes_only_from_its_layer_on():
    lm = tiny_lm("phi3", num_hidden_layers=3)
    v = _direction(lm.d_model)
    batch = lm.encode(INSTRUCTIONS)
    with torch.no_grad(), capture_resid_pre(lm, 4) as cap:
        base_logits = _logits(lm, batch)
    base = cap.activations()
    with torch.no_grad(), actadd(lm, v, layer=1, coeff=-2.0), capture_resid_pre(lm, 4) as cap:
        added_logits = _logits(lm, batch)
    added = cap.activations()
    torch.testing.assert_close(added[:, 0], base[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(added[:, 1], base[:, 1] - 2.0 * v, rtol=0, atol=1e-5)
    assert (added[:, 2] - base[:, 2]).abs().max() > 1e-2
    assert (added_logits - base_logits).abs().max() > 1e-2
    with pytest.raises(ValueError, match="out of range"):
        with actadd(lm, v, layer=3):
            pass


def test_bad_vectors_are_rejected():
    lm = tiny_lm("llama3")
    with pytest.raises(ValueError, match="shape"):
        with ablate(lm, torch.ones(lm.d_model + 1)):
            pass
    with pytest.raises(ValueError, match="zero norm"):
        with ablate(lm, torch.zeros(lm.d_model)):
            pass
    with pytest.raises(ValueError, match="finite and non-zero"):
        orthogonalize_(lm, torch.zeros(lm.d_model))


def test_capture_records_only_its_own_thread(tiny_lm_factory):
    """Two extraction jobs on one model at once (a threaded GPU actor) each see only their own passes."""
    import threading

    lm = tiny_lm_factory("llama3")
    prompts = [["how do i bake bread"] * 2, ["tell me a story about a cat", "what is the weather"]]
    n = len(lm.eoi_ids)

    def alone(batch):
        with capture_resid_pre(lm, n) as cap, torch.inference_mode():
            lm.model(**lm.encode(batch))
            return cap.activations()

    expected = [alone(b) for b in prompts]
    got: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(2)

    def job(i):
        with capture_resid_pre(lm, n) as cap, torch.inference_mode():
            barrier.wait()
            for _ in range(3):   # interleave forward passes of both threads
                cap.clear()
                lm.model(**lm.encode(prompts[i]))
            got[i] = cap.activations()

    threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for i in range(2):
        assert got[i].shape == expected[i].shape
        assert torch.allclose(got[i], expected[i], atol=1e-5)


def test_ablation_in_bfloat16_removes_the_direction(tiny_lm_factory):
    """The half-precision path (GPU runs) projects in the activation's dtype; what is left is rounding."""
    from dataclasses import replace

    lm = tiny_lm_factory("llama3")
    lm = replace(lm, model=lm.model.to(torch.bfloat16), dtype=torch.bfloat16)
    r = torch.randn(lm.d_model)
    r_hat = r / r.norm()
    with ablate(lm, r), capture_resid_pre(lm, len(lm.eoi_ids)) as cap, torch.inference_mode():
        lm.model(**lm.encode(["how do i bake bread", "tell me a story"]))
    acts = cap.activations()                       # float32 copies of bf16 activations
    along = (acts @ r_hat).abs()
    assert (along / acts.norm(dim=-1)).max() < 2e-2
    with capture_resid_pre(lm, len(lm.eoi_ids)) as cap, torch.inference_mode():
        lm.model(**lm.encode(["how do i bake bread", "tell me a story"]))
    assert ((cap.activations() @ r_hat).abs() / cap.activations().norm(dim=-1)).max() > 5e-2
