"""DINOv3's feed-forward layers: Mlp (fc1 -> GELU -> fc2) and SwiGLUFFN (w3(silu(w1 x) * w2 x)).

Selected by name like DINOv3's `ffn_layer` option: "mlp", "swiglu" (hidden rounded up to a
multiple of 8), "swiglu32", "swiglu64", "swiglu128". For SwiGLU the block's hidden size
int(D * ffn_ratio) is first scaled by 2/3 (truncated), then rounded up to `align_to`: ViT-7B
(D 4096, ratio 3, swiglu64) gets int(2 * 12288 / 3) = 8192.

Token-wise layers: `forward_list` concatenates the tokens of several crops, runs once, and splits.
Shapes: x [..., D] -> [..., D].
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def cat_tokens(x_list: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Size]]:
    """Flatten every [..., C] tensor to [n_i, C] and concatenate: ([sum n_i, C], shapes)."""
    shapes = [x.shape for x in x_list]
    flat = [x.reshape(-1, x.shape[-1]) for x in x_list]
    return (flat[0] if len(flat) == 1 else torch.cat(flat)), shapes


def split_tokens(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """Inverse of `cat_tokens`; the last axis may have changed size."""
    if len(shapes) == 1:
        return [flat.reshape(*shapes[0][:-1], flat.shape[-1])]
    counts = [s[:-1].numel() for s in shapes]
    parts = torch.split(flat, counts, dim=0)
    return [p.reshape(*s[:-1], flat.shape[-1]) for p, s in zip(parts, shapes)]


class _TokenwiseList:
    """forward_list(x_list): one forward over all crops' tokens concatenated."""

    def forward_list(self, x_list: list[torch.Tensor]) -> list[torch.Tensor]:
        flat, shapes = cat_tokens(x_list)
        return split_tokens(self(flat), shapes)


class Mlp(nn.Module, _TokenwiseList):
    """fc1 [hidden, D] -> act -> fc2 [D_out, hidden]; DINOv3's names fc1/act/fc2/drop."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: Callable[..., nn.Module] = nn.GELU, drop: float = 0.0, bias: bool = True,
                 device=None) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, device=device)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, device=device)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def swiglu_hidden_size(hidden_features: int, align_to: int = 8) -> int:
    """DINOv3's SwiGLU width: int(hidden * 2 / 3) rounded up to a multiple of `align_to`."""
    d = int(hidden_features * 2 / 3)
    return d + (-d % align_to)


class SwiGLUFFN(nn.Module, _TokenwiseList):
    """w3(silu(w1 x) * w2 x); w1, w2 [H', D], w3 [D_out, H'] with H' = swiglu_hidden_size(hidden).

    `act_layer` and `drop` are accepted for DINOv3's signature and unused, as in DINOv3.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: Callable[..., nn.Module] | None = None, drop: float = 0.0, bias: bool = True,
                 align_to: int = 8, device=None) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden = swiglu_hidden_size(hidden_features or in_features, align_to)
        self.w1 = nn.Linear(in_features, hidden, bias=bias, device=device)
        self.w2 = nn.Linear(in_features, hidden, bias=bias, device=device)
        self.w3 = nn.Linear(hidden, out_features, bias=bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


FFN_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": Mlp,
    "swiglu": SwiGLUFFN,
    "swiglu32": partial(SwiGLUFFN, align_to=32),
    "swiglu64": partial(SwiGLUFFN, align_to=64),
    "swiglu128": partial(SwiGLUFFN, align_to=128),
}


def ffn_layer(name: str) -> Callable[..., nn.Module]:
    """The FFN constructor for DINOv3 name `name`."""
    if name not in FFN_LAYERS:
        raise ValueError(f"ffn_layer must be one of {tuple(FFN_LAYERS)}, got {name!r}")
    return FFN_LAYERS[name]


def ffn_hidden_size(name: str, dim: int, ffn_ratio: float) -> int:
    """Width of the FFN's hidden layer for `name`, D = `dim`: what the weights will be shaped."""
    ffn_layer(name)
    hidden = int(dim * ffn_ratio)
    if name == "mlp":
        return hidden
    align = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}[name]
    return swiglu_hidden_size(hidden, align)
