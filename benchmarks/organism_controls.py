"""Damage controls for one model of a finished run: what ablating its direction costs next to random directions.

    python -m benchmarks.organism_controls STORE RUN_ID MODEL [--random 6] [--out controls.json]

Not a speed benchmark: a science diagnostic, run by hand (README, "Where the CE cost comes from"). It loads the
run's model, chosen direction, damage sets (the run's own evaluation spec) and the model's baseline harmless
completions from the store, and prints the damage deltas (CE plain text / Alpaca / own completions, first-token
KL; `workers.evaluate.damage_metrics`, the pipeline's own code) for:

- `ablation` and `random_ablation` exactly as the evaluate stage computes them (the latter is stored by runs
  made since the control was added);
- the chosen direction ablated at every position but the first (is the cost the first token's activation?);
- the chosen direction with its largest-|baseline activation| dimension zeroed (`--zero-dim`, default 507, the
  massive-activation channel of SmolLM2);
- `--random` unit random directions (torch generator seed 0), ablated the same way (norm does not matter).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

import numpy as np
import torch

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _ablate_after_first_position(lm, direction: torch.Tensor):
    """hooks.ablate, but every hooked tensor keeps its first position as it was (diagnostic only)."""
    from refdir.workers import hooks

    plain = hooks._project_out

    def keep_first(x, r_hat):
        out = plain(x, r_hat)
        if x.dim() == 3 and x.shape[1] > 1:
            out[:, 0] = x[:, 0]
        return out

    hooks._project_out = keep_first
    try:
        with hooks.ablate(lm, direction):
            yield
    finally:
        hooks._project_out = plain


def controls(store_uri: str, run_id: str, model: str, n_random: int, zero_dim: int, batch_size: int | None) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc

    from refdir.schemas import layout
    from refdir.schemas.spec import RunSpec
    from refdir.workers.damage import load_damage_sets, pile_ce, response_ce
    from refdir.workers.directions import kl_div_last
    from refdir.workers.scoring import last_logits
    from refdir.workers.evaluate import Direction, damage_metrics, intervention
    from refdir.workers.model import load_model
    from refdir.workers.store import Store

    store = Store.open(store_uri)
    spec = RunSpec.model_validate(store.read_json(layout.run_json(run_id))["spec"])
    mspec = next(m for m in spec.models if m.key == model)
    row = store.read_table(layout.directions_table(run_id, model)).to_pylist()[0]
    d = Direction(torch.tensor(np.asarray(row["vector"], np.float64), dtype=torch.float32), row["layer"], row["position"])
    base = pa.concat_tables([store.read_table(rel) for rel in sorted(store.glob(
        layout.completion_shard(run_id, model, "harmless_test", "baseline", 0).replace("part-00000", "part-*")))])
    base = base.filter(pc.equal(base["judge"], base["judge"][0]))
    own = list(zip(base["prompt"].to_pylist(), base["response"].to_pylist()))
    sets = load_damage_sets(spec.evaluation)
    bs = batch_size or spec.generation.batch_size
    lm = load_model(mspec.model_copy(update={"dtype": "float32"}), device="cpu")

    prompts = [p for p, _ in own]
    plain_logits = last_logits(lm, prompts, bs)

    def run(ctx) -> dict:   # damage_metrics' four figures under a context of this script's own
        with ctx:
            return {"ce_pile": pile_ce(lm, sets.pile, sets.max_tokens, bs), "ce_alpaca": response_ce(lm, sets.alpaca, bs),
                    "ce_on_distribution": response_ce(lm, own, bs),
                    "kl_first_token": (kl_div_last(plain_logits, last_logits(lm, prompts, bs)).mean().item(),
                                       len(prompts))}

    out: dict = {"baseline": damage_metrics(lm, d, "baseline", sets, own, bs),
                 "ablation": damage_metrics(lm, d, "ablation", sets, own, bs),
                 "random_ablation": damage_metrics(lm, d, "random_ablation", sets, own, bs)}
    out["ablation, first position kept"] = run(_ablate_after_first_position(lm, d.vector))
    zeroed = d.vector.clone()
    zeroed[zero_dim] = 0
    out[f"ablation, dim {zero_dim} zeroed"] = run(intervention(lm, "ablation", Direction(zeroed, d.layer, d.position),
                                                               "harmful"))
    g = torch.Generator().manual_seed(0)
    unit = (d.vector / d.vector.norm()).double()
    for i in range(n_random):
        v = torch.randn(lm.d_model, generator=g)
        v_hat = v / v.norm()
        name = f"random {i} (r507 {float(v_hat[zero_dim]):+.3f})"
        out[name] = run(intervention(lm, "ablation", Direction(v, d.layer, d.position), "harmful"))
    b = out["baseline"]
    deltas = {name: {k: m[k][0] - b[k][0] if k.startswith("ce") else m[k][0] for k in m} for name, m in out.items()
              if name != "baseline"}
    return {"run_id": run_id, "model": model, "layer": d.layer, "position": d.position,
            f"direction_unit_dim_{zero_dim}": float(unit[zero_dim]), "baseline": {k: v[0] for k, v in b.items()},
            "deltas": deltas}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store")
    p.add_argument("run_id")
    p.add_argument("model")
    p.add_argument("--random", type=int, default=6)
    p.add_argument("--zero-dim", type=int, default=507)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(2)
    res = controls(args.store, args.run_id, args.model, args.random, args.zero_dim, args.batch_size)
    print(f"{'intervention':40s} {'dCE pile':>9s} {'dCE alpaca':>10s} {'dCE own':>8s} {'KL':>7s}")
    for name, m in res["deltas"].items():
        print(f"{name:40s} {m['ce_pile']:+9.4f} {m['ce_alpaca']:+10.4f} {m['ce_on_distribution']:+8.4f} "
              f"{m['kl_first_token']:7.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
