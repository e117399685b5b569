"""tools/plan_sweep.py: the largest batch that fits a budget, and its table (synthetic plans), then
one real sweep of the debug preset through the planner."""
import math

import pytest
from tqdm import tqdm
from tools_loader import load_tool


@pytest.fixture(scope="module")
def ps():
    return load_tool("plan_sweep")


CURVES = {  # plans grow with the batch (GiB)
    "linear": lambda b: 10 + 0.3 * b,
    "convex": lambda b: 10 + 0.2 * b + 0.002 * b * b,
    "concave": lambda b: 10 + 0.5 * b - 0.00005 * b * b,     # grows up to b = 5000
    "flat_start": lambda b: max(30.0, 10 + 0.3 * b),          # a fixed peak dominates small batches
    "levelling_off": lambda b: 60 - 50 * math.exp(-b / 200),  # never reaches 60
}


@pytest.mark.parametrize("curve", CURVES.values(), ids=CURVES.keys())
@pytest.mark.parametrize("budget", [10.5, 11.0, 19.0, 40.0, 59.9, 75.3])
@pytest.mark.parametrize("step", [2, 8, 24])
def test_largest_batch_is_the_last_multiple_of_the_step_that_fits(ps, curve, budget, step):
    calls = []

    def plan(b):
        calls.append(b)
        return curve(b)

    max_batch = 4096
    got = ps.largest_batch(plan, budget, step=step, max_batch=max_batch)
    candidates = [ps.MIN_BATCH, *range(step, max_batch // step * step + 1, step)]
    fitting = [b for b in candidates if curve(b) <= budget]
    assert got == (max(fitting) if fitting else None)
    assert len(set(calls)) <= 3 + 2 * math.ceil(math.log2(max_batch / step))  # doubling, then bisection
    assert all(b >= ps.MIN_BATCH for b in calls)


def test_step_below_the_smallest_batch_is_refused(ps):
    with pytest.raises(ValueError, match="step must be >= 2"):
        ps.largest_batch(lambda b: 1.0, 10.0, step=1)


def test_table_marks_what_does_not_fit(ps):
    record = {"rows": [
        {"arch": "vit_large", "params": 3e8, "ac": "selective", "fused": {"largest_batch": 176, "plan_gib": 68.2},
         "reference": {"largest_batch": 160, "plan_gib": 69.9},
         "equal_batch": {"batch": 160, "fused_gib": 62.0, "reference_gib": 69.9, "saving": 1 - 62.0 / 69.9}},
        {"arch": "vit_7b", "params": 7e9, "ac": "full", "fused": {"largest_batch": None, "plan_gib": 128.8},
         "reference": {"largest_batch": None, "plan_gib": 128.9}},
        {"arch": "vit_base", "params": 1e8, "ac": "full", "fused": {"largest_batch": 512, "plan_gib": 60.0},
         "reference": {"largest_batch": None, "plan_gib": 99.0}}]}
    lines = ps.table_lines(record)
    assert "| vit_large | selective | 176 (68.2 GiB) | 160 (69.9 GiB) | b160: 62.0 / 69.9 GiB | 11.3% |" in lines
    assert "| vit_7b | full | none (b2: 128.8 GiB) | none (b2: 128.9 GiB) | - | - |" in lines
    assert lines[-1] == "Largest arch that fits (by parameters): fused vit_large; reference vit_large."


def test_sweep_through_the_planner(ps):
    budget, step = 0.5, 8  # ~40 images of ViT-S at the debug recipe
    rows = ps.sweep(["vit_small"], ["full"], "debug", budget=budget, step=step)
    (row,) = rows
    plan = ps.Planner("debug", tqdm(disable=True))
    assert row["params"] == plan.plan("vit_small", "full", "fused", 2).params_total > 20e6  # the arch's own trunk
    for ops in ("fused", "reference"):
        b, gib = row[ops]["largest_batch"], row[ops]["plan_gib"]
        assert b is not None and gib <= budget < plan("vit_small", "full", ops, b + step)
    eq = row["equal_batch"]
    assert eq["batch"] == row["reference"]["largest_batch"] and eq["fused_gib"] <= eq["reference_gib"]
    assert row["fused"]["largest_batch"] >= row["reference"]["largest_batch"]
