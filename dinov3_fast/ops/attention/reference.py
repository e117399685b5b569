"""Plain-PyTorch RoPE attention with DINOv3's exact semantics (dinov3/layers/attention.py).

This is the test oracle (evaluated in float64) and the `reference` backend. Imports torch only.

Shapes: B batch, N tokens (prefix + HW patches), H heads, Dh head dim, C = H * Dh.
DINOv3's path, per layer: split the packed qkv Linear output [B, N, 3, H, Dh] into q, k, v
[B, H, N, Dh]; cast q and k to the rope dtype (DINOv3's default bf16; fp32 tables in its published backbones), rotate the last HW tokens
(rotate-half layout), leave the N - HW prefix tokens alone, cast back; SDPA (non-causal, scale
1/sqrt(Dh), no dropout); transpose back to [B, N, C].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Rope = tuple[torch.Tensor, torch.Tensor]


def rope_rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] along the last dim (halves of Dh/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_apply(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, broadcasting sin/cos [HW, Dh] over x [..., HW, Dh]."""
    return (x * cos) + (rope_rotate_half(x) * sin)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv3's `SelfAttention.apply_rope`.

    Args:
        q, k: [B, H, N, Dh].
        rope: (sin, cos), each [HW, Dh] with HW <= N; applied to the last HW tokens.

    Returns:
        (q, k) rotated, [B, H, N, Dh] each, in the dtypes of q and k. The arithmetic runs in the
        rope's dtype, as in DINOv3.
    """
    sin, cos = rope
    q_dtype, k_dtype = q.dtype, k.dtype
    q = q.to(sin.dtype)
    k = k.to(sin.dtype)
    prefix = q.shape[-2] - sin.shape[-2]
    q = torch.cat((q[:, :, :prefix], rope_apply(q[:, :, prefix:], sin, cos)), dim=-2)
    k = torch.cat((k[:, :, :prefix], rope_apply(k[:, :, prefix:], sin, cos)), dim=-2)
    return q.to(q_dtype), k.to(k_dtype)


def rope_attention_ref(qkv: torch.Tensor, rope: Rope | None, num_heads: int) -> torch.Tensor:
    """DINOv3's `SelfAttention.compute_attention`.

    Args:
        qkv: [B, N, 3 * C], the qkv Linear output, viewed as [B, N, 3, H, Dh].
        rope: (sin, cos), each [HW, Dh], or None for no rotation.
        num_heads: H.

    Returns:
        [B, N, C] attention output, in qkv's dtype.
    """
    B, N, three_c = qkv.shape
    C = three_c // 3
    q, k, v = qkv.reshape(B, N, 3, num_heads, C // num_heads).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if rope is not None:
        q, k = apply_rope_ref(q, k, rope)
    x = F.scaled_dot_product_attention(q, k, v)
    if x.device.type == "cpu":
        # torch's CPU flash SDPA kernel writes 0, not NaN, for a query row holding a NaN (its math
        # backend and our kernels give NaN): add the row's max times 0.0 (NaN there, 0 elsewhere)
        # to that row of the output, per head: no host sync, no data-dependent branch, nothing
        # saved for backward (the max is detached; torch.where would keep its mask). Not an
        # integer 0: inductor folds 0 * y to 0, dropping the NaN. The max, not the sum: a sum of
        # finite half-precision values can overflow (32 fp16 2100s) and would NaN a finite row.
        x = x + q.detach().amax(-1, keepdim=True) * 0.0
    return x.transpose(1, 2).reshape(B, N, C)


def rope_attention_list_ref(qkv_list: list[torch.Tensor], rope_list: list[Rope | None],
                            num_heads: int) -> list[torch.Tensor]:
    """DINOv3's `forward_list` attention part: one `rope_attention_ref` per crop size."""
    return [rope_attention_ref(qkv, rope, num_heads) for qkv, rope in zip(qkv_list, rope_list)]
