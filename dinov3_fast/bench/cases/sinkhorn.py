"""Sinkhorn-Knopp presets: DINOv3's teacher centring of the DINO (CLS) and iBOT (patch) heads."""
from __future__ import annotations

import functools

import torch

from dinov3_fast._ext import native_has_cuda
from dinov3_fast.bench.case import BenchCase
from dinov3_fast.ops.sinkhorn import sinkhorn_knopp, sinkhorn_knopp_ref

N_ITERATIONS = 3
# (preset, device, B, K, dtype)
PRESETS = (
    ("cpu_b32_k16k", "cpu", 32, 16384, torch.float32),
    ("dino_teacher_7b", "cuda", 32, 262144, torch.float32),      # 2 global crops x 16 images, K = 262,144
    ("ibot_teacher_7b", "cuda", 1274, 98304, torch.float32),     # masked tokens of 16 images, K = 98,304
    ("dino_teacher_vitl", "cuda", 128, 65536, torch.float32),    # ViT-L recipe, K = 65,536
)


def _inputs(B, K, dtype, device):
    return (torch.randn(B, K, device=device, dtype=dtype), 0.07), {}


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(sinkhorn_knopp_ref)


def cases() -> list[BenchCase]:
    out = []
    for preset, device, B, K, dtype in PRESETS:
        impls = {"reference": sinkhorn_knopp_ref, "reference+compile": _compiled_reference(),
                 "fused": sinkhorn_knopp}
        if device == "cuda":
            impls["fused:triton"] = functools.partial(sinkhorn_knopp, backend="triton")
            if torch.cuda.is_available() and native_has_cuda():
                impls["fused:cuda"] = functools.partial(sinkhorn_knopp, backend="cuda")
        elt = torch.finfo(dtype).bits // 8
        out.append(BenchCase(
            op="sinkhorn_knopp", preset=preset, device=device,
            make_inputs=functools.partial(_inputs, B, K, dtype),
            impls=impls,
            # elementwise work: no matmul roofline. bytes: the fused schedule's 2 reads per round and
            # 1 read + 1 fp32 write at the end; min_bytes: the input read once, the output written once
            bytes=(2 * N_ITERATIONS + 1) * B * K * elt + 4 * B * K,
            min_bytes=B * K * elt + 4 * B * K,
            backward=False,
            note=f"B={B} K={K} {str(dtype)[6:]}, {N_ITERATIONS} rounds; bytes = the fused schedule's 7 reads + 1 write",
        ))
    return out
