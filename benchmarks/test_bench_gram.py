"""pytest-benchmark: Gram loss forward+backward, fused vs reference, at the bench presets."""
import pytest

from conftest import bench_step, presets_for

CASES = presets_for("gram_loss")


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("case", CASES, ids=[c.preset for c in CASES])
def test_gram_loss_fwd_bwd(benchmark, case, impl):
    benchmark.group = f"gram_loss/{case.preset}"
    benchmark(bench_step(case, impl))
