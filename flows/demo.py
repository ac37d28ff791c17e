"""`refdir demo`: the refusal model organism through the whole pipeline.

    spec = demo_spec("refdir-store", seed=0)   # trains the organism if needed, returns a RunSpec

The organism is trained once and kept in the store at models/organism-seed{seed}/ so users can
inspect, export or rerun it. For an s3:// store it is trained in a local cache folder
($REFDIR_CACHE or ~/.cache/refdir) and a copy is uploaded to the same place in the store.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from refdir.schemas import layout
from refdir.schemas.spec import (ComputeSpec, EvaluationSpec, ExtractionSpec, GenerationSpec, ModelSpec, PromptSpec,
                                 RunSpec, StoreSpec)
from refdir.workers.organism import build_organism, organism_is_built
from refdir.workers.store import Store

logger = logging.getLogger(__name__)


def organism_path(store: Store, seed: int) -> Path:
    """Local folder of the organism for this store, trained on first use."""
    rel = layout.organism_dir(seed)
    if store.uri.startswith("s3://"):
        cache = Path(os.environ.get("REFDIR_CACHE", Path.home() / ".cache" / "refdir")) / rel
    else:
        cache = Path(store.url(rel).removeprefix("file://"))
    if not organism_is_built(cache):
        logger.info("training the refusal organism (seed %d) into %s", seed, cache)
        build_organism(cache, seed=seed)
    if store.uri.startswith("s3://") and not store.exists(f"{rel}/config.json"):
        for f in sorted(cache.iterdir()):
            store.write_bytes(f"{rel}/{f.name}", f.read_bytes())
    return cache


def demo_spec(store_uri: str, seed: int = 0, max_new_tokens: int = 8) -> RunSpec:
    store = Store.open(store_uri)
    store.check_writable()
    path = organism_path(store, seed)
    src = "builtin:organism_{}_{}"
    return RunSpec(
        name=f"demo-organism-seed{seed}",
        models=[ModelSpec(key="organism", path=str(path.resolve()), dtype="float32")],
        prompts=PromptSpec(harmful_train=src.format("harmful", "train"), harmless_train=src.format("harmless", "train"),
                           harmful_val=src.format("harmful", "val"), harmless_val=src.format("harmless", "val"),
                           harmful_test=src.format("harmful", "test"), harmless_test=src.format("harmless", "test"),
                           n_train=64, n_val=32, n_test=32),
        extraction=ExtractionSpec(prompts_per_job=32, candidates_per_job=10),
        generation=GenerationSpec(max_new_tokens=max_new_tokens, batch_size=32),
        evaluation=EvaluationSpec(prompts_per_job=32),
        store=StoreSpec(uri=store.uri),
        compute=ComputeSpec(batch_size=32, num_workers=1, cpus_per_worker=1),
    )


def phrase_rates(store: Store, run_id: str, model: str, phrase: str) -> list[dict]:
    """Per (dataset, intervention): how many completions the paper's substring judge counts as refusals, and
    how many contain `phrase` (a reader's judge: the toy organism's refusal minus its first word)."""
    from refdir.flows.sql import connect_views

    con = connect_views(store)
    try:
        found = con.execute(
            "select dataset, intervention, count(*) as n, count(*) filter (where refused) as judged, "
            "count(*) filter (where contains(lower(response), lower(?))) as phrase "
            "from completions where run_id = ? and model = ? and judge = 'substring' group by all order by all",
            [phrase, run_id, model]).fetchall()
    finally:
        con.close()
    return [{"dataset": d, "intervention": i, "substring judge": f"{j}/{n}", f"contains '{phrase}'": f"{p}/{n}"}
            for d, i, n, j, p in found]
