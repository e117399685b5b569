"""Gram-loss presets: DINOv3's global-crop patch tokens (P = 256 at 256 px, 1024 at 512 px)."""
from __future__ import annotations

import functools

import torch

from dinov3_fast.bench.case import BenchCase
from dinov3_fast.ops.gram import gram_loss, gram_loss_ref, tiled_block, uses_identity
from dinov3_fast.ops.gram.cpu import sym_product_fraction

NEG = {"remove_neg": True}
TEACHER_NEG = {"remove_only_teacher_neg": True}
# (preset, device, B, P, D, dtype, clamping options)
PRESETS = (
    ("cpu_b4_p1024_d384", "cpu", 4, 1024, 384, torch.float32, {}),
    ("cpu_b4_p256_d384_neg", "cpu", 4, 256, 384, torch.float32, NEG),
    ("vitl_256px", "cuda", 32, 256, 1024, torch.bfloat16, {}),
    ("vit7b_256px", "cuda", 32, 256, 4096, torch.bfloat16, {}),
    ("crop512_b16_d1024", "cuda", 16, 1024, 1024, torch.bfloat16, {}),
    ("crop512_b16_d1024_neg", "cuda", 16, 1024, 1024, torch.bfloat16, NEG),
    ("crop512_b16_d1024_teacher_neg", "cuda", 16, 1024, 1024, torch.bfloat16, TEACHER_NEG),
    ("crop1024_b4_d1024", "cuda", 4, 4096, 1024, torch.bfloat16, {}),
)


def _inputs(B, P, D, dtype, device):
    student = torch.randn(B, P, D, device=device, dtype=dtype, requires_grad=True)
    teacher = torch.randn(B, P, D, device=device, dtype=dtype)
    return (student, teacher), {}


@functools.lru_cache(maxsize=None)
def _compiled_reference(remove_neg: bool, remove_only_teacher_neg: bool):
    return torch.compile(functools.partial(gram_loss_ref, remove_neg=remove_neg,
                                           remove_only_teacher_neg=remove_only_teacher_neg))


def _triangle_flops(B: int, P: int, D: int, dtype: torch.dtype) -> int:
    """Forward FLOPs of the Triton tiled kernel without gradients (how the forward is timed): both
    Gram tiles of each (row block, col block >= row block) pair over the full D, padded tiles
    included. (The CPU's tiled path forms whole row chunks: the full 4 B P^2 D.)"""
    block = tiled_block(P, dtype)
    n = -(-P // block)
    return 4 * B * D * block * block * n * (n + 1) // 2


def cases() -> list[BenchCase]:
    out = []
    for preset, device, B, P, D, dtype, options in PRESETS:
        clamped = bool(options)
        identity = uses_identity(int(clamped), P, D)
        tiled_flops = 4 * B * P * P * D  # two P x P Grams per image
        if identity:  # three D x D products; on the CPU two of them form only their upper blocks
            flops = 2 * B * P * D * D * (3 if device == "cuda" else 1 + 2 * sym_product_fraction(D))
        else:
            flops = _triangle_flops(B, P, D, dtype) if device == "cuda" else tiled_flops
        elt = torch.finfo(dtype).bits // 8
        out.append(BenchCase(
            op="gram_loss", preset=preset, device=device,
            make_inputs=functools.partial(_inputs, B, P, D, dtype),
            impls={
                "reference": functools.partial(gram_loss_ref, **options),
                "reference+compile": _compiled_reference(options.get("remove_neg", False),
                                                         options.get("remove_only_teacher_neg", False)),
                "fused": functools.partial(gram_loss, **options),
            },
            # the references form the P x P Grams whichever formulation the fused op takes, in fp32
            flops=flops, impl_flops={"reference": tiled_flops, "reference+compile": tiled_flops},
            fp32_impls=("reference", "reference+compile"),
            bytes=2 * B * P * D * elt,
            note=f"B={B} P={P} D={D} {str(dtype)[6:]} {' '.join(f'{k}=True' for k in options) or 'no clamping'}; "
                 f"{'identity (D x D)' if identity else 'tiled (P x P on chip)'} formulation",
        ))
    return out
