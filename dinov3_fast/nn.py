"""Drop-in nn.Modules with DINOv3's constructors and forward signatures, backed by dinov3_fast.ops.

Each module is a thin wrapper: its state is DINOv3's (same parameter and buffer names), its
numbers are the op's. `backend=` (default: fastest available) is forwarded to the op.
"""
from __future__ import annotations

import torch
from torch import nn

from dinov3_fast.ops import gram_loss
from dinov3_fast.ops.attention import apply_rope, rope_attention, rope_attention_packed


class GramLoss(nn.Module):
    """DINOv3's GramLoss (dinov3/loss/gram_loss.py) on the fused op.

    forward(output_feats, target_feats, img_level=True):
        output_feats: (B, P, D) student patch features ((N, D) allowed with img_level=False)
        target_feats: same shape, Gram-teacher patch features
        returns a 0-dim fp32 loss.
    """

    def __init__(self, apply_norm: bool = True, img_level: bool = True, remove_neg: bool = True,
                 remove_only_teacher_neg: bool = False, backend: str | None = None):
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("remove_neg and remove_only_teacher_neg are mutually exclusive; set at most one")
        self.apply_norm = apply_norm
        self.img_level = img_level  # kept for parity with DINOv3; forward's argument decides
        self.remove_neg = remove_neg
        self.remove_only_teacher_neg = remove_only_teacher_neg
        self.backend = backend

    def forward(self, output_feats: torch.Tensor, target_feats: torch.Tensor, img_level: bool = True) -> torch.Tensor:
        return gram_loss(output_feats, target_feats, normalize=self.apply_norm, img_level=img_level,
                         remove_neg=self.remove_neg, remove_only_teacher_neg=self.remove_only_teacher_neg,
                         backend=self.backend)


class LinearKMaskedBias(nn.Linear):
    """DINOv3's qkv Linear with `mask_k_bias=True`: the bias is multiplied by the buffer `bias_mask`
    [3C] (persistent, so checkpoints carry it), which zeroes the K third.

    DINOv3 fills `bias_mask` with NaN at construction and sets it to (1, 0, 1) thirds in its weight
    init; we set (1, 0, 1) at construction, so a freshly built module is usable before any init. A
    loaded checkpoint overwrites it either way.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        o = self.out_features
        if o % 3:
            raise ValueError(f"LinearKMaskedBias needs out_features divisible by 3, got {o}")
        if self.bias is not None:
            mask = torch.ones_like(self.bias)
            mask[o // 3: 2 * o // 3] = 0
            self.register_buffer("bias_mask", mask)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.bias_mask.to(self.bias.dtype) if self.bias is not None else None
        return nn.functional.linear(input, self.weight, bias)


class SelfAttention(nn.Module):
    """DINOv3's SelfAttention (dinov3/layers/attention.py) on the fused RoPE attention op.

    Same constructor and parameter names (`qkv`, `proj`, and `qkv.bias_mask` with mask_k_bias), so
    DINOv3 checkpoints load unchanged. As in DINOv3, attention dropout is not applied (DINOv3's SDPA
    call passes no dropout) and forward_list skips proj_drop.

    forward(x, attn_bias=None, rope=None):
        x: [B, N, dim]; rope: (sin, cos) each [HW, dim // num_heads] for the last HW tokens, or None.
        returns [B, N, dim].
    forward_list(x_list, attn_bias=None, rope_list=None):
        x_list: crops [B_i, N_i, dim]; rope_list: one rope (or None) per crop.
        returns [B_i, N_i, dim] per crop; every crop's attention runs in one kernel launch.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, mask_k_bias: bool = False, device=None,
                 *, backend: str | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        linear_class = LinearKMaskedBias if mask_k_bias else nn.Linear
        self.qkv = linear_class(dim, dim * 3, bias=qkv_bias, device=device)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = backend

    def apply_rope(self, q: torch.Tensor, k: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(q, k, rope, backend=self.backend)

    def compute_attention(self, qkv: torch.Tensor, attn_bias=None, rope=None) -> torch.Tensor:
        if attn_bias is not None:
            raise ValueError("SelfAttention does not support attn_bias (DINOv3 asserts it is None)")
        return rope_attention(qkv, rope, num_heads=self.num_heads, backend=self.backend)

    def forward(self, x: torch.Tensor, attn_bias=None, rope=None) -> torch.Tensor:
        x = self.proj(self.compute_attention(self.qkv(x), attn_bias=attn_bias, rope=rope))
        return self.proj_drop(x)

    def forward_list(self, x_list: list[torch.Tensor], attn_bias=None, rope_list=None) -> list[torch.Tensor]:
        if attn_bias is not None:
            raise ValueError("SelfAttention does not support attn_bias (DINOv3 asserts it is None)")
        if rope_list is not None and len(rope_list) != len(x_list):
            raise ValueError(f"rope_list must have one entry per crop ({len(x_list)}), got {len(rope_list)}")
        crops = [(x.shape[0], x.shape[1]) for x in x_list]
        x_flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in x_list])
        attn = rope_attention_packed(self.qkv(x_flat), crops, rope_list, num_heads=self.num_heads,
                                     backend=self.backend)
        out = self.proj(attn)
        return [o.view(b, n, -1) for o, (b, n) in zip(out.split([b * n for b, n in crops]), crops)]
