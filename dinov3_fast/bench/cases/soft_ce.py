"""Soft cross-entropy presets: DINOv3's DINO loss (student crops x teacher crops) and iBOT loss."""
from __future__ import annotations

import functools

import torch

from dinov3_fast.bench.case import BenchCase
from dinov3_fast.ops.soft_ce import soft_cross_entropy, soft_cross_entropy_ref

# (preset, device, S, T, B, K, student dtype, ignore_diagonal, token form with weights)
PRESETS = (
    ("cpu_s4_t2_b4_k16k", "cpu", 4, 2, 4, 16384, torch.float32, True, False),     # per-call overhead
    ("cpu_s10_t2_b16_k64k", "cpu", 10, 2, 16, 65536, torch.float32, True, False),  # DINO head size, CPU batch
    ("dino_student_7b", "cuda", 10, 2, 16, 262144, torch.bfloat16, True, False),   # 2 global + 8 local crops
    ("ibot_student_7b", "cuda", 1, 1, 1274, 98304, torch.bfloat16, False, True),   # masked tokens, weighted
    ("dino_student_vitl", "cuda", 10, 2, 64, 65536, torch.bfloat16, True, False),  # ViT-L recipe
)


def _inputs(S, T, B, K, dtype, ignore_diagonal, tokens, device):
    shape_s, shape_t = ((B, K), (B, K)) if tokens else ((S, B, K), (T, B, K))
    student = torch.randn(shape_s, device=device, dtype=dtype, requires_grad=True)
    teacher = torch.softmax(torch.randn(shape_t, device=device) / 0.07, dim=-1)
    kwargs = {"ignore_diagonal": ignore_diagonal}
    if tokens:
        kwargs["weights"] = torch.full((B,), 1.0 / B, device=device)
    return (student, teacher), kwargs


def _reference(student, teacher, ignore_diagonal=False, weights=None):
    return soft_cross_entropy_ref(student, teacher, 0.1, ignore_diagonal, weights)


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(_reference)


def cases() -> list[BenchCase]:
    out = []
    for preset, device, S, T, B, K, dtype, ignore, tokens in PRESETS:
        elt = torch.finfo(dtype).bits // 8
        n_s, n_t = (1, 1) if tokens else (S, T)
        out.append(BenchCase(
            op="soft_cross_entropy", preset=preset, device=device,
            make_inputs=functools.partial(_inputs, S, T, B, K, dtype, ignore, tokens),
            impls={"reference": _reference, "reference+compile": _compiled_reference(), "fused": soft_cross_entropy},
            # elementwise work: no matmul roofline; bytes: student once, teacher once (L2 reuse)
            bytes=n_s * B * K * elt + n_t * B * K * 4,
            note=f"S={n_s} T={n_t} B={B} K={K} student {str(dtype)[6:]}, ignore_diagonal={ignore}"
                 + (", per-token weights" if tokens else ""),
        ))
    return out
