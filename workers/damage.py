"""The paper's damage metrics: how much an intervention hurts the model on harmless text.

    sets = load_damage_sets(spec.evaluation)          # driver side: texts + (instruction, response) pairs
    m = evaluate.damage_metrics(lm, direction, "ablation", sets, own, batch_size)   # worker side

The worker applies each intervention as evaluation does (`evaluate.intervention`): plain forwards through
orthogonalised weights or an actadd bias where exact, hooks elsewhere.

As in the paper's code (`pipeline/submodules/evaluate_loss.py`), three cross-entropies (nats/token, summed
in float64 over tokens, divided once):

- `ce_pile`: plain-text documents (the paper: the uncopyrighted Pile, streamed from its start), each cut to
  `ce_max_tokens` tokens (paper: 256); loss on every token after the first.
- `ce_alpaca`: Alpaca rows without an `input`, chat-formatted instruction followed by the reference output;
  loss on the response tokens only (the prediction made at the last post-instruction token included).
- `ce_on_distribution`: the same on the model's own baseline completions of the harmless test prompts.

plus `kl_first_token`, the mean KL(baseline || intervention) of the next-token distribution at the last
prompt position on the harmless test prompts (an extra, not in the paper's loss evals).

Sources: `builtin:pile_like` / `builtin:alpaca_like` are short texts the refdir authors wrote themselves
(workers/data/damage/); they are NOT the Pile or Alpaca, just offline stand-ins. `hf:DATASET[:split][@rev]`
loads a hub dataset (the paper's: `hf:monology/pile-uncopyrighted`, `hf:tatsu-lab/alpaca`) or a local
`save_to_disk` folder; `file:PATH` a JSON list / JSONL with `text` (Pile-like) or `instruction` + `output`
(Alpaca-like) fields.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class DamageSourceError(ValueError):
    """A damage-metric source that cannot be used; the message names it and how to fix it."""


@dataclass(frozen=True)
class DamageSets:
    """What the damage metrics run on; small enough to travel to an actor."""

    pile: list[str]                      # plain-text documents
    alpaca: list[tuple[str, str]]        # (instruction, reference response)
    max_tokens: int = 256                # Pile documents are cut to this many tokens (paper: 256)
    pile_source: str = ""
    alpaca_source: str = ""


# ------------------------------------------------------------------------------------------ sources


def builtin_damage_names() -> list[str]:
    folder = resources.files("refdir.workers").joinpath("data", "damage")
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def _records(source: str, shuffle_seed: int | None) -> list[dict]:
    """Raw records of a builtin / file / hf source (hf: shuffled with `shuffle_seed` when given, as the
    paper's code shuffles Alpaca with seed 42; the Pile is read from its start)."""
    scheme, sep, rest = source.partition(":")
    if scheme == "builtin" and sep:
        res = resources.files("refdir.workers").joinpath("data", "damage", f"{rest}.json")
        if "/" in rest or not res.is_file():
            raise DamageSourceError(f"unknown builtin damage set {rest!r}; available: {builtin_damage_names()}")
        return json.loads(res.read_text(encoding="utf-8"))
    if scheme == "file" and sep:
        return _file_records(Path(rest).expanduser())
    if scheme == "hf" and sep:
        return _hf_records(source, rest, shuffle_seed, stream=shuffle_seed is None)
    raise DamageSourceError(f"unknown damage source {source!r}: write builtin:NAME ({builtin_damage_names()}), "
                            "file:PATH or hf:DATASET[:split][@revision]")


def _file_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise DamageSourceError(f"damage source file {str(path)!r} not found (resolved to {path.resolve()})")
    text = path.read_text(encoding="utf-8-sig")
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DamageSourceError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(data, list):
        raise DamageSourceError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
    return data


def _hf_records(source: str, rest: str, shuffle_seed: int | None, stream: bool = False):
    try:
        import datasets
    except ImportError as e:
        raise DamageSourceError(f"{source} needs the optional `datasets` package: pip install 'refdir[hf]'") from e
    from refdir.workers.prompts import _parse_hf, _pick_split

    name, split, revision = _parse_hf(rest)
    local = Path(name).expanduser()
    try:
        if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():
            ds = _pick_split(datasets.load_from_disk(str(local)), split, source)
        else:
            # the Pile is streamed from its start (as the paper's code does): only the first ce_n documents travel
            ds = datasets.load_dataset(name, split=split or "train", revision=revision, streaming=stream)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; one line naming the source
        raise DamageSourceError(f"{source}: could not load dataset {name!r}: {type(e).__name__}: {e}. "
                                "Offline, only local folders (save_to_disk output) work; or use builtin:/file:") from e
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed)
    return ds


def _take(records, n: int, keep) -> list:
    out = []
    for r in records:
        item = keep(r)
        if item is not None:
            out.append(item)
            if len(out) >= n:
                break
    return out


def load_pile(source: str, n: int) -> list[str]:
    """The first `n` non-empty `text` fields (bare strings allowed in builtin/file lists)."""
    def keep(r):
        text = r if isinstance(r, str) else (r.get("text") if isinstance(r, dict) else None)
        return text if isinstance(text, str) and text.strip() else None

    docs = _take(_records(source, None), n, keep)
    if not docs:
        raise DamageSourceError(f"{source}: no records with a non-empty 'text' field (ce_pile_source needs plain text)")
    return docs


def load_alpaca(source: str, n: int) -> list[tuple[str, str]]:
    """(instruction, output) of the first `n` rows whose `input` is empty (the paper's filter); hf sources
    are shuffled with seed 42 first, as the paper's code does."""
    def keep(r):
        if not isinstance(r, dict) or str(r.get("input") or "").strip():
            return None
        ins, out = r.get("instruction"), r.get("output")
        ok = isinstance(ins, str) and ins.strip() and isinstance(out, str) and out.strip()
        return (ins, out) if ok else None

    pairs = _take(_records(source, 42 if source.startswith("hf:") else None), n, keep)
    if not pairs:
        raise DamageSourceError(f"{source}: no rows with non-empty 'instruction' and 'output' and an empty 'input' "
                                "(ce_alpaca_source needs instruction/response pairs)")
    return pairs


def load_damage_sets(evaluation) -> DamageSets:
    """The spec's damage sources (an EvaluationSpec), loaded once on the driver; raises DamageSourceError."""
    ev = evaluation
    return DamageSets(pile=load_pile(ev.ce_pile_source, ev.ce_n), alpaca=load_alpaca(ev.ce_alpaca_source, ev.ce_n),
                      max_tokens=ev.ce_max_tokens, pile_source=ev.ce_pile_source, alpaca_source=ev.ce_alpaca_source)


def check_damage_sources(evaluation) -> None:
    """Preflight: each source loads and yields at least one usable row (reads one row, not ce_n)."""
    load_pile(evaluation.ce_pile_source, 1)
    load_alpaca(evaluation.ce_alpaca_source, 1)


# ------------------------------------------------------------------------------------------ losses


def _nll_sum(lm, ids: torch.Tensor, mask: torch.Tensor, loss_mask: torch.Tensor) -> tuple[float, int]:
    """Sum of -log p(token t+1 | ..t) over positions t where loss_mask[:, t] (shapes (batch, seq))."""
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    with torch.inference_mode():
        logits = lm.model(input_ids=ids, attention_mask=mask).logits           # (batch, seq, vocab)
        for b in range(ids.shape[0]):   # one row at a time in float32: a 150k vocabulary x 256 tokens stays small
            nll = torch.nn.functional.cross_entropy(logits[b, :-1].float(), ids[b, 1:], reduction="none")  # (seq-1,)
            total += (nll.double() * loss_mask[b, :-1]).sum()
    return float(total.item()), int(loss_mask[:, :-1].sum().item())


def pile_ce(lm, docs: list[str], max_tokens: int, batch_size: int) -> tuple[float, int]:
    """Mean CE (nats/token) of plain documents cut to `max_tokens`, every token after the first; and tokens."""
    total, count = 0.0, 0
    for start in range(0, len(docs), batch_size):
        enc = lm.tokenizer(docs[start:start + batch_size], return_tensors="pt", padding=True, padding_side="right",
                           truncation=True, max_length=max_tokens).to(lm.device)
        # position t predicts t+1: a position counts when its successor is a real token
        loss_mask = torch.zeros_like(enc["attention_mask"])
        loss_mask[:, :-1] = enc["attention_mask"][:, 1:]
        s, c = _nll_sum(lm, enc["input_ids"], enc["attention_mask"], loss_mask)
        total, count = total + s, count + c
    return total / max(count, 1), count


def _formatted(lm, instructions: list[str]) -> tuple[list[str], bool]:
    """Prompt strings in the model's format in force, and whether the tokenizer adds special tokens to them."""
    fmt = getattr(lm, "chat_format", None)
    if fmt is not None:
        return lm.format(instructions), fmt.add_special_tokens
    from refdir.workers import chat   # a LoadedModel without a chat_format: the family's chat template

    return chat.format_instructions(lm.tokenizer, lm.family, instructions), False


def _pair_ids(lm, prompt: str, response: str, special: bool) -> tuple[list[int], int]:
    """Ids of prompt+response tokenised together (as the paper's code does) and where the response starts:
    the first id after the longest prefix shared with the prompt alone (a boundary merge, e.g. Llama-2's
    trailing space with the response's first word, moves the start one token back)."""
    p = lm.tokenizer(prompt, add_special_tokens=special)["input_ids"]
    full = lm.tokenizer(prompt + response, add_special_tokens=special)["input_ids"]
    common = next((i for i, (a, b) in enumerate(zip(p, full)) if a != b), min(len(p), len(full)))
    return list(full), common


def response_ce(lm, pairs: list[tuple[str, str]], batch_size: int) -> tuple[float, int]:
    """Mean CE (nats/token) of responses given their chat-formatted instructions, response tokens only."""
    total, count = 0.0, 0
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        prompts, special = _formatted(lm, [i for i, _ in chunk])
        rows = [_pair_ids(lm, p, r, special) for p, (_, r) in zip(prompts, chunk)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        loss_mask = torch.zeros_like(ids)
        for b, (row, first) in enumerate(rows):   # right padding; position t predicts t+1
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = 1
            loss_mask[b, max(first - 1, 0) : len(row) - 1] = 1
        s, c = _nll_sum(lm, ids.to(lm.device), mask.to(lm.device), loss_mask.to(lm.device))
        total, count = total + s, count + c
    return total / max(count, 1), count
