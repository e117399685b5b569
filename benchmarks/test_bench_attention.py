"""pytest-benchmark: RoPE attention and standalone RoPE forward+backward, fused vs DINOv3's path
(each SDPA backend forced in turn on GPU), at the bench presets."""
import pytest

from conftest import bench_step, presets_for

CASES = presets_for("rope_attention")
ROPE_CASES = presets_for("apply_rope")
IMPLS = ["reference", "dinov3:flash", "dinov3:cudnn", "dinov3:efficient", "fused"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c.preset for c in CASES])
def test_rope_attention_fwd_bwd(benchmark, case, impl):
    if impl not in case.impls:
        pytest.skip(f"{impl} does not run at {case.preset} on this machine")
    benchmark.group = f"rope_attention/{case.preset}"
    benchmark.extra_info["fwd_flops"] = case.flops
    benchmark.extra_info["bwd_flops"] = case.bwd_flops
    benchmark(bench_step(case, impl))


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("case", ROPE_CASES, ids=[c.preset for c in ROPE_CASES])
def test_apply_rope_fwd_bwd(benchmark, case, impl):
    benchmark.group = f"apply_rope/{case.preset}"
    benchmark(bench_step(case, impl))
