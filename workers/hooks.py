"""Forward hooks on the residual stream: capture, directional ablation and activation addition.

Every hook lives inside a `with` block and is removed in `finally`, even when the body raises.
Positions are negative offsets: position index i of n_pos means token position -n_pos + i.

    with capture_resid_pre(lm, n_last=len(lm.eoi_ids)) as cap:
        lm.model(**lm.encode(instructions))
    acts = cap.activations()                       # (batch, n_layers, n_last, d) float32, CPU

    with ablate(lm, direction):                    # x <- x - (x.r̂) r̂ at every residual write
        out = lm.model.generate(**batch)
    with actadd(lm, direction, layer=3, coeff=1.0):
        logits = lm.model(**batch).logits
    with actadd_bias(lm, direction, layer=3, coeff=1.0):   # the same, as a bias: no hook (where exact)
        out = lm.model.generate(**batch)

Ablation acts on every block input, every attention output and every MLP output; for families that
norm those outputs before the residual add (Gemma-2/3, OLMo-2) it acts on the post-norm outputs,
i.e. on exactly what enters the residual stream.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from refdir.workers.model import LoadedModel

logger = logging.getLogger(__name__)


class HookError(LookupError):
    """A hook point that does not exist, or a hook that did not fire where it should have."""


def module_at(root: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path ("model.layers", "self_attn.o_proj"); HookError if absent."""
    mod = root
    walked: list[str] = []
    for part in path.split("."):
        child = mod[int(part)] if part.isdigit() and isinstance(mod, nn.ModuleList) else getattr(mod, part, None)
        if not isinstance(child, nn.Module):
            children = [n for n, _ in mod.named_children()][:12]
            where = ".".join(walked) or type(root).__name__
            raise HookError(
                f"hook point {path!r} not found in {type(root).__name__}: {where!r} has no submodule {part!r} "
                f"(its children: {children}). The family's module paths do not fit this model: set `family` "
                f"in the spec to one with this layout, or fix the paths in workers/families.py"
            )
        mod = child
        walked.append(part)
    return mod


def _check_vector(lm: "LoadedModel", v: Tensor, what: str) -> Tensor:
    if v.ndim != 1 or v.shape[0] != lm.d_model:
        raise ValueError(f"{what} must have shape ({lm.d_model},) for this model, got {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError(f"{what} contains NaN or inf")
    return v.detach().to(torch.float64).cpu()


def _unit(v: Tensor) -> Tensor:
    norm = v.norm()
    if norm == 0:
        raise ValueError("direction has zero norm; it cannot be ablated")
    return v / norm


def _hidden_in(args: tuple, kwargs: dict) -> Tensor:
    """The residual stream entering a block, whether passed positionally or as hidden_states=."""
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, h: Tensor) -> tuple[tuple, dict]:
    if args:
        return (h,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


class _OnDevice:
    """A float64 vector, cast to each (device, dtype) once."""

    def __init__(self, v: Tensor):
        self.v = v
        self._cache: dict[tuple, Tensor] = {}

    def to(self, like: Tensor) -> Tensor:
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = self.v.to(device=like.device, dtype=like.dtype)
        return self._cache[key]


_HALF = (torch.float16, torch.bfloat16)


def _project_out(x: Tensor, r_hat: _OnDevice) -> Tensor:
    # x (..., d); r̂ (d,) unit.
    if x.dtype in _HALF:
        # Half precision (GPU runs): in the activation's own dtype, as the paper's code does, with two
        # kernels (mat-vec, fused multiply-subtract) and no copies; hooked generation runs 3 hooks per
        # layer per decode step, so launches and copies are what it costs. bf16 mat-vecs accumulate in fp32.
        r = r_hat.to(x)
        return torch.addcmul(x, (x @ r).unsqueeze(-1), r, value=-1.0)
    # float32 / float64: the reference path the hook == orthogonalisation checks hold to 1e-4
    r = r_hat.to(x)
    return x - (x @ r).unsqueeze(-1) * r


def _map_output(output, fn: Callable[[Tensor], Tensor]):
    """Apply fn to a module output that is a tensor or a tuple whose first item is the tensor."""
    if isinstance(output, Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return (fn(output[0]),) + tuple(output[1:])
    raise HookError(f"cannot edit a module output of type {type(output).__name__} (expected a tensor or tuple)")


@contextmanager
def _hooks() -> Iterator[list]:
    handles: list = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


class ResidCapture:
    """Collects resid_pre of every block, last n_last positions, for each forward pass.

    Slices stay on the model's device until read (one device-to-host copy per read, not one per layer),
    and only forward passes run by the thread that opened the capture are recorded, so an actor can run
    several extraction jobs at once on one model.
    """

    def __init__(self, n_layers: int, n_last: int):
        self.n_layers, self.n_last = n_layers, n_last
        self._thread = threading.get_ident()
        self._per_layer: list[list[Tensor]] = [[] for _ in range(n_layers)]

    def hook(self, layer: int):
        def pre_hook(module, args, kwargs):
            if threading.get_ident() != self._thread:
                return None
            h = _hidden_in(args, kwargs)  # (batch, seq, d)
            if h.shape[1] < self.n_last:
                raise HookError(f"sequence of {h.shape[1]} tokens is shorter than the {self.n_last} positions captured")
            self._per_layer[layer].append(h[:, -self.n_last:, :].detach().clone())
        return pre_hook

    def activations_on_device(self) -> Tensor:
        """(batch, n_layers, n_last, d) in the model's dtype and device; passes since clear() concatenated."""
        counts = [len(x) for x in self._per_layer]
        if not counts or min(counts) == 0 or len(set(counts)) != 1:
            raise HookError(f"capture hooks fired unevenly or not at all (passes per layer: {counts}); "
                            f"run one full forward pass inside the with-block")
        dev = self._per_layer[0][0].device
        passes = [torch.stack([layer[j].to(dev) for layer in self._per_layer], dim=1) for j in range(counts[0])]
        return torch.cat(passes, dim=0)

    def activations(self) -> Tensor:
        """(batch, n_layers, n_last, d) float32 on CPU; passes since the last clear() are concatenated on batch."""
        return self.activations_on_device().to("cpu", torch.float32)

    def clear(self) -> None:
        self._per_layer = [[] for _ in range(self.n_layers)]


@contextmanager
def capture_resid_pre(lm: "LoadedModel", n_last: int):
    """Yield a ResidCapture recording the residual stream at the input of every block."""
    if n_last < 1:
        raise ValueError(f"n_last must be >= 1, got {n_last}")
    cap = ResidCapture(lm.n_layers, n_last)
    with _hooks() as handles:
        for i, block in enumerate(lm.blocks()):
            handles.append(block.register_forward_pre_hook(cap.hook(i), with_kwargs=True))
        yield cap


def _ablation_points(lm: "LoadedModel") -> tuple[list[nn.Module], list[nn.Module]]:
    """(blocks, residual-writing modules) of the model; HookError when a path is missing."""
    fam = lm.family
    blocks = lm.blocks()
    writers = [module_at(b, p) for b in blocks for p in (fam.attn_write, fam.mlp_write)]
    return blocks, writers


@contextmanager
def ablate(lm: "LoadedModel", direction: Tensor):
    """Project r̂ out of every block input and every attention / MLP write, at all positions."""
    r_hat = _OnDevice(_unit(_check_vector(lm, direction, "direction")))
    blocks, writers = _ablation_points(lm)

    def pre_hook(module, args, kwargs):
        return _with_hidden(args, kwargs, _project_out(_hidden_in(args, kwargs), r_hat))

    def out_hook(module, args, output):
        return _map_output(output, lambda t: _project_out(t, r_hat))

    with _hooks() as handles:
        for b in blocks:
            handles.append(b.register_forward_pre_hook(pre_hook, with_kwargs=True))
        for w in writers:
            handles.append(w.register_forward_hook(out_hook))
        yield


@contextmanager
def actadd(lm: "LoadedModel", vector: Tensor, layer: int, coeff: float = 1.0):
    """Add coeff * vector to the residual stream at the input of block `layer`, all positions."""
    if not 0 <= layer < lm.n_layers:
        raise ValueError(f"layer {layer} is out of range for a model with {lm.n_layers} layers (0..{lm.n_layers - 1})")
    v = _OnDevice(_check_vector(lm, vector, "vector") * float(coeff))
    block = lm.blocks()[layer]

    def pre_hook(module, args, kwargs):
        h = _hidden_in(args, kwargs)
        return _with_hidden(args, kwargs, h + v.to(h))

    with _hooks() as handles:
        handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
        yield


def actadd_bias_point(lm: "LoadedModel", layer: int) -> tuple[nn.Module | None, float, str]:
    """(module, scale, why): adding `scale * v` to `module`'s bias adds exactly v to the input of block `layer`.

    That module is the last one writing into the residual before `layer`: block layer-1's MLP output
    projection, whose output reaches the residual unchanged (times Granite's `residual_multiplier`, hence
    the scale). None, with the reason, where no such bias exists: layer 0 (the embedding has no bias, and a
    tied embedding must not change) and families that norm the MLP output before the residual add.
    """
    if not 0 <= layer < lm.n_layers:
        raise ValueError(f"layer {layer} is out of range for a model with {lm.n_layers} layers (0..{lm.n_layers - 1})")
    fam = lm.family
    if layer == 0:
        return None, 1.0, "layer 0 is fed by the embedding, which has no bias"
    if fam.post_mlp_norm is not None:
        return None, 1.0, f"family {fam.name} norms the MLP output ({fam.post_mlp_norm}) before the residual add"
    mod = module_at(lm.blocks()[layer - 1], fam.mlp_out_proj)
    conv1d = type(mod).__name__ == "Conv1D"
    if not (isinstance(mod, nn.Linear) or conv1d) or (mod.weight.shape[1] if conv1d else mod.weight.shape[0]) != lm.d_model:
        return None, 1.0, f"{fam.mlp_out_proj} is a {type(mod).__name__} that does not write the residual as a Linear does"
    cfg = lm.model.config.get_text_config() if hasattr(lm.model.config, "get_text_config") else lm.model.config
    mult = float(getattr(cfg, "residual_multiplier", 1.0) or 1.0)
    return mod, 1.0 / mult, ""


@contextmanager
def actadd_bias(lm: "LoadedModel", vector: Tensor, layer: int, coeff: float = 1.0):
    """`actadd` without a hook: coeff * vector added to the bias of the module writing the residual last before
    block `layer` (see actadd_bias_point); HookError where that is not exact. The module's bias (a parameter
    or None) is put back as it was in `finally`: the same tensor object, so bitwise."""
    mod, scale, why = actadd_bias_point(lm, layer)
    if mod is None:
        raise HookError(f"activation addition at layer {layer} cannot be a bias: {why}; use hooks.actadd")
    v = _check_vector(lm, vector, "vector") * (float(coeff) * scale)
    old = mod.bias
    w = mod.weight
    with torch.no_grad():
        new = v.to(w.device, w.dtype) if old is None else (old.detach().to(torch.float64) + v.to(old.device)).to(old.dtype)
    mod.bias = nn.Parameter(new, requires_grad=False)
    try:
        yield
    finally:
        mod.bias = old
