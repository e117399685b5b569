"""pytest-benchmark: fused head last layer + soft cross-entropy forward+backward at the bench presets."""
import pytest

from conftest import bench_step, presets_for

CASES = presets_for("linear_soft_cross_entropy")


@pytest.mark.parametrize("impl", ["reference", "linear+soft_ce", "fused"])
@pytest.mark.parametrize("case", CASES, ids=[c.preset for c in CASES])
def test_linear_soft_cross_entropy_fwd_bwd(benchmark, case, impl):
    benchmark.group = f"linear_soft_cross_entropy/{case.preset}"
    benchmark(bench_step(case, impl))
