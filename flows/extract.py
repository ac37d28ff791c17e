"""Extract stage (driver side): plan the extraction jobs, run those whose marker does not vouch for their
inputs, write the stage manifest, then check the paper's prompt filters on what was extracted.

    run(mr)                            # mr: flows/stages.ModelRun of one model
    extract_markers(mr, "train")       # the planned jobs' markers, each checked against its job
    kept_prompts(mr, "val", "harmful") # prompts the filter kept, read through their recorded sha256

The first stage: its inputs are the drawn prompts and the model (their digests are in the stage's input
digest), so it checks no predecessor.
"""

from __future__ import annotations

import pyarrow.compute as pc

from refdir.flows import plan
from refdir.flows.stages import ModelRun, StageError
from refdir.schemas import layout
from refdir.schemas.jobs import Prompt
from refdir.workers.identity import digest_json


def run(mr: ModelRun) -> None:
    if mr.stage_done("extract"):
        check_filters(mr)   # a resumed run stops here too, not one stage later
        return
    jobs = plan.extract_jobs(mr.spec, mr.model, mr.draw)
    planned, done = mr.run_jobs("extract", "extract", jobs, plan.extract_marker)
    outputs = {plan.extract_marker(j): mr.store.recorded_files(mr.store.marker(plan.extract_marker(j)) or {})
               for j in jobs}
    mr.mark("extract", planned, done, outputs=digest_json(outputs))
    if done == planned:
        check_filters(mr)   # both filters (train, val) before aggregation and selection start


def extract_markers(mr, split: str | None = None) -> dict[str, dict]:
    """Marker path -> marker of the planned extraction jobs (of one split), each checked against its job."""
    out = {}
    for job in plan.extract_jobs(mr.spec, mr.model, mr.draw):
        if split is None or job.split == split:
            m = mr.store.marker(plan.extract_marker(job))
            if not plan.is_done(m, job):
                raise StageError(f"model {mr.key!r}: extraction job {job.job_id} has no marker for its inputs; "
                                 "rerun the run to redo it")
            out[plan.extract_marker(job)] = m
    return out


def kept_prompts(mr, split: str, label: str) -> list[Prompt]:
    """Prompts of a split whose extraction marked them kept (the paper's filter), in draw order."""
    rows = []
    for m in extract_markers(mr, split).values():
        if m.get("label") != label:
            continue
        t = mr.store.read_table(m["prompts"], sha256=m["prompts_sha256"]).filter(pc.field("kept"))
        rows += [Prompt(prompt_id=p, instruction=i, category=c) for p, i, c in
                 zip(t["prompt_id"].to_pylist(), t["instruction"].to_pylist(), t["category"].to_pylist())]
    return rows


def check_kept(mr, split: str) -> dict[str, list[Prompt]]:
    check_filters(mr)
    return {label: kept_prompts(mr, split, label) for label in layout.LABELS}


def filter_counts(mr) -> dict[tuple[str, str], tuple[int, int, float | None]]:
    """(split, label) -> (kept, drawn, best baseline refusal score of the side the filter wants)."""
    out: dict[tuple[str, str], list] = {}
    for m in extract_markers(mr).values():       # the prompts shards, read through their recorded sha256
        t = mr.store.read_table(m["prompts"], sha256=m["prompts_sha256"])
        scores = [s for s in t["refusal_score"].to_pylist() if s is not None]
        best = (max if m["label"] == "harmful" else min)(scores) if scores else None
        c = out.setdefault((m["split"], m["label"]), [0, 0, None])
        c[0] += sum(bool(k) for k in t["kept"].to_pylist())
        c[1] += t.num_rows
        if best is not None:
            c[2] = best if c[2] is None else (max if m["label"] == "harmful" else min)(c[2], best)
    return {k: tuple(v) for k, v in out.items()}


def check_filters(mr) -> None:
    """Both of the paper's filters (train, val) at once: one error naming every split left empty."""
    bites = []
    for (split, label), (kept, drawn, best) in sorted(filter_counts(mr).items()):
        if kept == 0 and drawn > 0:
            sign = "> 0" if label == "harmful" else "< 0"
            extreme = "highest" if label == "harmful" else "lowest"
            bites.append((split, f"{label} {split}: 0 of {drawn} kept (needs baseline refusal score {sign}; "
                                 f"{extreme} seen {'none' if best is None else f'{best:.2f}'})"))
    if bites:
        flags = " and ".join(f"prompts.filter_{s} = false" for s in sorted({s for s, _ in bites}))
        raise StageError(
            f"model {mr.key!r}: the paper's prompt filter leaves nothing to work with — "
            + "; ".join(text for _, text in bites)
            + f". The model may not refuse as its family expects: check `refdir doctor` (refusal tokens, chat "
            f"template), use other prompts, or set {flags} in the spec")
