"""pytest-benchmark suite for one DINOv3 ViT block, fused vs reference attention (same presets as
`dinov3_fast/bench/cases/model_block.py`). Run: pytest benchmarks/test_bench_model_block.py."""
from __future__ import annotations

import pytest
import torch

from dinov3_fast.bench.cases.model_block import cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [c for c in cases() if c.device == DEVICE.type]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("case", CASES, ids=[c.preset for c in CASES])
def test_vit_block_fwd_bwd(benchmark, case, impl):
    args, kwargs = case.make_inputs(DEVICE)
    fn = case.impls[impl]
    benchmark.group = f"vit_block/{case.preset}"

    def step():
        for x in args[0]:
            x.grad = None
        fn(*args, **kwargs).float().square().mean().backward()
        _sync()

    benchmark.pedantic(step, warmup_rounds=2, rounds=5 if DEVICE.type == "cpu" else 20)
