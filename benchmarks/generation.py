"""Hooked-generation benchmark: `generate` inside `hooks.ablate` vs plain `generate` on the same prompts.

    out = bench_generation(lm, n_prompts=16, max_new_tokens=32, batch_size=16, reps=3)
    out["ratio"]            # ablated seconds / plain seconds (goal <= 1.10)

Both sides call refdir's own `workers.evaluate.generate` (greedy, batched, left padded). Ablation of a
direction changes the text, so a sequence could stop at EOS on one side only; to compare equal work
the model's generation config gets `min_new_tokens = max_new_tokens` for the benchmark (restored
after), so every sequence generates exactly `max_new_tokens` tokens on both sides. The direction is a
random unit vector (the cost of a projection does not depend on its values).
"""

from __future__ import annotations

import contextlib
import logging

import torch

from benchmarks.common import Case, paired, prompts, ratio, torch_profile

logger = logging.getLogger(__name__)

GOAL = 1.10


@contextlib.contextmanager
def fixed_length(lm, n_tokens: int):
    """Every sequence generates exactly n_tokens (EOS suppressed until then); config restored after."""
    cfg = lm.model.generation_config
    old = cfg.min_new_tokens
    cfg.min_new_tokens = n_tokens
    try:
        yield
    finally:
        cfg.min_new_tokens = old


def random_direction(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    return (v / v.norm()).float()                                    # (d,) unit


def bench_generation(lm, *, n_prompts: int, max_new_tokens: int, batch_size: int, reps: int,
                     profile_on_miss: bool = True) -> dict:
    from refdir.workers.evaluate import generate
    from refdir.workers.hooks import ablate

    texts = [r["instruction"] for r in prompts("harmful", n_prompts)]
    direction = random_direction(lm.d_model).to(lm.device)
    outputs: dict[str, list[str]] = {}

    def plain(_a) -> None:
        outputs["plain"] = generate(lm, texts, max_new_tokens, batch_size)

    def ablated(_a) -> None:
        with ablate(lm, direction):
            outputs["ablated"] = generate(lm, texts, max_new_tokens, batch_size)

    with fixed_length(lm, 2):   # warm-up: a short run of both sides
        paired({"plain": Case(plain), "ablated": Case(ablated)}, reps=1, warmup=0)
    with fixed_length(lm, max_new_tokens):
        times = paired({"ablated": Case(ablated), "plain": Case(plain)}, reps=reps, warmup=0)
        r = ratio(times, "ablated", "plain")
        profile = None
        if profile_on_miss and r["ratio"] > GOAL:
            profile = torch_profile(lambda: ablated(None))
    new_tokens = n_prompts * max_new_tokens
    out = {"ratio": r["ratio"], "goal": GOAL, "ratio_of_medians": r["ratio_of_medians"],
           "ratio_of_mins": r["ratio_of_mins"], "cpu_ratio": r.get("cpu_ratio"), "cpu_rounds": times.cpu,
           "ablated_s": r["ablated_s"], "plain_s": r["plain_s"], "rounds": times,
           "n_prompts": n_prompts, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
           "new_tokens_per_s_plain": new_tokens / r["plain_s"],
           "hooks": 3 * lm.n_layers, "texts_differ": outputs.get("plain") != outputs.get("ablated")}
    if profile:
        out["profile_ablated"] = profile
    logger.info("generation: ablated %.2fs, plain %.2fs -> ratio %.3f", out["ablated_s"], out["plain_s"], out["ratio"])
    return out
