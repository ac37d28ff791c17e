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
    assert drop_reason(row(-1, 2, math.nan), L, SPEC) == "nan score (bypass)"
    assert drop_reason(row(-1, 2, -1.0, induce=math.nan), L, SPEC) == "nan score (induce)"
    assert drop_reason(row(-1, 8, -1.0), L, SPEC).startswith("layer 8 >= 8")
    assert drop_reason(row(-1, 7, -1.0), L, SPEC) is None           # int(0.8 * 10) = 8: layer 7 survives
    assert drop_reason(row(-1, 2, -1.0, kl=0.11), L, SPEC).startswith("kl 0.11 > 0.1")
    assert drop_reason(row(-1, 2, -1.0, kl=0.1), L, SPEC) is None   # the threshold itself passes
    assert drop_reason(row(-1, 2, -1.0, induce=-0.01), L, SPEC).startswith("induce -0.01 < 0")
    assert drop_reason(row(-1, 2, -1.0, induce=0.0), L, SPEC) is None


def test_every_reason_is_listed_in_paper_order():
    # NaN, layer, KL, induce: a candidate failing several filters names each of them
    assert drop_reason(row(-1, 9, math.nan, kl=5), 10, SPEC) == (
        "nan score (bypass); layer 9 >= 8 (max_layer_fraction 0.8); kl 5 > 0.1")
    assert drop_reason(row(-1, 9, -1, kl=5, induce=-1), 10, SPEC) == (
        "layer 9 >= 8 (max_layer_fraction 0.8); kl 5 > 0.1; induce -1 < 0.0")
    assert drop_reason(row(-1, 2, -1, kl=5, induce=-1), 10, SPEC) == "kl 5 > 0.1; induce -1 < 0.0"


def test_lowest_bypass_among_survivors_wins():
    rows = [row(-1, 1, -3.0, kl=0.5), row(-2, 3, -2.0), row(-1, 4, -1.0), row(-3, 9, -9.0)]
    choice, annotated = select_direction(rows, 10, SPEC)
    assert (choice.position, choice.layer, choice.bypass_score, choice.fallback) == (-2, 3, -2.0, False)
    reasons = {(r["position"], r["layer"]): r["drop_reason"] for r in annotated}
    assert reasons[(-2, 3)] is None and reasons[(-1, 4)] is None
    assert reasons[(-1, 1)].startswith("kl") and reasons[(-3, 9)].startswith("layer")
    assert len(annotated) == 4


def _paper_choice(rows):
    """The paper's code: sort (-refusal_score, pos, layer) tuples in descending order, take the first."""
    return sorted(((-r["bypass_score"], r["position"], r["layer"]) for r in rows), reverse=True)[0][1:]


def test_ties_break_as_the_papers_code_higher_position_then_higher_layer():
    rows = [row(-1, 3, -2.0), row(-2, 5, -2.0), row(-1, 5, -2.0), row(-4, 6, -2.0), row(-3, 1, -1.0)]
    assert _paper_choice(rows) == (-1, 5)
    for order in (rows, list(reversed(rows))):   # input order does not matter
        choice, _ = select_direction(order, 10, SPEC)
        assert (choice.position, choice.layer) == _paper_choice(rows)
    same_pos = [row(-2, 2, -2.0), row(-2, 4, -2.0), row(-5, 6, -2.0)]
    assert (select_direction(same_pos, 10, SPEC)[0].position, select_direction(same_pos, 10, SPEC)[0].layer) \
        == _paper_choice(same_pos) == (-2, 4)


def test_all_filtered_error_shows_five_best_with_reasons():
    rows = [row(-1, layer, -float(layer), kl=1.0) for layer in range(8)]
    with pytest.raises(SelectionError) as e:
        select_direction(rows, 10, SPEC)
    msg = str(e.value)
    assert "all 8 candidates were filtered out" in msg and "kl > kl_threshold (0.1): 8" in msg
    assert msg.count("-> kl") == 5 and "layer   7" in msg and "layer   2" not in msg
    assert "allow_fallback" in msg


def test_all_filtered_error_also_shows_the_best_dropped_by_kl_alone():
    # the best bypass scores come from directions that break the model (all filters fail); the ones the KL
    # filter alone dropped are listed too, best first (what the SmolLM2 organism's science run needs to show)
    rows = [row(-4, layer, -10.0 - layer, kl=5.0, induce=-3.0) for layer in range(6)]
    rows += [row(-1, 5, -2.0, kl=0.3), row(-1, 6, -3.0, kl=0.5), row(-1, 7, -1.0, induce=-0.1)]
    with pytest.raises(SelectionError) as e:
        select_direction(rows, 10, SPEC)
    msg = str(e.value)
    assert "the best of the 2 dropped by the KL filter alone:" in msg
    tail = msg.split("KL filter alone:")[1]
    assert tail.index("layer   6") < tail.index("layer   5") and "layer   7" not in tail


def test_all_filtered_error_names_every_reason_of_each_candidate():
    rows = [row(-1, 9, -5.0, kl=0.3, induce=-1.0), row(-2, 1, -4.0, induce=-0.5), row(-1, 2, math.nan)]
    with pytest.raises(SelectionError) as e:
        select_direction(rows, 10, SPEC)
    msg = str(e.value)
    assert "-> layer 9 >= 8 (max_layer_fraction 0.8); kl 0.3 > 0.1; induce -1 < 0.0" in msg
    assert "-> induce -0.5 < 0.0" in msg and "-> nan score (bypass)" in msg
    assert "induce < induce_threshold (0.0): 2" in msg and "NaN score: 1" in msg and ": 1" in msg


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
