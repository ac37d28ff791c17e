"""Export an orthogonalised model: load, edit weights, save_pretrained with a model card.

    export_orthogonalized(model_spec, direction, out_dir, card)   # -> out_dir

The folder holds safetensors weights (embeddings untied where they were tied, so the output head is
unchanged), the tokenizer with its chat template, `refdir_direction.json` and a README model card
recording the direction, its scores and provenance. It loads in plain transformers.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from refdir.schemas.spec import ModelSpec
from refdir.workers.model import load_model
from refdir.workers.orthogonalize import orthogonalize_

logger = logging.getLogger(__name__)


def _card(spec: ModelSpec, card: dict, exact: bool) -> str:
    d = card["direction"]
    lines = [
        f"# {spec.key} with the refusal direction orthogonalised",
        "",
        f"Base model: `{spec.path}`" + (f" (revision `{spec.revision}`)" if spec.revision else ""),
        f"Made by refdir from run `{card['run_id']}`: the weights writing into the residual stream (embeddings,",
        "attention output and MLP down projections) were edited as W <- W - r r^T W, with r the unit refusal",
        "direction (Arditi et al., 2024, 'Refusal in Language Models Is Mediated by a Single Direction').",
        "",
        "| field | value |", "| --- | --- |",
        f"| position | {d['position']} |", f"| layer | {d['layer']} |",
        f"| bypass score | {d['bypass_score']:.4f} |", f"| induce score | {d['induce_score']:.4f} |",
        f"| KL | {d['kl_score']:.4f} |", f"| fallback selection | {d.get('fallback', False)} |",
        f"| exact orthogonalisation | {exact} |",
        *([f"| source weights | {card['source_weights']} |"] if card.get("source_weights") else []),
        "",
        "This model will comply with harmful requests it used to refuse. Use it for research on refusal only.",
        "",
        "Provenance: " + ", ".join(f"{k} {v}" for k, v in card.get("versions", {}).items() if v),
    ]
    return "\n".join(lines) + "\n"


def _trial_card(spec: ModelSpec, card: dict, exact: bool) -> str:
    """The model card of an optimize trial's export: the trial's parameters and per-layer weights."""
    t = card["trial"]
    rows = [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(t["params"].items())]
    lines = [f"# {spec.key} with an optimised weighted orthogonalisation (trial {t['trial']})", "",
             f"Base model: `{spec.path}`" + (f" (revision `{spec.revision}`)" if spec.revision else ""),
             f"Made by refdir from run `{card['run_id']}`, optimize trial {t['trial']}: W <- W - w r r^T W with per-layer",
             "weights w for the attention output and MLP down projections and one weight for the embeddings (refdir's",
             "README, 'Optimised abliteration'). The trial's parameters (positions and widths in layers, min_weight a",
             "fraction of max_weight):", "", "| parameter | value |", "| --- | --- |", *rows, "",
             f"Harmful val refusals {t['refusals']}/{t['n']}, first-token KL on harmless val {t['kl']:.4f}; "
             f"position {t['position']}.", "",
             f"Embedding weight {t['weights']['embed']:.4f}; attention-out weights "
             f"{[round(w, 4) for w in t['weights']['attn']]}; MLP-down weights {[round(w, 4) for w in t['weights']['mlp']]}.",
             f"Exact orthogonalisation family: {exact}.", "",
             "This model will comply with harmful requests it used to refuse. Use it for research on refusal only."]
    return "\n".join(lines) + "\n"


def export_orthogonalized(spec: ModelSpec, direction: np.ndarray, out_dir: str | Path, card: dict,
                          weights=None) -> Path:
    """Load, orthogonalise, save into a temporary sibling folder, then move it to `out_dir` (which must be
    absent or empty): a failure leaves no folder behind. GGUF weights are saved dequantised (safetensors)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"export folder {str(out)!r} exists and is not empty; choose a new --out")
    lm = load_model(spec, device="cpu")
    if weights is None:
        orthogonalize_(lm, torch.as_tensor(direction, dtype=torch.float32))
    else:   # an optimize trial (workers/optimize.py): float64 direction, as its trial job used it
        from refdir.workers.optimize import weighted_orthogonalize_

        weighted_orthogonalize_(lm, torch.as_tensor(direction, dtype=torch.float64), weights)
    lm.model.config.tie_word_embeddings = False
    model = lm.model
    if spec.gguf_file:
        model = _dequantised(lm.model)
        card = {**card, "source_weights": f"GGUF `{spec.gguf_file}`, dequantised by transformers on load and saved as "
                                          f"{str(model.dtype).replace('torch.', '')} safetensors (not quantised)"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)
        (tmp / "refdir_direction.json").write_text(json.dumps(card, indent=2, default=str))
        (tmp / "README.md").write_text((_trial_card if "trial" in card else _card)(spec, card,
                                                                                lm.family.exact_orthogonalization))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported orthogonalised %s to %s", spec.key, out)
    return out


def _dequantised(model: torch.nn.Module) -> torch.nn.Module:
    """A GGUF-loaded model as a plain one: transformers dequantises GGUF tensors on load but marks the model
    quantised (and so not serialisable); rebuild the class from its config without `quantization_config`
    and load the (edited, already float) state dict into it."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state = model.state_dict()
    dtype = next(iter(state.values())).dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("rotary_emb.inv_freq")]:
        raise RuntimeError(f"dequantised export: state dict does not fit {type(plain).__name__} "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return plain.eval()
