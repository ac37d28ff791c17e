"""Selection on hand-built score tables: every filter, the tie-break, the all-filtered error, the fallback."""

import math

import pytest

from refdir.schemas.spec import SelectionSpec
from refdir.workers.selection import SelectionError, drop_reason, select_direction


def row(pos, layer, bypass, induce=1.0, kl=0.01):
    return {"position": pos, "layer": layer, "bypass_score": bypass, "induce_score": induce, "kl_score": kl}


SPEC = SelectionSpec()   # paper: layer < int(0.8 L), kl <= 0.1, induce >= 0


def test_each_filter_names_its_reason():
    L = 10
    assert drop_reason(row(-1, 2, math.nan), L, SPEC) == "nan score"
    assert drop_reason(row(-1, 2, -1.0, induce=math.nan), L, SPEC) == "nan score"
    assert drop_reason(row(-1, 8, -1.0), L, SPEC).startswith("layer 8 >= 8")
    assert drop_reason(row(-1, 7, -1.0), L, SPEC) is None           # int(0.8 * 10) = 8: layer 7 survives
    assert drop_reason(row(-1, 2, -1.0, kl=0.11), L, SPEC).startswith("kl 0.11 > 0.1")
    assert drop_reason(row(-1, 2, -1.0, kl=0.1), L, SPEC) is None   # the threshold itself passes
    assert drop_reason(row(-1, 2, -1.0, induce=-0.01), L, SPEC).startswith("induce -0.01 < 0")
    assert drop_reason(row(-1, 2, -1.0, induce=0.0), L, SPEC) is None


def test_first_reason_wins_in_paper_order():
    # NaN before layer, layer before KL, KL before induce
    assert drop_reason(row(-1, 9, math.nan, kl=5), 10, SPEC) == "nan score"
    assert drop_reason(row(-1, 9, -1, kl=5, induce=-1), 10, SPEC).startswith("layer")
    assert drop_reason(row(-1, 2, -1, kl=5, induce=-1), 10, SPEC).startswith("kl")


def test_lowest_bypass_among_survivors_wins():
    rows = [row(-1, 1, -3.0, kl=0.5), row(-2, 3, -2.0), row(-1, 4, -1.0), row(-3, 9, -9.0)]
    choice, annotated = select_direction(rows, 10, SPEC)
    assert (choice.position, choice.layer, choice.bypass_score, choice.fallback) == (-2, 3, -2.0, False)
    reasons = {(r["position"], r["layer"]): r["drop_reason"] for r in annotated}
    assert reasons[(-2, 3)] is None and reasons[(-1, 4)] is None
    assert reasons[(-1, 1)].startswith("kl") and reasons[(-3, 9)].startswith("layer")
    assert len(annotated) == 4


def test_ties_break_by_lower_layer_then_position():
    rows = [row(-1, 5, -2.0), row(-2, 3, -2.0), row(-4, 3, -2.0)]
    choice, _ = select_direction(rows, 10, SPEC)
    assert (choice.position, choice.layer) == (-4, 3)
    # input order does not matter
    choice2, _ = select_direction(list(reversed(rows)), 10, SPEC)
    assert (choice2.position, choice2.layer) == (-4, 3)


def test_all_filtered_error_shows_five_best_with_reasons():
    rows = [row(-1, layer, -float(layer), kl=1.0) for layer in range(8)]
    with pytest.raises(SelectionError) as e:
        select_direction(rows, 10, SPEC)
    msg = str(e.value)
    assert "all 8 candidates were filtered out" in msg
    assert msg.count("-> kl") == 5 and "layer   7" in msg and "layer   2" not in msg
    assert "allow_fallback" in msg


def test_fallback_picks_best_finite_bypass_and_marks_it():
    rows = [row(-1, 1, math.nan), row(-1, 2, -0.5, kl=1.0), row(-1, 3, -0.7, induce=-2)]
    choice, _ = select_direction(rows, 10, SelectionSpec(allow_fallback=True))
    assert (choice.layer, choice.fallback) == (3, True)
    assert choice.thresholds["kl_threshold"] == 0.1


def test_fallback_with_only_nan_still_errors():
    with pytest.raises(SelectionError):
        select_direction([row(-1, 1, math.nan)], 10, SelectionSpec(allow_fallback=True))


def test_no_rows_is_an_error():
    with pytest.raises(SelectionError, match="no scored candidates"):
        select_direction([], 10, SPEC)
