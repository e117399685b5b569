"""DINOv3's transformer block (dinov3/layers/block.py) on the fused RoPE attention.

    x = x + ls1(attn(norm1(x), rope))
    x = x + ls2(mlp(norm2(x)))

Multi-crop: the block takes one crop [B, N, D] or a list of crops [B_i, N_i, D]. Norms, layer
scales, residual adds and the FFN run once over all crops' tokens concatenated; attention runs per
crop through the attention module's `forward_list` (the fused op's list form).

Drop path is DINOv3's "sample subset" form, not a mask: in training each branch runs on
max(int(B * (1 - rate)), 1) images drawn with randperm per crop, and its output is added back to
those rows with `index_add(..., alpha=B / subset)`, so its expectation equals the branch on the
whole batch. Random numbers are drawn in DINOv3's order (all crops' attention subsets, then all
crops' FFN subsets), so a seeded run reproduces DINOv3's.

Names: norm1, attn (qkv, proj), ls1.gamma, norm2, mlp (fc1/fc2 or w1/w2/w3), ls2.gamma.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dinov3_fast.models.ffn import Mlp, cat_tokens, split_tokens

Rope = tuple[torch.Tensor, torch.Tensor]


class LayerScale(nn.Module):
    """x * gamma, gamma [D] initialised to `init_values`."""

    def __init__(self, dim: int, init_values: float = 1e-5, device=None) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values), device=device))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def default_attn_class() -> Callable[..., nn.Module]:
    from dinov3_fast.nn import SelfAttention
    return SelfAttention


class SelfAttentionBlock(nn.Module):
    """Args (DINOv3's): dim D, num_heads H, ffn_ratio, qkv_bias, proj_bias, ffn_bias, drop,
    attn_drop, init_values (LayerScale init; None: no LayerScale), drop_path (sample-drop rate),
    act_layer, norm_layer (dim -> module), attn_class, ffn_layer, mask_k_bias; plus
    backend (the attention op's backend: None = fastest available, "reference", "triton", ...)
    and device.

    forward(x [B, N, D] | list of [B_i, N_i, D], rope (sin, cos) [HW_i, Dh] | list | None)
        -> same structure as x.
    """

    def __init__(self, dim: int, num_heads: int, ffn_ratio: float = 4.0, qkv_bias: bool = False,
                 proj_bias: bool = True, ffn_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 init_values: float | None = None, drop_path: float = 0.0,
                 act_layer: Callable[..., nn.Module] = nn.GELU, norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
                 attn_class: Callable[..., nn.Module] | None = None, ffn_layer: Callable[..., nn.Module] = Mlp,
                 mask_k_bias: bool = False, backend: str | None = None, device=None) -> None:
        super().__init__()
        attn_class = attn_class or default_attn_class()
        self.norm1 = norm_layer(dim, device=device)
        self.attn = attn_class(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                               attn_drop=attn_drop, proj_drop=drop, mask_k_bias=mask_k_bias,
                               backend=backend, device=device)
        self.ls1 = LayerScale(dim, init_values, device=device) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim, device=device)
        self.mlp = ffn_layer(in_features=dim, hidden_features=int(dim * ffn_ratio), act_layer=act_layer,
                             drop=drop, bias=ffn_bias, device=device)
        self.ls2 = LayerScale(dim, init_values, device=device) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path

    def forward(self, x_or_x_list, rope_or_rope_list=None):
        if isinstance(x_or_x_list, torch.Tensor):
            return self._forward_list([x_or_x_list], [rope_or_rope_list])[0]
        if isinstance(x_or_x_list, (list, tuple)):
            rope_list = rope_or_rope_list if rope_or_rope_list is not None else [None] * len(x_or_x_list)
            if len(rope_list) != len(x_or_x_list):
                raise ValueError(f"rope list must have one entry per crop: {len(x_or_x_list)} crops, "
                                 f"got {len(rope_list)}")
            return self._forward_list(list(x_or_x_list), list(rope_list))
        raise TypeError(f"x must be a Tensor or a list of Tensors, got {type(x_or_x_list).__name__}")

    def _attn_residual(self, x_list: list[torch.Tensor], rope_list: list[Rope | None]) -> torch.Tensor:
        """ls1(attn(norm1(x))) for every crop, as one [sum B_i N_i, D] tensor."""
        flat, shapes = cat_tokens(x_list)
        out = self.attn.forward_list(split_tokens(self.norm1(flat), shapes), rope_list=rope_list)
        return self.ls1(cat_tokens(out)[0])

    def _ffn_residual(self, flat: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(flat)))

    def _forward_list(self, x_list: list[torch.Tensor], rope_list: list[Rope | None]) -> list[torch.Tensor]:
        if self.training and self.sample_drop_ratio > 0.0:
            return self._forward_list_drop_path(x_list, rope_list)
        flat, shapes = cat_tokens(x_list)
        flat = flat + self._attn_residual(x_list, rope_list)
        flat = flat + self._ffn_residual(flat)
        return split_tokens(flat, shapes)

    def _subsets(self, x_list: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[float]]:
        idx, scale = [], []
        for x in x_list:
            b = x.shape[0]
            keep = max(int(b * (1 - self.sample_drop_ratio)), 1)
            idx.append(torch.randperm(b, device=x.device)[:keep])
            scale.append(b / keep)
        return idx, scale

    def _forward_list_drop_path(self, x_list: list[torch.Tensor], rope_list: list[Rope | None]) -> list[torch.Tensor]:
        idx1, scale = self._subsets(x_list)
        sub = [x[i] for x, i in zip(x_list, idx1)]
        res = split_tokens(self._attn_residual(sub, rope_list), [s.shape for s in sub])
        x_attn = [torch.index_add(x, 0, i, r.to(x.dtype), alpha=a) for x, i, r, a in zip(x_list, idx1, res, scale)]
        idx2, _ = self._subsets(x_attn)
        sub = [x[i] for x, i in zip(x_attn, idx2)]
        flat, shapes = cat_tokens(sub)
        res = split_tokens(self._ffn_residual(flat), shapes)
        return [torch.index_add(x, 0, i, r.to(x.dtype), alpha=a) for x, i, r, a in zip(x_attn, idx2, res, scale)]
