"""pytest-benchmark: Sinkhorn-Knopp (forward only, no grad), every implementation, at the bench presets."""
import pytest
import torch

from conftest import DEVICE, presets_for

CASES = presets_for("sinkhorn_knopp")
IMPLS = ["reference", "reference+compile", "fused", "fused:triton", "fused:cuda"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c.preset for c in CASES])
def test_sinkhorn_knopp(benchmark, case, impl):
    if impl not in case.impls:
        pytest.skip(f"{impl} is not benchmarked at {case.preset} on this machine")
    benchmark.group = f"sinkhorn_knopp/{case.preset}"
    args, kwargs = case.make_inputs(DEVICE)
    fn = case.impls[impl]

    def step():
        fn(*args, **kwargs)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark(step)
