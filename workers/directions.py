"""The method's math, pure torch: refusal scores, KL, difference in means, normalisation, pruning.

No I/O and no model here; everything takes and returns tensors and says its shapes.

    scores = refusal_scores(logits[:, -1, :], lm.refusal_token_ids)     # (batch,) float64
    cand = diff_in_means(h_sum, h_n, hl_sum, hl_n)                      # (pos, layer, d) float64
    keep = nonzero_mask(cand)                                           # (pos, layer) bool
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

EPS = 1e-8


def refusal_scores(last_logits: Tensor, refusal_ids: list[int]) -> Tensor:
    """log(P + eps) - log(1 - P + eps), P = total softmax probability of the refusal tokens.

    last_logits: (batch, vocab) at the last prompt position -> (batch,) float64.
    """
    if last_logits.ndim != 2:
        raise ValueError(f"last_logits must be (batch, vocab), got shape {tuple(last_logits.shape)}")
    if not refusal_ids:
        raise ValueError("refusal_ids is empty: the family's refusal tokens were not found in the tokenizer")
    probs = torch.softmax(last_logits.to(torch.float64), dim=-1)  # (batch, vocab)
    p = probs[:, list(refusal_ids)].sum(dim=-1)  # (batch,)
    return torch.log(p + EPS) - torch.log(1 - p + EPS)


KL_EPS = 1e-6


def kl_div_last(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(softmax(p) || softmax(q)) per row: (batch, vocab) x 2 -> (batch,) float64.

    Computed as the paper's code does, sum p_a * (log(p_a + 1e-6) - log(p_b + 1e-6)), not the exact KL: the
    eps lowers values near the 0.1 filter threshold by a few percent, and a candidate near the threshold
    must pass or fail as it does in the paper's selection (select_direction.py, kl_div_fn).
    """
    if p_logits.shape != q_logits.shape or p_logits.ndim != 2:
        raise ValueError(f"expected two (batch, vocab) tensors of one shape, got {tuple(p_logits.shape)} "
                         f"and {tuple(q_logits.shape)}")
    p = torch.softmax(p_logits.to(torch.float64), dim=-1)  # (batch, vocab)
    q = torch.softmax(q_logits.to(torch.float64), dim=-1)
    return (p * (torch.log(p + KL_EPS) - torch.log(q + KL_EPS))).sum(dim=-1)


def _mean(total: Tensor, n, what: str) -> Tensor:
    n_t = torch.as_tensor(n, dtype=torch.float64)
    if (n_t <= 0).any():
        raise ValueError(f"{what} count must be positive, got {n}: no prompts of that label survived filtering")
    if n_t.ndim:  # per-(…) counts broadcast over d
        n_t = n_t.unsqueeze(-1)
    return total.to(torch.float64) / n_t


def diff_in_means(harmful_sum: Tensor, harmful_n, harmless_sum: Tensor, harmless_n) -> Tensor:
    """mean_harmful - mean_harmless from float64 sums (…, d) and counts (int, or a tensor of shape (…))."""
    if harmful_sum.shape != harmless_sum.shape:
        raise ValueError(f"sum shapes differ: {tuple(harmful_sum.shape)} vs {tuple(harmless_sum.shape)}")
    return _mean(harmful_sum, harmful_n, "harmful") - _mean(harmless_sum, harmless_n, "harmless")


def unit(v: Tensor) -> Tensor:
    """v / ||v|| along the last dim; ValueError on a zero vector (it has no direction)."""
    norm = v.norm(dim=-1, keepdim=True)
    if (norm == 0).any():
        raise ValueError("cannot normalise a zero vector (prune near-zero candidates with nonzero_mask first)")
    return v / norm


def nonzero_mask(candidates: Tensor, prune_norm: float = 1e-6) -> Tensor:
    """(pos, layer, d) -> (pos, layer) bool: True where the candidate is finite with norm >= prune_norm."""
    norms = candidates.to(torch.float64).norm(dim=-1)  # (pos, layer)
    return torch.isfinite(norms) & (norms >= prune_norm)
