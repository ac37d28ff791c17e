"""`refdir doctor`: load one model and report what the method will use, before a run spends hours on it.

It answers: which family was resolved, how many layers and how wide, which post-instruction tokens
the directions are extracted at, which refusal tokens are scored (and which are missing from the
vocabulary), and whether weight orthogonalisation reproduces hook ablation for this model (with a
random direction, in fp32, on a few neutral prompts).

    report = doctor(ModelSpec(path="out/organism"))
    report["family"], report["eoi_tokens"], report["ortho_exact"]
"""

from __future__ import annotations

import logging
import random

import torch

from refdir.schemas.spec import ModelSpec
from refdir.workers.model import load_model
from refdir.workers.orthogonalize import logit_deviation

logger = logging.getLogger(__name__)

# Orthogonalisation counts as exact when max |Δlogit| < EXACT_TOLERANCE * max(1, max |logit|): fp32 rounding
# alone gives ~1e-4 on SmolLM2-135M (logits ~40; the same comparison in float64 gives 0.0), while post-norm
# families deviate by ~1e-1 or more.
EXACT_TOLERANCE = 1e-4

_PROMPTS = [
    "Write a short poem about the sea.",
    "How do I bake bread at home?",
    "Give me three tips for learning a language.",
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Suggest a name for a small cafe.",
    "How can I keep my plants healthy?",
    "Summarise the rules of chess.",
]


def doctor(spec: ModelSpec, n_prompts: int = 4, seed: int = 0, device: str | None = None) -> dict:
    """Load `spec` and return a JSON-ready report (keys listed in the module doc and in the contract)."""
    if n_prompts < 1:
        raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
    lm = load_model(spec, device=device)
    rng = random.Random(seed)
    prompts = [rng.choice(_PROMPTS) for _ in range(n_prompts)]
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(lm.d_model, generator=gen, dtype=torch.float32)
    dev, scale = logit_deviation(lm, direction, prompts)
    report = {
        "family": lm.family.name,
        "model_type": getattr(lm.model.config, "model_type", None),
        "n_layers": lm.n_layers,
        "d_model": lm.d_model,
        "eoi_tokens": [str(t) for t in lm.eoi_tokens],
        "eoi_token_ids": list(lm.eoi_ids),
        "refusal_tokens": list(spec.refusal_tokens or lm.family.refusal_tokens),
        "refusal_token_ids": list(lm.refusal_token_ids),
        "missing_refusal_tokens": list(lm.missing_refusal_tokens),
        "ortho_exact": bool(dev < EXACT_TOLERANCE * max(1.0, scale)),
        "max_abs_logit_diff": dev,
        "max_abs_logit": scale,
        "exact_orthogonalization": lm.family.exact_orthogonalization,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": str(lm.device),
    }
    if report["ortho_exact"] != lm.family.exact_orthogonalization:
        logger.warning("model %s: registry says exact_orthogonalization=%s but measured max |Δlogit| = %.2e",
                       spec.key, lm.family.exact_orthogonalization, dev)
    return report
