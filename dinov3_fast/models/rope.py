"""DINOv3's axial 2-D RoPE: (sin, cos) tables [HW, Dh] for one patch grid, no learnable weights.

Per head dimension Dh there are Dh/4 periods, either base^(4j/Dh) (j < Dh/4) or, with min/max
periods, log-spaced from min_period to max_period. Patch centres (i + 0.5) are normalised to
[-1, 1] per axis ("separate"), or both axes by max(H, W) / min(H, W) ("max" / "min").
In training mode only, three optional coordinate augmentations are drawn afresh on every call
(DINOv3 calls the module once per block and per crop):
  shift    coords += U(-s, s)                 (one value per axis)
  jitter   coords *= exp(U(-log j, log j))    (one value per axis)
  rescale  coords *= exp(U(-log r, log r))    (one value for both axes; DINOv3 trains with r = 2)
Angles = 2*pi*coord/period laid out [y periods | x periods] and tiled twice, matching the
rotate-half pairing (d, d + Dh/2) of the attention op.

The `periods` buffer is persistent, as in DINOv3 (whose teacher is initialised from the
student's state dict), so it appears in checkpoints as `rope_embed.periods` [Dh/4]; it is
recomputed by `reset_parameters`, e.g. after materialising a meta-device model.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn


class RopePositionEmbedding(nn.Module):
    """Args:
        embed_dim: D; must be a multiple of 4 * num_heads.
        num_heads: H; Dh = D / H.
        base: period base (exclusive with min_period + max_period).
        min_period, max_period: log-spaced periods instead of `base`.
        normalize_coords: "separate" | "max" | "min".
        shift_coords, jitter_coords, rescale_coords: training-time augmentations (None: off).
        dtype: dtype of the coordinates, periods and tables (DINOv3's pos_embed_rope_dtype).
    forward(*, H, W) -> (sin, cos), each [H*W, Dh].
    """

    def __init__(self, embed_dim: int, *, num_heads: int, base: float | None = 100.0,
                 min_period: float | None = None, max_period: float | None = None,
                 normalize_coords: Literal["min", "max", "separate"] = "separate",
                 shift_coords: float | None = None, jitter_coords: float | None = None,
                 rescale_coords: float | None = None, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        if embed_dim % (4 * num_heads):
            raise ValueError(f"embed_dim must be a multiple of 4 * num_heads = {4 * num_heads}, got {embed_dim}")
        both = min_period is not None and max_period is not None
        if (base is None) != both:
            raise ValueError("give either base or both min_period and max_period, "
                             f"got base={base}, min_period={min_period}, max_period={max_period}")
        if normalize_coords not in ("min", "max", "separate"):
            raise ValueError(f"normalize_coords must be 'min', 'max' or 'separate', got {normalize_coords!r}")
        self.D_head = embed_dim // num_heads
        self.base = base
        self.min_period = min_period
        self.max_period = max_period
        self.normalize_coords = normalize_coords
        self.shift_coords = shift_coords
        self.jitter_coords = jitter_coords
        self.rescale_coords = rescale_coords
        self.dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.register_buffer("periods", torch.empty(self.D_head // 4, device=device, dtype=self.dtype),
                             persistent=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)compute `periods` [Dh/4] in self.dtype on the buffer's device."""
        dd = {"device": self.periods.device, "dtype": self.dtype}
        n = self.D_head // 4
        if self.base is not None:
            periods = self.base ** (2 * torch.arange(n, **dd) / (self.D_head // 2))
        else:
            ratio = self.max_period / self.min_period
            periods = ratio ** torch.linspace(0, 1, n, **dd) / ratio * self.max_period
        with torch.no_grad():
            self.periods.copy_(periods)

    _init_weights = reset_parameters  # DINOv3's name, called by its init_weights

    def coords(self, H: int, W: int) -> torch.Tensor:
        """Patch-centre coordinates [H*W, 2] (y, x), augmented when training."""
        dd = {"device": self.periods.device, "dtype": self.dtype}
        if self.normalize_coords == "separate":
            den_h, den_w = H, W
        else:
            den_h = den_w = max(H, W) if self.normalize_coords == "max" else min(H, W)
        ys = torch.arange(0.5, H, **dd) / den_h
        xs = torch.arange(0.5, W, **dd) / den_w
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        if self.training:
            if self.shift_coords is not None:
                coords = coords + torch.empty(2, **dd).uniform_(-self.shift_coords, self.shift_coords)[None, :]
            if self.jitter_coords is not None:
                j = math.log(self.jitter_coords)
                coords = coords * torch.empty(2, **dd).uniform_(-j, j).exp()[None, :]
            if self.rescale_coords is not None:
                r = math.log(self.rescale_coords)
                coords = coords * torch.empty(1, **dd).uniform_(-r, r).exp()
        return coords

    @property
    def draws_per_call(self) -> bool:
        """Whether a call draws fresh coordinate augmentations (training with any of them set);
        otherwise the tables are a function of (H, W) alone, the same in every call."""
        return self.training and any(a is not None for a in (self.shift_coords, self.jitter_coords,
                                                              self.rescale_coords))

    def forward(self, *, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        coords = self.coords(H, W)  # [HW, 2]
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # [HW, 2, Dh/4]
        angles = angles.flatten(1, 2).tile(2)  # [HW, Dh]
        return torch.sin(angles), torch.cos(angles)
