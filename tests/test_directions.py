"""The method's math on synthetic tensors, against hand computations."""

import math

import numpy as np
import pytest
import torch

from refdir.workers.directions import diff_in_means, kl_div_last, nonzero_mask, refusal_scores, unit


def test_refusal_score_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    logits = probs.log() + 3.0  # a shift does not change the softmax
    scores = refusal_scores(logits.float(), [0, 1])
    assert scores.dtype == torch.float64 and scores.shape == (2,)
    assert scores[0].item() == pytest.approx(math.log(0.8 + 1e-8) - math.log(0.2 + 1e-8), abs=1e-6)
    assert scores[1].item() == pytest.approx(math.log(0.2 + 1e-8) - math.log(0.8 + 1e-8), abs=1e-6)
    assert refusal_scores(logits, [0])[0].item() == pytest.approx(0.0, abs=1e-6)  # P = 0.5


def test_refusal_score_is_finite_at_the_extremes_and_rejects_bad_input():
    logits = torch.tensor([[1000.0, 0.0], [0.0, 1000.0]])  # P = 1 and P = 0
    s = refusal_scores(logits, [0])
    assert s[0].item() == pytest.approx(math.log(1 + 1e-8) - math.log(1e-8))
    assert s[1].item() == pytest.approx(math.log(1e-8) - math.log(1 + 1e-8))
    with pytest.raises(ValueError, match="refusal_ids is empty"):
        refusal_scores(logits, [])
    with pytest.raises(ValueError, match=r"\(batch, vocab\)"):
        refusal_scores(logits[None], [0])


def _paper_kl(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """The paper's kl_div_fn by hand in numpy: sum p_a (log(p_a + 1e-6) - log(p_b + 1e-6)) per row."""
    def softmax(x):
        x = x.astype(np.float64)
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    pa, pb = softmax(a.numpy()), softmax(b.numpy())
    return (pa * (np.log(pa + 1e-6) - np.log(pb + 1e-6))).sum(-1)


def test_kl_is_the_papers_eps_formula_by_hand_and_near_torch():
    p = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64).log()
    q = torch.tensor([[0.25, 0.5, 0.25]], dtype=torch.float64).log()
    e = 1e-6
    expected = 0.5 * math.log((0.5 + e) / (0.25 + e)) + 0.25 * math.log((0.25 + e) / (0.5 + e))
    assert kl_div_last(p, q).item() == pytest.approx(expected, abs=1e-15)
    a, b = torch.randn(4, 11), torch.randn(4, 11)
    ref = torch.nn.functional.kl_div(b.double().log_softmax(-1), a.double().log_softmax(-1),
                                     log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_div_last(a, b), ref, atol=1e-5, rtol=1e-4)   # eps moves it by ~1e-6 here
    assert kl_div_last(a, a).abs().max() < 1e-12
    with pytest.raises(ValueError, match="one shape"):
        kl_div_last(a, b[:, :5])


def test_kl_eps_matters_on_a_large_vocabulary_as_in_the_paper():
    """With 32k tokens the tail mass sits below 1e-6; the eps formula then differs from the exact KL by a few
    percent, and refdir must give the paper's number (the 0.1 KL filter is applied to it)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 32000, generator=g, dtype=torch.float64) * 3
    b = a + torch.randn(8, 32000, generator=g, dtype=torch.float64) * 0.35
    exact = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    got = kl_div_last(a, b)
    np.testing.assert_allclose(got.numpy(), _paper_kl(a, b), rtol=1e-10)
    assert (exact - got).abs().max() > 1e-3 * exact.abs().max()   # the eps is visible: not the exact KL


def test_diff_in_means_from_uneven_shards_equals_the_plain_mean_difference():
    gen = torch.Generator().manual_seed(0)
    harmful = torch.randn(13, 2, 3, 5, generator=gen, dtype=torch.float64)  # (prompt, pos, layer, d)
    harmless = torch.randn(7, 2, 3, 5, generator=gen, dtype=torch.float64) + 1.0
    shards = [harmful[:2], harmful[2:11], harmful[11:]]  # uneven, as after filtering
    h_sum, h_n = sum(s.sum(0) for s in shards), sum(len(s) for s in shards)
    got = diff_in_means(h_sum, h_n, harmless.sum(0), len(harmless))
    assert got.dtype == torch.float64 and got.shape == (2, 3, 5)
    torch.testing.assert_close(got, harmful.mean(0) - harmless.mean(0))
    # per-(pos, layer) counts broadcast over d
    counts = torch.full((2, 3), 13)
    torch.testing.assert_close(diff_in_means(h_sum, counts, harmless.sum(0), 7), got)


def test_diff_in_means_rejects_empty_groups_and_shape_mismatch():
    s = torch.ones(2, 4)
    with pytest.raises(ValueError, match="harmless count must be positive"):
        diff_in_means(s, 3, s, 0)
    with pytest.raises(ValueError, match="shapes differ"):
        diff_in_means(s, 3, torch.ones(2, 5), 3)


def test_unit_and_nonzero_mask():
    v = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(unit(v), torch.tensor([0.6, 0.8]))
    with pytest.raises(ValueError, match="zero vector"):
        unit(torch.zeros(3))
    cands = torch.randn(2, 3, 4, dtype=torch.float64)
    cands[0, 0] = 0.0  # layer 0 at a template position: exactly zero
    cands[1, 0] = 1e-9
    cands[1, 2, 1] = float("nan")
    mask = nonzero_mask(cands)
    assert mask.shape == (2, 3) and mask.dtype == torch.bool
    assert mask.tolist() == [[False, True, True], [False, True, False]]
    assert nonzero_mask(cands, prune_norm=0.0)[1, 0]


def test_extraction_sums_match_float64_sums_of_kept_prompts(tiny_lm_factory):
    """forward_capture accumulates the kept prompts' sums on the device in float64, batch by batch."""
    from refdir.workers.extract import forward_capture

    lm = tiny_lm_factory("qwen2")
    prompts = ["how do i bake bread", "tell me a story", "what is the weather", "how do i fix a bike", "hello there"]
    cap = forward_capture(lm, prompts, batch_size=2, label="harmless", filter_prompts=True)
    assert cap.acts.shape == (5, lm.n_layers, len(lm.eoi_ids), lm.d_model)
    assert cap.kept.tolist() == (cap.scores.numpy() < 0).tolist()
    want = cap.acts[torch.from_numpy(cap.kept)].double().sum(0).numpy()
    assert cap.sums.dtype == np.float64 and np.allclose(cap.sums, want, rtol=1e-6, atol=1e-6)
