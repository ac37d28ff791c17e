"""Weight orthogonalisation: edit the weights so the model can no longer write r̂ into the residual.

W <- W - r̂ r̂ᵀ W for every matrix that writes into the residual stream: the token embedding rows
(and extra embeddings such as GPT-2's position table), every attention output projection and every
MLP down projection, with their biases. Tied embeddings are untied first, so the unembedding keeps
its original weights. GPT-2's Conv1D stores its weight as (in, out); Linear as (out, in).

For families without post-norms this is exactly equivalent to hook ablation (`hooks.ablate`); for
Gemma-2/3 and OLMo-2 the norm after the attention/MLP output makes it approximate, and
`max_logit_deviation` measures by how much:

    dev = max_logit_deviation(lm, r, ["How do I bake bread?"])   # lm is not modified
    orthogonalize_(lm, r)                                           # in place
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace

import torch
from torch import Tensor, nn

from refdir.workers.hooks import HookError, ablate, module_at
from refdir.workers.model import LoadedModel

logger = logging.getLogger(__name__)


def _unit64(lm: LoadedModel, direction: Tensor) -> Tensor:
    if direction.ndim != 1 or direction.shape[0] != lm.d_model:
        raise ValueError(f"direction must have shape ({lm.d_model},), got {tuple(direction.shape)}")
    r = direction.detach().to("cpu", torch.float64)
    if not torch.isfinite(r).all() or r.norm() == 0:
        raise ValueError("direction must be finite and non-zero")
    return r / r.norm()


def _work(weight: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    # compute in float32 at least (float64 stays float64), on the weight's device
    dt = torch.promote_types(weight.dtype, torch.float32)
    return weight.to(dt), r.to(device=weight.device, dtype=dt)


@torch.no_grad()
def _edit_rows_(weight: Tensor, r: Tensor) -> None:
    # weight (n, d) whose rows live in the residual space; r (d,) unit
    w, r = _work(weight, r)
    weight.copy_((w - (w @ r).unsqueeze(1) * r.unsqueeze(0)).to(weight.dtype))


@torch.no_grad()
def _edit_cols_(weight: Tensor, r: Tensor) -> None:
    # weight (d, n) whose columns live in the residual space (nn.Linear writing d outputs)
    w, r = _work(weight, r)
    weight.copy_((w - r.unsqueeze(1) * (r @ w).unsqueeze(0)).to(weight.dtype))


def _edit_writer_(mod: nn.Module, r: Tensor, d: int, where: str) -> None:
    """Orthogonalise one output projection (Linear (d, in) or Conv1D (in, d)) and its bias."""
    conv1d = type(mod).__name__ == "Conv1D"
    out_dim = mod.weight.shape[1] if conv1d else mod.weight.shape[0]
    if out_dim != d:
        raise HookError(f"{where}: a {type(mod).__name__} with weight {tuple(mod.weight.shape)} does not write "
                        f"{d} residual features; the family's out-proj path points at the wrong module")
    (_edit_rows_ if conv1d else _edit_cols_)(mod.weight, r)
    bias = getattr(mod, "bias", None)
    if bias is not None:
        _edit_rows_(bias.data.unsqueeze(0), r)


def untie_embeddings_(lm: LoadedModel) -> bool:
    """Give the unembedding its own copy of a tied embedding matrix; True when something was untied."""
    embed = module_at(lm.model, lm.family.embed)
    head = lm.model.get_output_embeddings() if hasattr(lm.model, "get_output_embeddings") else None
    if head is None or head.weight is not embed.weight:
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    for cfg in {id(c): c for c in (lm.model.config, lm.model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    if isinstance(getattr(lm.model, "all_tied_weights_keys", None), dict):
        lm.model.all_tied_weights_keys = {}
    logger.info("untied the input and output embeddings of %s before editing", lm.spec.key)
    return True


def orthogonalize_(lm: LoadedModel, direction: Tensor) -> None:
    """In place: project r̂ out of every weight that writes into the residual stream (see module doc)."""
    r = _unit64(lm, direction)
    fam = lm.family
    untie_embeddings_(lm)
    embed = module_at(lm.model, fam.embed)
    _edit_rows_(embed.weight, r)
    for path in fam.extra_embeds:
        try:
            extra = module_at(lm.model, path)
        except HookError:
            logger.debug("extra embedding %s not in this model; skipped", path)
            continue
        _edit_rows_(extra.weight, r)
    for i, block in enumerate(lm.blocks()):
        for path in (fam.attn_out_proj, fam.mlp_out_proj):
            _edit_writer_(module_at(block, path), r, lm.d_model, f"{fam.blocks}.{i}.{path}")
    if not fam.exact_orthogonalization:
        logger.warning("family %s norms attention/MLP outputs before the residual add: the orthogonalised model "
                       "only approximates directional ablation (measure it with max_logit_deviation)", fam.name)


def _fp32_copy(model: nn.Module) -> nn.Module:
    # nn.Module.float, not the HF override: GGUF models count as "quantized" there though dequantized on load
    return nn.Module.float(copy.deepcopy(model))


@torch.no_grad()
def logit_deviation(lm: LoadedModel, direction: Tensor, instructions: list[str]) -> tuple[float, float]:
    """(max |logits(hook ablation) - logits(orthogonalised copy)|, max |logit|), fp32, non-pad positions."""
    batch = lm.encode(instructions)
    ref_model = lm.model if lm.dtype == torch.float32 else _fp32_copy(lm.model)
    ortho_model = _fp32_copy(lm.model)
    ref = replace(lm, model=ref_model, dtype=torch.float32)
    ortho = replace(lm, model=ortho_model, dtype=torch.float32)
    try:
        with ablate(ref, direction):
            hooked = ref_model(**batch).logits.float()  # (batch, seq, vocab)
        orthogonalize_(ortho, direction)
        edited = ortho_model(**batch).logits.float()
    finally:
        del ortho_model
    mask = batch["attention_mask"].bool()  # (batch, seq)
    return float((hooked - edited).abs()[mask].max()), float(hooked.abs()[mask].max())


def max_logit_deviation(lm: LoadedModel, direction: Tensor, instructions: list[str]) -> float:
    """max |logits(hook ablation on lm) - logits(orthogonalised copy)| in fp32 over non-pad positions; lm unchanged."""
    return logit_deviation(lm, direction, instructions)[0]
