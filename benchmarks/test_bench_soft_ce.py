"""pytest-benchmark: soft cross-entropy forward+backward, fused vs reference, at the bench presets."""
import pytest

from conftest import bench_step, presets_for

CASES = presets_for("soft_cross_entropy")


@pytest.mark.parametrize("impl", ["reference", "reference+compile", "fused"])
@pytest.mark.parametrize("case", CASES, ids=[c.preset for c in CASES])
def test_soft_cross_entropy_fwd_bwd(benchmark, case, impl):
    benchmark.group = f"soft_cross_entropy/{case.preset}"
    benchmark(bench_step(case, impl))
