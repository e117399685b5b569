"""Fused head last layer + soft cross-entropy presets (op "linear_soft_cross_entropy"): the student
side of DINOv3's iBOT and DINO losses from the heads' normalised bottlenecks.

Impls: "reference" (the bias-free Linear, then the eager loss, as DINOv3 runs them),
"reference+compile", "linear+soft_ce" (the Linear, then our fused soft cross-entropy: what the
trainer ran before the last layer was fused in) and "fused" (`linear_soft_cross_entropy`: logits
formed chunk by chunk, gradients in the forward). FLOPs: the Linear's 2 rows K d forward and twice
that backward, which every impl runs.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dinov3_fast.bench.case import BenchCase
from dinov3_fast.ops.linear_soft_ce import linear_soft_cross_entropy, linear_soft_cross_entropy_ref
from dinov3_fast.ops.soft_ce import soft_cross_entropy

# (preset, device, S, T, B, d, K, dtype, token form with weights, ignore_diagonal)
PRESETS = (
    ("cpu_m1024_d256_k16k", "cpu", 1, 1, 1024, 256, 16384, torch.float32, True, False),
    ("ibot_vitl_b128", "cuda", 1, 1, 7503, 256, 65536, torch.bfloat16, True, False),  # masked tokens at batch 128
    ("ibot_7b", "cuda", 1, 1, 1274, 384, 98304, torch.bfloat16, True, False),         # masked tokens of 16 images
    ("dino_student_7b", "cuda", 10, 2, 16, 512, 262144, torch.bfloat16, False, True),  # 2 global + 8 local crops
)


def _inputs(S, T, B, d, K, dtype, tokens, ignore_diagonal, device):
    shape_f, shape_t = ((B, d), (B, K)) if tokens else ((S, B, d), (T, B, K))
    features = F.normalize(torch.randn(shape_f, device=device), dim=-1).to(dtype).requires_grad_()
    weight = (torch.randn(K, d, device=device) * 0.02).to(dtype).requires_grad_()
    teacher = torch.softmax(torch.randn(shape_t, device=device) / 0.07, dim=-1)
    kwargs = {"ignore_diagonal": ignore_diagonal}
    if tokens:
        kwargs["weights"] = torch.full((B,), 1.0 / B, device=device)
    return (features, weight, teacher), kwargs


def _reference(features, weight, teacher, ignore_diagonal=False, weights=None):
    return linear_soft_cross_entropy_ref(features, weight, teacher, 0.1, ignore_diagonal, weights)


def _linear_then_soft_ce(features, weight, teacher, ignore_diagonal=False, weights=None):
    return soft_cross_entropy(F.linear(features, weight), teacher, ignore_diagonal=ignore_diagonal, weights=weights)


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(_reference)


def cases() -> list[BenchCase]:
    out = []
    for preset, device, S, T, B, d, K, dtype, tokens, ignore in PRESETS:
        rows = B if tokens else S * B
        elt = torch.finfo(dtype).bits // 8
        out.append(BenchCase(
            op="linear_soft_cross_entropy", preset=preset, device=device,
            make_inputs=functools.partial(_inputs, S, T, B, d, K, dtype, tokens, ignore),
            impls={"reference": _reference, "reference+compile": _compiled_reference(),
                   "linear+soft_ce": _linear_then_soft_ce, "fused": linear_soft_cross_entropy},
            flops=2 * rows * K * d, bwd_flops=4 * rows * K * d,
            bytes=(rows * d + K * d) * elt + (B if tokens else T * B) * K * 4,  # features, weight, fp32 targets
            note=(f"M={B} tokens" if tokens else f"S={S} T={T} B={B}") + f" d={d} K={K} {str(dtype)[6:]}"
                 + (", per-token weights" if tokens else f", ignore_diagonal={ignore}"),
        ))
    return out
