"""dinov3-fast: fused Triton/CUDA kernels for DINOv3-style self-supervised ViT training.

Drop-in modules (same constructors, forwards and numbers as DINOv3's):
    from dinov3_fast import GramLoss
Functional forms live in `dinov3_fast.ops`. `backends()` reports what can run on this machine.
"""
from __future__ import annotations

from dinov3_fast.nn import DINOLoss, GramLoss, KoLeoLoss, KoLeoLossDistributed, SelfAttention, SinkhornKnoppTeacher, iBOTPatchLoss
from dinov3_fast.ops._dispatch import BACKENDS, backend_status

__version__ = "0.1.0"


def backends(device: str | None = None) -> dict[str, dict[str, object]]:
    """{backend: {"available": bool, "reason": str}} for `device` (default: cuda if present, else cpu)."""
    out = {}
    for name in BACKENDS:
        ok, why = backend_status(name, device)
        out[name] = {"available": ok, "reason": why}
    return out


__all__ = ["DINOLoss", "GramLoss", "KoLeoLoss", "KoLeoLossDistributed", "SelfAttention", "SinkhornKnoppTeacher", "backends", "iBOTPatchLoss", "__version__"]
