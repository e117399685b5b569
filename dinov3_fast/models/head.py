"""DINOv3's projection head (dinov3/layers/dino_head.py), used for both DINO and iBOT.

    x [B, D] -> mlp -> bottleneck [B, bottleneck_dim] -> L2-normalise -> last_layer -> [B, K]

`mlp` is DINOv3's nn.Sequential: Linear(D, hidden), GELU, (Linear(hidden, hidden), GELU) x
(nlayers - 2), Linear(hidden, bottleneck) -- with BatchNorm1d after each hidden Linear when
use_bn -- so the state-dict names are mlp.0.*, mlp.2.*, mlp.4.* for 3 layers. `last_layer` is a
bias-free Linear(bottleneck, K) with no weight norm. The L2 normalisation uses eps 1e-6 for fp16
and 1e-12 otherwise, as DINOv3 does.

Recipes: ViT-7B DINO head hidden 8192, bottleneck 512, K 262,144; iBOT head hidden 4096,
bottleneck 384, K 98,304; the ViT-L default 2048 / 256 / 65,536.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool,
               device=None) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias, device=device)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(d_in, d_out, bias=bias, device=device))
        if use_bn:
            layers.append(nn.BatchNorm1d(d_out, device=device))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias, device=device))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """Args (DINOv3's): in_dim D, out_dim K, use_bn, nlayers (>= 1), hidden_dim, bottleneck_dim,
    mlp_bias; plus device (e.g. "meta").

    forward(x [..., D], no_last_layer=False, only_last_layer=False, return_bottleneck=False):
      - default: logits [..., K];
      - no_last_layer: the normalised bottleneck [..., bottleneck_dim] (so a fused linear + loss
        can apply `last_layer.weight` [K, bottleneck_dim] itself);
      - only_last_layer: x is already the normalised bottleneck; returns last_layer(x);
      - return_bottleneck: also return the pre-normalisation bottleneck;
      - last_layer_loss: a callable (normalised bottleneck [..., bottleneck_dim], last_layer.weight
        [K, bottleneck_dim]) -> loss, applied instead of the last layer: a fused linear + loss
        (`dinov3_fast.ops.linear_soft_cross_entropy`) that never forms the logits. Called inside
        forward, so a head sharded by FSDP2 has its weight gathered while the loss reads it.
    """

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, nlayers: int = 3, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, mlp_bias: bool = True, device=None) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn, mlp_bias, device)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False, device=device)

    def init_weights(self) -> None:
        """DINOv3's init: trunc_normal(std 0.02) Linear weights, zero biases, BatchNorm reset."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm1d):
                m.reset_parameters()

    def forward(self, x: torch.Tensor, no_last_layer: bool = False, only_last_layer: bool = False,
                return_bottleneck: bool = False, last_layer_loss: Callable[[torch.Tensor, torch.Tensor], Any] | None = None):
        bottleneck = None
        if not only_last_layer:
            x = self.mlp(x)
            bottleneck = x
            x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        if last_layer_loss is not None:
            return last_layer_loss(x, self.last_layer.weight)
        if not no_last_layer:
            x = self.last_layer(x)
        return (x, bottleneck) if return_bottleneck else x
