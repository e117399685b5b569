"""Patch embedding: a stride-16 Conv2d, images [B, C, H, W] -> tokens [B, H/p, W/p, D].

Names are DINOv3's (`proj.weight` [D, C, p, p], `proj.bias` [D]; `norm` is an Identity). Unlike
DINOv3, which silently drops the image border when H or W is not a multiple of p, a size that does
not divide raises, as does a wrong channel count.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PatchEmbed(nn.Module):
    """Args:
        img_size: nominal image size (only recorded, as in DINOv3; any multiple of p is accepted).
        patch_size: p (int or (ph, pw)).
        in_chans: C.
        embed_dim: D.
        flatten_embedding: return [B, HW, D] instead of [B, H', W', D].
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                 in_chans: int = 3, embed_dim: int = 768, flatten_embedding: bool = True, device=None) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.patches_resolution = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.flatten_embedding = flatten_embedding
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, device=device)
        self.norm = nn.Identity()

    def reset_parameters(self) -> None:
        """DINOv3's init: U(-sqrt(k), sqrt(k)) with k = 1 / (C * p^2) for weight and bias."""
        bound = math.sqrt(1.0 / (self.in_chans * self.patch_size[0] * self.patch_size[1]))
        nn.init.uniform_(self.proj.weight, -bound, bound)
        nn.init.uniform_(self.proj.bias, -bound, bound)

    def check_input(self, x: torch.Tensor, name: str = "x") -> tuple[int, int]:
        """Validate images [B, C, H, W]; return the patch grid (H/p, W/p)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"{name} must have {self.in_chans} channels (dim 1 of [B, C, H, W]), "
                             f"got shape {tuple(x.shape)}")
        ph, pw = self.patch_size
        h, w = x.shape[-2:]
        if h % ph or w % pw:
            raise ValueError(f"{name}: image size {h}x{w} is not divisible by the patch size {ph}x{pw}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        return h // ph, w // pw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gh, gw = self.check_input(x)
        x = self.norm(self.proj(x).flatten(2).transpose(1, 2))  # [B, HW, D]
        return x if self.flatten_embedding else x.reshape(x.shape[0], gh, gw, self.embed_dim)
