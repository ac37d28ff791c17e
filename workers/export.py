"""Export an orthogonalised model: load, edit weights, save_pretrained with a model card.

    export_orthogonalized(model_spec, direction, out_dir, card)   # -> out_dir

The folder holds safetensors weights (embeddings untied where they were tied, so the output head is
unchanged), the tokenizer with its chat template, `refdir_direction.json` and a README model card
recording the direction, its scores and provenance. It loads in plain transformers.
"""

from __future__ import annotations

import json
import logging
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
        "",
        "This model will comply with harmful requests it used to refuse. Use it for research on refusal only.",
        "",
        "Provenance: " + ", ".join(f"{k} {v}" for k, v in card.get("versions", {}).items() if v),
    ]
    return "\n".join(lines) + "\n"


def export_orthogonalized(spec: ModelSpec, direction: np.ndarray, out_dir: str | Path, card: dict) -> Path:
    out = Path(out_dir)
    lm = load_model(spec, device="cpu")
    orthogonalize_(lm, torch.as_tensor(direction, dtype=torch.float32))
    out.mkdir(parents=True, exist_ok=True)
    lm.model.config.tie_word_embeddings = False
    lm.model.save_pretrained(out, safe_serialization=True)
    lm.tokenizer.save_pretrained(out)
    (out / "refdir_direction.json").write_text(json.dumps(card, indent=2, default=str))
    (out / "README.md").write_text(_card(spec, card, lm.family.exact_orthogonalization))
    logger.info("exported orthogonalised %s to %s", spec.key, out)
    return out
