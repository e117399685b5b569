"""Normalisation layers of DINOv3's ViT, selected by name like DINOv3's `norm_layer` option.

  "layernorm"      nn.LayerNorm, eps 1e-6
  "layernormbf16"  nn.LayerNorm, eps 1e-5 (what every published DINOv3 backbone uses)
  "rmsnorm"        RMSNorm below, eps 1e-5

Parameter names are DINOv3's: LayerNorm has `weight` and `bias` [D], RMSNorm has `weight` [D].
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 and cast back before the scale.

    Args:
        dim: D, the size of the last axis.
        eps: added to the mean square.
    Shapes: x [..., D] -> [..., D].
    """

    def __init__(self, dim: int, eps: float = 1e-5, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


NORM_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "layernorm": partial(nn.LayerNorm, eps=1e-6),
    "layernormbf16": partial(nn.LayerNorm, eps=1e-5),
    "rmsnorm": RMSNorm,
}


def norm_layer(name: str) -> Callable[..., nn.Module]:
    """The constructor (dim, device=None) -> nn.Module for DINOv3 norm name `name`."""
    if name not in NORM_LAYERS:
        raise ValueError(f"norm_layer must be one of {tuple(NORM_LAYERS)}, got {name!r}")
    return NORM_LAYERS[name]
