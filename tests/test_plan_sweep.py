"""tools/plan_sweep.py: the largest batch that fits a budget, and its table (synthetic plans), then
one real sweep of the debug preset through the planner."""
import pytest
from tools_loader import load_tool


@pytest.fixture(scope="module")
def ps():
    return load_tool("plan_sweep")


@pytest.mark.parametrize("curve,linear", [  # plans grow with the batch
    (lambda b: 10 + 0.3 * b, True), (lambda b: 10 + 0.2 * b + 0.002 * b * b, False),
    (lambda b: 10 + 0.5 * b - 0.0002 * b * b, False)], ids=["linear", "convex", "concave"])
@pytest.mark.parametrize("budget", [10.5, 11.0, 19.0, 40.0, 75.3])
def test_largest_batch_is_the_last_multiple_of_the_step_that_fits(ps, curve, linear, budget):
    calls = []

    def plan(b):
        calls.append(b)
        return curve(b)

    got = ps.largest_batch(plan, budget, step=8)
    fitting = [b for b in [ps.MIN_BATCH, *range(8, 1000, 8)] if curve(b) <= budget]  # plans grow with the batch
    want = max(fitting) if fitting else None
    assert got == want
    if linear:  # predicted from two plans, then checked once
        assert len(set(calls)) <= 5


def test_table_marks_what_does_not_fit(ps):
    record = {"rows": [
        {"arch": "vit_large", "ac": "selective", "fused": {"largest_batch": 176, "plan_gib": 68.2},
         "reference": {"largest_batch": 160, "plan_gib": 69.9},
         "equal_batch": {"batch": 160, "fused_gib": 62.0, "reference_gib": 69.9, "saving": 1 - 62.0 / 69.9}},
        {"arch": "vit_7b", "ac": "full", "fused": {"largest_batch": None, "plan_gib": 128.8},
         "reference": {"largest_batch": None, "plan_gib": 128.9}}]}
    lines = ps.table_lines(record)
    assert "| vit_large | selective | 176 (68.2 GiB) | 160 (69.9 GiB) | b160: 62.0 / 69.9 GiB | 11.3% |" in lines
    assert "| vit_7b | full | none (b2: 128.8 GiB) | none (b2: 128.9 GiB) | - | - |" in lines
    assert lines[-1].endswith("fused vit_large; reference vit_large.")


def test_sweep_through_the_planner(ps):
    rows = ps.sweep(["vit_small"], ["full"], "debug", budget=1.5, step=8)
    (row,) = rows
    for ops in ("fused", "reference"):
        b, gib = row[ops]["largest_batch"], row[ops]["plan_gib"]
        assert b is not None and gib <= 1.5
    eq = row["equal_batch"]
    assert eq["batch"] == row["reference"]["largest_batch"] and eq["fused_gib"] <= eq["reference_gib"]
    assert row["fused"]["largest_batch"] >= row["reference"]["largest_batch"]
