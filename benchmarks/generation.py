"""Generation under each evaluation intervention vs plain `generate`, on the same prompts and tokens.

    out = bench_generation(lm, n_prompts=16, max_new_tokens=32, batch_size=16, reps=3)
    out["generation_ratio"]          # ablation as evaluation runs it (orthogonalised weights) / plain, goal <= 1.03
    out["actadd_generation_ratio"]   # actadd as evaluation runs it (a bias) / plain, goal <= 1.03
    out["hook_generation_ratio"], out["hook_actadd_generation_ratio"]   # the hook paths, for comparison

Every side calls refdir's own `workers.evaluate.generate` (greedy, batched, left padded, sorted by length)
inside the context manager evaluation uses (`evaluate.ablation`, `evaluate.activation_addition`, which fall
back to the hooks where a family's edit is inexact), or inside `hooks.ablate` / `hooks.actadd` for the hook
ratios. The rounds are interleaved (plain, ablation, actadd, hooks ...; the order rotated by one side each round)
after one short warm-up round. Each
context is entered and left outside the timed region: the ratios compare generation speed; what entering
costs once per evaluation job (snapshot + orthogonalise + restore the edited weights) is reported apart as
`ablation_setup_s`, and `generation_ratio_with_setup` charges it to this benchmark's small job.

An intervention changes the text, so a sequence could stop at EOS on one side only; the model's
generation config gets `min_new_tokens = max_new_tokens` (restored after), so every sequence generates
exactly `max_new_tokens` tokens on every side. The direction is a random vector (a projection's or an
addition's cost does not depend on its values); actadd is at the middle layer, coefficient -1 (the bypass).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from typing import Callable

import torch

from benchmarks.common import Times, prompts, ratio, sync, torch_profile

logger = logging.getLogger(__name__)

GOAL = 1.03
HOOK_GOAL = 1.10   # the hook paths: reported beside the plain ones, not a headline


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


def _sides(lm, direction: torch.Tensor, layer: int) -> dict[str, Callable[[], contextlib.AbstractContextManager]]:
    from refdir.workers.evaluate import ablation, activation_addition
    from refdir.workers.hooks import ablate, actadd

    return {"plain": contextlib.nullcontext,
            "ablation": lambda: ablation(lm, direction),
            "actadd": lambda: activation_addition(lm, direction, layer, -1.0),
            "ablation_hooks": lambda: ablate(lm, direction),
            "actadd_hooks": lambda: actadd(lm, direction, layer, coeff=-1.0)}


def _rounds(sides: dict, run: Callable[[], list[str]], reps: int, outputs: dict) -> tuple[Times, dict]:
    """Interleaved rounds: each side's context entered and left untimed, generation timed (wall and CPU)."""
    times = Times(sides)
    setup: dict[str, list[float]] = {n: [] for n in sides}
    names = list(sides)
    for k in range(reps):
        # interleaved: every side once per round, the order rotated each round, so no side always runs
        # first, or right after a given other side (a drift over a round would otherwise bias the later sides)
        for name in names[k % len(names):] + names[: k % len(names)]:
            ctx = sides[name]
            t0 = time.perf_counter()
            with ctx():
                sync()
                enter = time.perf_counter() - t0
                c0, t1 = time.process_time(), time.perf_counter()
                outputs[name] = run()
                sync()
                dt, dc = time.perf_counter() - t1, time.process_time() - c0
                t2 = time.perf_counter()
            setup[name].append(enter + time.perf_counter() - t2)
            times[name].append(dt)
            times.cpu[name].append(dc)
            logger.info("generation round %d %s: %.2fs (cpu %.2fs)", len(times[name]), name, dt, dc)
    return times, setup


def _path(lm, layer: int) -> tuple[str, str]:
    from refdir.workers.hooks import actadd_bias_point

    ablation = "orthogonalized" if lm.family.exact_orthogonalization else "hooks"
    return ablation, "bias" if actadd_bias_point(lm, layer)[0] is not None else "hooks"


def bench_generation(lm, *, n_prompts: int, max_new_tokens: int, batch_size: int, reps: int,
                     profile_on_miss: bool = True) -> dict:
    from refdir.workers.evaluate import generate

    texts = [r["instruction"] for r in prompts("harmful", n_prompts)]
    direction = random_direction(lm.d_model).to(lm.device) * 4.0
    layer = lm.n_layers // 2
    sides = _sides(lm, direction, layer)
    outputs: dict[str, list[str]] = {}
    with fixed_length(lm, 2):   # warm-up: a short round of every side
        _rounds(sides, lambda: generate(lm, texts, 2, batch_size), 1, {})
    with fixed_length(lm, max_new_tokens):
        times, setup = _rounds(sides, lambda: generate(lm, texts, max_new_tokens, batch_size), reps, outputs)
    r = {name: ratio(times, name, "plain") for name in sides if name != "plain"}
    setup_s = statistics.median(setup["ablation"])
    plain_s = r["ablation"]["plain_s"]
    ablation_path, actadd_path = _path(lm, layer)
    out = {"ratio": r["ablation"]["ratio"], "goal": GOAL,
           "generation_ratio": r["ablation"]["ratio"], "actadd_generation_ratio": r["actadd"]["ratio"],
           "hook_generation_ratio": r["ablation_hooks"]["ratio"],
           "hook_actadd_generation_ratio": r["actadd_hooks"]["ratio"], "hook_goal": HOOK_GOAL,
           "ratio_of_mins": r["ablation"]["ratio_of_mins"], "cpu_ratio": r["ablation"].get("cpu_ratio"),
           "by_side": {name: {k: v for k, v in x.items() if k not in ("rounds", "cpu_rounds")} for name, x in r.items()},
           "ablation_path": ablation_path, "actadd_path": actadd_path, "actadd_layer": layer,
           "ablation_setup_s": setup_s, "generation_ratio_with_setup": statistics.median(
               [(a + s) / p for a, s, p in zip(times["ablation"], setup["ablation"], times["plain"])]),
           "setup_s": {n: statistics.median(v) for n, v in setup.items()},
           "rounds": dict(times), "cpu_rounds": times.cpu, "plain_s": plain_s,
           "n_prompts": n_prompts, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
           "new_tokens_per_s_plain": n_prompts * max_new_tokens / plain_s, "hooks": 3 * lm.n_layers,
           "ablation_texts_equal_hooks": outputs["ablation"] == outputs["ablation_hooks"],
           "actadd_texts_equal_hooks": outputs["actadd"] == outputs["actadd_hooks"],
           "texts_differ": outputs["plain"] != outputs["ablation"]}
    misses = {n: f for n, f in (("ablation", out["generation_ratio"]), ("actadd", out["actadd_generation_ratio"]))
              if f > GOAL}
    if profile_on_miss and misses:
        with fixed_length(lm, max_new_tokens):
            for name in misses:
                with sides[name]():
                    out[f"profile_{name}"] = torch_profile(lambda: generate(lm, texts, max_new_tokens, batch_size))
    logger.info("generation / plain: ablation (%s) %.3f, actadd (%s) %.3f; hooks: ablation %.3f, actadd %.3f; "
                "ablation setup %.2fs", ablation_path, out["generation_ratio"], actadd_path,
                out["actadd_generation_ratio"], out["hook_generation_ratio"], out["hook_actadd_generation_ratio"],
                setup_s)
    return out
