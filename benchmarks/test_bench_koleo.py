"""pytest-benchmark: KoLeo loss forward+backward, fused vs reference, at the bench presets."""
import pytest

from conftest import bench_step, presets_for

CASES = presets_for("koleo_loss")


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("case", CASES, ids=[c.preset for c in CASES])
def test_koleo_loss_fwd_bwd(benchmark, case, impl):
    benchmark.group = f"koleo_loss/{case.preset}"
    benchmark(bench_step(case, impl))
