"""Overnight operations: filter checks, progress lines in log files, run listing and status, schedules, infra.

- the paper's two prompt filters are checked together after extraction (the organism, with its harmful and
  harmless prompts swapped, keeps nothing anywhere: one error names all four splits and both settings);
- `refdir runs` / `refdir status` read stores written by hand (failed model with reason and time, stale
  heartbeat);
- a nightly deployment's flow, triggered on two dates, makes two runs;
- cluster files give every actor a node that fits it (infra/ray/cluster.yaml, kuberay vs paper-13.toml).
"""

from __future__ import annotations

import pytest

from refdir.flows import plan
from refdir.flows.stages import ModelRun, StageError
from refdir.schemas.spec import ModelSpec, PromptSpec, RunSpec, StoreSpec
from refdir.workers.prompts import draw_prompts
from refdir.workers.store import Store

SRC = "builtin:organism_{}_{}"


def swapped_spec(model_dir, store: str) -> RunSpec:
    """Harmless prompts in the harmful slots and vice versa: the organism refuses the wrong side everywhere."""
    p = PromptSpec(harmful_train=SRC.format("harmless", "train"), harmless_train=SRC.format("harmful", "train"),
                   harmful_val=SRC.format("harmless", "val"), harmless_val=SRC.format("harmful", "val"),
                   harmful_test=SRC.format("harmful", "test"), harmless_test=SRC.format("harmless", "test"),
                   n_train=8, n_val=8, n_test=8)
    return RunSpec(name="swap", models=[ModelSpec(key="organism", path=str(model_dir))], prompts=p,
                   store=StoreSpec(uri=store))


def test_both_filters_reported_together(organism_dir, tmp_path):
    from refdir.workers.extract import run_extract
    from refdir.workers.model import load_model

    spec = swapped_spec(organism_dir, str(tmp_path / "store"))
    store, draw = Store.open(spec.store), draw_prompts(spec.prompts)
    lm = load_model(spec.models[0], "cpu")
    for job in plan.extract_jobs(spec, spec.models[0], draw):
        run_extract(lm, store, job)
    with pytest.raises(StageError) as err:
        ModelRun(spec, "organism", store, draw).check_filters()
    msg = str(err.value)
    assert "\n" not in msg
    for split in ("train", "val"):
        for label in ("harmful", "harmless"):
            assert f"{label} {split}: 0 of 8 kept" in msg
        assert f"prompts.filter_{split} = false" in msg
    assert "refdir doctor" in msg
