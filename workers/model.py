"""Loading a model for refdir: preflight checks, weights, tokenizer, family and positions in one object.

`preflight(spec)` fails fast, before any weights load, with one clear `ModelLoadError` or
`FamilyError`. `load_model(spec)` resolves the family from the config and tokenizer first, then loads
the weights in the family's dtype (`dtype = "auto"` on GPU: float16 for qwen, yi, llama2 as in the
paper's code, bfloat16 otherwise; float32 on CPU), and returns a `LoadedModel`: the HF model in eval
mode, its tokenizer (left padding, a pad token), the resolved `Family`, the `ChatFormat` in force, layer
count and width, the post-instruction token ids and the refusal token ids.

    lm = load_model(ModelSpec(path="HuggingFaceTB/SmolLM2-135M-Instruct"))
    batch = lm.encode(["How do I bake bread?"])            # left padded, on lm.device
    lm.model(**batch).logits[:, -1, :]

`from_model(model, tokenizer)` wraps objects already in memory (tests, the organism trainer).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from transformers import BatchEncoding

from refdir.schemas.spec import ModelSpec
from refdir.workers import chat
from refdir.workers.families import (
    Family, FamilyError, architecture_error, candidates, generic_family, get_family, resolve_family,
)
from refdir.workers.hooks import module_at

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message says what, where and how to fix it."""


@dataclass
class LoadedModel:
    """A model ready for hooks: HF model + tokenizer + family + the positions the method uses."""

    spec: ModelSpec
    model: nn.Module
    tokenizer: object
    family: Family
    n_layers: int
    d_model: int
    eoi_ids: list[int]
    eoi_tokens: list[str]
    refusal_token_ids: list[int]
    missing_refusal_tokens: list[str]
    device: torch.device
    dtype: torch.dtype
    chat_format: chat.ChatFormat
    tail_ids: list[int]  # the template tokens every encoded prompt ends with (<= len(eoi_ids) for the paper's formats)

    def blocks(self) -> list[nn.Module]:
        """The decoder blocks, in order (HookError when the family's path does not fit the model)."""
        return list(module_at(self.model, self.family.blocks))

    def format(self, instructions: list[str]) -> list[str]:
        """The prompt strings in the format in force (tokenize them with `chat_format.add_special_tokens`)."""
        return chat.format_instructions(self.tokenizer, self.chat_format, instructions)

    def encode(self, instructions: list[str]) -> BatchEncoding:
        """Chat-formatted, left-padded input_ids + attention_mask (batch, seq) on self.device.

        Serialised by a lock: a fast tokenizer's padding state is not safe to share between threads
        (an actor may run several extraction jobs at once)."""
        with _ENCODE_LOCK:
            return chat.encode(self.tokenizer, self.chat_format, instructions, device=self.device,
                               tail_ids=self.tail_ids)


_ENCODE_LOCK = threading.Lock()


def last_position_logits(lm: LoadedModel, enc) -> torch.Tensor:
    """Logits at the last position (batch, vocab), asking the model for that position only where its
    forward takes `logits_to_keep` (transformers' CausalLMs; remote-code models may not): the full
    (batch, seq, vocab) projection is most of a small model's forward."""
    if _takes_logits_to_keep(type(lm.model)):
        return lm.model(**enc, logits_to_keep=1).logits[:, -1, :]
    return lm.model(**enc).logits[:, -1, :]


_KEEP_CACHE: dict[type, bool] = {}


def _takes_logits_to_keep(cls: type) -> bool:
    if cls not in _KEEP_CACHE:
        import inspect

        _KEEP_CACHE[cls] = "logits_to_keep" in inspect.signature(cls.forward).parameters
    return _KEEP_CACHE[cls]


def resolve_device(device: str | None) -> torch.device:
    """The given device, or "cuda" when available, else "cpu"."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available here; use device='cpu' or leave it unset")
    return dev


def dtype_for(spec: ModelSpec, device: torch.device, family: Family) -> torch.dtype:
    """The spec's dtype; "auto" = the family's GPU dtype (the paper's code's) on CUDA, float32 elsewhere."""
    if spec.dtype == "auto":
        return _DTYPES[family.gpu_dtype] if device.type == "cuda" else torch.float32
    return _DTYPES[spec.dtype]


# --- preflight -----------------------------------------------------------------------------------

def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).expanduser().exists()


def _check_family(spec: ModelSpec, config, where: str) -> None:
    if spec.family:
        get_family(spec.family)  # FamilyError with close matches when unknown
        return
    if not candidates(config):
        model_type = getattr(config, "model_type", None)
        archs = list(getattr(config, "architectures", None) or [])
        err = architecture_error(model_type, archs)
        raise FamilyError(f"model {spec.key} ({where}): {err}") from None


def _preflight_folder(spec: ModelSpec, folder: Path) -> object | None:
    if spec.gguf_file:
        gguf = folder / spec.gguf_file
        if not gguf.is_file():
            present = sorted(p.name for p in folder.glob("*.gguf"))
            raise ModelLoadError(f"model {spec.key}: GGUF file {str(gguf)!r} does not exist (GGUF files in that "
                                 f"folder: {present or 'none'}); fix `gguf_file` or `path` in the spec")
        return None  # the config is read from the GGUF header at load time
    cfg = folder / "config.json"
    if not cfg.is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f"; it holds GGUF files {ggufs}: set `gguf_file`" if ggufs else \
            "; point `path` at a folder written by save_pretrained (config.json + weights + tokenizer)"
        raise ModelLoadError(f"model {spec.key}: folder {str(folder)!r} has no config.json{hint}")
    try:
        raw = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"model {spec.key}: {cfg} is not valid JSON ({e})") from None
    return SimpleNamespace(model_type=raw.get("model_type"), architectures=raw.get("architectures") or [])


def _preflight_hub(spec: ModelSpec):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"model {spec.key}: {spec.path!r} is neither a local folder nor a hub model reachable from here "
            f"(hub offline or not cached: {type(e).__name__}). Fix the path, download it first, or use a local folder"
        ) from None


def preflight(spec: ModelSpec) -> None:
    """Cheap checks before any weights load: the path, config.json / GGUF file, and a known family."""
    local = Path(spec.path).expanduser()
    if _looks_local(spec.path):
        if not local.exists():
            raise ModelLoadError(f"model {spec.key}: path {spec.path!r} does not exist; fix `path` in the spec")
        if not local.is_dir():
            raise ModelLoadError(f"model {spec.key}: path {spec.path!r} is a file; set `path` to its folder "
                                 f"(and `gguf_file` to the file name for GGUF)")
        config = _preflight_folder(spec, local)
        if config is not None:
            _check_family(spec, config, str(local / "config.json"))
        elif spec.family:
            get_family(spec.family)
        return
    if spec.gguf_file:
        if spec.family:
            get_family(spec.family)
        return  # a hub GGUF: checked when transformers fetches it
    _check_family(spec, _preflight_hub(spec), spec.path)


# --- loading -------------------------------------------------------------------------------------

def _refusal_ids(tokenizer, strings) -> tuple[list[int], list[str]]:
    """First token id of each refusal string; strings that map to nothing or to UNK are missing."""
    ids: list[int] = []
    missing: list[str] = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for s in strings:
        enc = tokenizer.encode(s, add_special_tokens=False)
        if not enc or (unk is not None and enc[0] == unk):
            missing.append(s)
        elif enc[0] not in ids:
            ids.append(enc[0])
    return ids, missing


def refusal_ids_for(spec: ModelSpec, family: Family, tokenizer) -> tuple[list[int], list[str]]:
    """(refusal token ids, missing strings): the spec's ids, else the first token of each refusal string."""
    if spec.refusal_token_ids:
        bad = [i for i in spec.refusal_token_ids if not 0 <= i < len(tokenizer)]
        if bad:
            raise ModelLoadError(f"model {spec.key}: refusal_token_ids {bad} are outside the tokenizer's "
                                 f"vocabulary (0..{len(tokenizer) - 1}); fix `refusal_token_ids` in the spec")
        return list(dict.fromkeys(spec.refusal_token_ids)), []
    return _refusal_ids(tokenizer, spec.refusal_tokens or family.refusal_tokens)


def from_model(model: nn.Module, tokenizer, *, spec: ModelSpec | None = None,
               family: str | Family | None = None) -> LoadedModel:
    """Wrap a model and tokenizer already in memory (the family is resolved unless given)."""
    spec = spec or ModelSpec(path=str(getattr(model.config, "name_or_path", "") or "in-memory"),
                             family=family.name if isinstance(family, Family) else family)
    fam = family if isinstance(family, Family) else resolve_family(model.config, tokenizer, family or spec.family)
    chat.ensure_padding(tokenizer)
    fmt = chat.resolve_format(tokenizer, fam, spec.chat_format)
    eoi, tail = chat.eoi_token_ids(tokenizer, fmt), chat.tail_token_ids(tokenizer, fmt)
    ref_ids, missing = refusal_ids_for(spec, fam, tokenizer)
    if missing:
        logger.warning("model %s: refusal tokens %s not in the tokenizer vocabulary", spec.key, missing)
    blocks = module_at(model, fam.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise ModelLoadError(f"model {spec.key}: {fam.blocks!r} is a {type(blocks).__name__}, not the list of decoder blocks")
    param = next(model.parameters())
    return LoadedModel(
        spec=spec, model=model, tokenizer=tokenizer, family=fam, n_layers=len(blocks),
        d_model=int(module_at(model, fam.embed).weight.shape[1]), eoi_ids=eoi,
        eoi_tokens=tokenizer.convert_ids_to_tokens(eoi), refusal_token_ids=ref_ids,
        missing_refusal_tokens=missing, device=param.device, dtype=param.dtype, chat_format=fmt, tail_ids=tail,
    )


def _placement(dev: torch.device) -> dict:
    """Load straight onto the GPU; shard across every visible GPU when an actor was given several
    (compute.gpus_per_worker > 1 for models larger than one GPU): accelerate's device_map="auto"."""
    if dev.type != "cuda":
        return {}
    return {"device_map": "auto"} if torch.cuda.device_count() > 1 and dev.index is None else {"device_map": str(dev)}


def _config(spec: ModelSpec, kw: dict):
    """The HF config (from the GGUF header for GGUF files), read before any weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec.path, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"model {spec.key}: reading the config of {spec.path!r} failed: {type(e).__name__}: {e}") from e


def _load_tokenizer(spec: ModelSpec, kw: dict, family: Family | None):
    """The model's tokenizer; for a `slow_tokenizer` family, the one closest to the paper's slow tokenizer.

    The paper's code loads Llama-2, Yi and Qwen v1 with use_fast=False. transformers 5 has no slow
    SentencePiece tokenizers and ignores use_fast (except for remote-code tokenizers such as Qwen v1's,
    which are slow anyway), and its LlamaTokenizer rebuilds the pipeline with a Metaspace pre-tokenizer
    that does not prepend "▁" to text that starts with a space: encode(" [/INST] ") gives 5 ids where the
    slow tokenizer gives 6 (`▁ ▁[ / INST ] ▁`). The checkpoint's serialised tokenizer.json (HF's conversion
    of the slow tokenizer: prepend "▁", spaces to "▁") gives the slow tokenizer's ids, so it is loaded as
    is when the checkpoint has one."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    slow = family is not None and family.slow_tokenizer
    try:
        if slow and not spec.gguf_file and not family.trust_remote_code:
            try:
                return PreTrainedTokenizerFast.from_pretrained(spec.path, **kw)
            except (OSError, ValueError, TypeError, KeyError) as e:  # no tokenizer.json: the class's own conversion
                logger.info("model %s: no serialised tokenizer.json (%s); using %s's tokenizer class",
                            spec.key, type(e).__name__, family.name)
        return AutoTokenizer.from_pretrained(spec.path, use_fast=not slow, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"model {spec.key}: loading the tokenizer of {spec.path!r} failed: {type(e).__name__}: {e}") from e


def load_model(spec: ModelSpec, device: str | None = None) -> LoadedModel:
    """Preflight, then config + tokenizer, the family, and the weights in the family's dtype (GGUF too),
    eval mode, on the device; see module doc.

    The tokenizer of a `slow_tokenizer` family is loaded as `_load_tokenizer` says.
    """
    from transformers import AutoModelForCausalLM

    preflight(spec)
    dev = resolve_device(device)
    local = Path(spec.path).expanduser().is_dir()
    kw = dict(revision=None if local else spec.revision, trust_remote_code=spec.trust_remote_code)
    if spec.gguf_file:
        kw["gguf_file"] = spec.gguf_file
    explicit = get_family(spec.family) if spec.family else None
    tokenizer = _load_tokenizer(spec, kw, explicit)
    # A GGUF header is slow to parse: its config comes with the weights, which are dequantised (float32)
    # and cast to the family's dtype after; any other config is read first and the weights load in that dtype.
    config = None if spec.gguf_file else _config(spec, kw)
    fam = resolve_family(config, tokenizer, spec.family) if config is not None else None
    if explicit is None and fam is not None and fam.slow_tokenizer:
        tokenizer = _load_tokenizer(spec, kw, fam)
    dtype = dtype_for(spec, dev, fam or generic_family("llama"))
    try:
        extra = {} if config is None else {"config": config}
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype, **extra, **_placement(dev), **kw)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"model {spec.key}: loading {spec.path!r} failed: {type(e).__name__}: {e}") from e
    if fam is None:  # GGUF
        fam = resolve_family(model.config, tokenizer, spec.family)
        if dtype_for(spec, dev, fam) != dtype:
            dtype = dtype_for(spec, dev, fam)
            model.to(dtype=dtype)
    if not getattr(model, "hf_device_map", None) or len(set(model.hf_device_map.values())) <= 1:
        model.to(dev)
    model.eval()
    logger.info("loaded %s (%s, family %s) on %s as %s", spec.key, type(model).__name__, fam.name, dev, dtype)
    return from_model(model, tokenizer, spec=spec, family=fam)
