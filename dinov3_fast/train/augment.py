"""DINOv3's multi-crop augmentation (dinov3/data/augmentations.py) as batched torch ops.

Legend: B images, S source side, G / L / Gg global, local and Gram-teacher crop sides.

    aug = MultiCropAugmentation(cfg.crops)
    crops = aug(images_B3SS, generator)   # images in [0, 1], any device (run it on the GPU)
    crops.global_crops [2, B, 3, G, G], crops.local_crops [n, B, 3, L, L], crops.gram_crops [2, B, 3, Gg, Gg] | None

Per crop and image, as DINOv3: random resized crop (bicubic, scale from crops.*_scale, aspect
ratio log-uniform in [3/4, 4/3]), horizontal flip (p 0.5), colour jitter (p 0.8: brightness 0.4,
contrast 0.4, saturation 0.2, hue 0.1), grayscale (p 0.2), then Gaussian blur (kernel 9, sigma in
[0.1, 2]; p 1.0 for the first global crop, 0.1 for the second, 0.5 for local crops), solarize
(second global crop, p 0.2), and normalisation with crops.rgb_mean / rgb_std.

Differences from torchvision, each a batched equivalent: the crop box is drawn once and clamped
to the image (torchvision retries 10 times, then centre-crops); the jitter ops run in a fixed
order (torchvision permutes them); hue is a rotation in YIQ space (torchvision goes through HSV).
The Gram teacher's crops are DINOv3's resized global crops: the same boxes, flips, colours, blur
and solarisation, rendered at Gg from the source (the blur's sigma scaled by Gg / G), or the
plain crops when crops.gram_teacher_no_distortions.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dinov3_fast.train.config import CropsConfig

_GRAY = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


@dataclass
class Crops:
    global_crops: torch.Tensor       # [2, B, 3, G, G]
    local_crops: torch.Tensor        # [n, B, 3, L, L]
    gram_crops: torch.Tensor | None  # [2, B, 3, Gg, Gg]


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


def _coin(n: int, p: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) < p


def crop_boxes(n: int, scale: tuple[float, float], flips: bool, gen: torch.Generator, device) -> torch.Tensor:
    """Affine maps theta [n, 2, 3] from a crop's normalised coordinates to the source image's."""
    area = _uniform(n, *scale, gen, device)
    log_ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), gen, device)
    ratio = log_ratio.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = w / 2 + torch.rand(n, generator=gen, device=device) * (1 - w)
    cy = h / 2 + torch.rand(n, generator=gen, device=device) * (1 - h)
    sx = torch.where(_coin(n, 0.5, gen, device), -w, w) if flips else w
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, 2 * cx - 1
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * cy - 1
    return theta


def render(images: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resample of images [B, 3, S, S] through theta [B, 2, 3] to [B, 3, size, size]."""
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp_(0, 1)


@dataclass
class ColorParams:
    jitter: torch.Tensor      # [B] bool
    brightness: torch.Tensor  # [B]
    contrast: torch.Tensor    # [B]
    saturation: torch.Tensor  # [B]
    hue: torch.Tensor         # [B]
    gray: torch.Tensor        # [B] bool

    @staticmethod
    def draw(n: int, gen: torch.Generator, device) -> ColorParams:
        return ColorParams(_coin(n, 0.8, gen, device), _uniform(n, 0.6, 1.4, gen, device),
                           _uniform(n, 0.6, 1.4, gen, device), _uniform(n, 0.8, 1.2, gen, device),
                           _uniform(n, -0.1, 0.1, gen, device), _coin(n, 0.2, gen, device))


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, device: torch.device, dtype: torch.dtype, inverse: bool = False) -> torch.Tensor:
    """`values` as a tensor on `device` (its matrix inverse if `inverse`), made once per device and
    dtype: made per call on a GPU, it is a copy from pageable host memory, which waits for every
    queued kernel (as does linalg.inv's check of its result), several times per crop."""
    t = torch.tensor(values, dtype=dtype)
    return (torch.linalg.inv(t) if inverse else t).to(device)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (x * _constant(_GRAY, x.device, x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)


def color(x: torch.Tensor, p: ColorParams) -> torch.Tensor:
    """Colour jitter then grayscale, per image. x [B, 3, H, W] in [0, 1]."""
    v = lambda t: t.view(-1, 1, 1, 1)  # noqa: E731
    y = (x * v(p.brightness)).clamp(0, 1)
    mean = _gray(y).mean((2, 3), keepdim=True)
    y = ((y - mean) * v(p.contrast) + mean).clamp(0, 1)
    g = _gray(y)
    y = ((y - g) * v(p.saturation) + g).clamp(0, 1)
    # hue: rotate the chroma (I, Q) plane of YIQ by 2 pi h
    yiq = torch.einsum("ij,bjhw->bihw", _constant(_RGB_TO_YIQ, x.device, x.dtype), y)
    ang = 2 * math.pi * p.hue
    c, s = v(ang.cos()), v(ang.sin())
    i, q = yiq[:, 1:2], yiq[:, 2:3]
    yiq = torch.cat([yiq[:, :1], c * i - s * q, s * i + c * q], 1)
    y = torch.einsum("ij,bjhw->bihw", _constant(_RGB_TO_YIQ, x.device, x.dtype, inverse=True), yiq).clamp(0, 1)
    x = torch.where(v(p.jitter), y, x)
    return torch.where(v(p.gray), _gray(x).expand_as(x), x)


@dataclass(frozen=True)
class BlurParams:
    """Per-image Gaussian blur draws: whether to blur, and sigma in [0.1, 2] (pixels of a crop
    of side `size`, the side the draws were made for)."""
    apply: torch.Tensor  # [B] bool
    sigma: torch.Tensor  # [B]

    @staticmethod
    def draw(n: int, prob: float, gen: torch.Generator, device) -> BlurParams:
        return BlurParams(_coin(n, prob, gen, device), _uniform(n, 0.1, 2.0, gen, device))


def blur(x: torch.Tensor, p: BlurParams, scale: float = 1.0) -> torch.Tensor:
    """Gaussian blur (kernel 9, reflect padding) where p.apply. `scale`: this crop's side over the
    side the sigmas were drawn for (a Gram crop rendered at Gg from the global crop's draws): the
    sigma and the kernel grow with it, so the blur covers the same part of the image as resizing
    the blurred global crop would (DINOv3's Gram crop)."""
    b, c, h, w = x.shape
    half = max(4, math.ceil(4 * scale))
    taps = torch.arange(2 * half + 1, device=x.device, dtype=x.dtype) - half
    k = torch.exp(-(taps[None] ** 2) / (2 * (scale * p.sigma[:, None].to(x.dtype)) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*3, 2 half + 1]
    pad = min(half, h - 1, w - 1)
    y = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    if pad < half:  # tiny crops: fall back to replicate beyond what reflect allows
        y = F.pad(y, (half - pad,) * 4, mode="replicate")
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c).view(b, c, h, w)
    return torch.where(p.apply.view(-1, 1, 1, 1), y, x)


def solarize(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """1 - x where x >= 0.5, on the images where apply [B] (bool)."""
    return torch.where(apply.view(-1, 1, 1, 1) & (x >= 0.5), 1 - x, x)


class MultiCropAugmentation:
    """DataAugmentationDINO as batched torch ops (see the module docstring)."""

    def __init__(self, crops: CropsConfig) -> None:
        self.cfg = crops

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = _constant(tuple(self.cfg.rgb_mean), x.device, x.dtype).view(1, 3, 1, 1)
        std = _constant(tuple(self.cfg.rgb_std), x.device, x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> Crops:
        """images [B, 3, S, S] (float in [0, 1], or uint8) -> Crops. `gen` lives on images' device."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, S, S], got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            images = images.float() / 255
        c, b, dev = self.cfg, images.shape[0], images.device
        globals_, grams = [], []
        for i in range(2):
            theta = crop_boxes(b, c.global_crops_scale, c.horizontal_flips, gen, dev)
            colors = ColorParams.draw(b, gen, dev)
            blurs = BlurParams.draw(b, 1.0 if i == 0 else 0.1, gen, dev)
            solar = _coin(b, 0.2, gen, dev) if i == 1 else None
            x = blur(color(render(images, theta, c.global_crops_size), colors), blurs)
            globals_.append(self._normalize(x if solar is None else solarize(x, solar)))
            if c.gram_teacher_crops_size is not None:  # the same draws, at Gg
                g = render(images, theta, c.gram_teacher_crops_size)
                if not c.gram_teacher_no_distortions:
                    g = blur(color(g, colors), blurs, c.gram_teacher_crops_size / c.global_crops_size)
                    g = g if solar is None else solarize(g, solar)
                grams.append(self._normalize(g))
        locals_ = []
        for _ in range(c.local_crops_number):
            theta = crop_boxes(b, c.local_crops_scale, c.horizontal_flips, gen, dev)
            x = color(render(images, theta, c.local_crops_size), ColorParams.draw(b, gen, dev))
            locals_.append(self._normalize(blur(x, BlurParams.draw(b, 0.5, gen, dev))))
        return Crops(torch.stack(globals_), torch.stack(locals_), torch.stack(grams) if grams else None)
