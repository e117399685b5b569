"""DINOv3's multi-crop augmentation (dinov3/data/augmentations.py) as batched torch ops.

Legend: B images, H x W their canvas, G / L / Gg global, local and Gram-teacher crop sides.

    aug = MultiCropAugmentation(cfg.crops)
    crops = aug(images_B3HW, generator)  # images in [0, 1], any device (run it on the GPU)
    crops = aug(canvas_B3HW, generator, extents_B2)  # images of their own sizes, padded (data.py)
    crops.global_crops [2, B, 3, G, G], crops.local_crops [n, B, 3, L, L], crops.gram_crops [2, B, 3, Gg, Gg] | None

Images of different sizes come as one padded canvas: image i fills the top-left extents[i] =
(height, width) pixels of canvas i, and nothing reads the rest (a crop's resampling taps cover
only its box, `resample_weights`, and every box lies inside its image). Without extents every
image fills its canvas.

Per crop and image, as DINOv3: random resized crop (`crop_boxes`: area a fraction uniform in
crops.*_scale of the image's own area in pixels, pixel aspect ratio log-uniform in [3/4, 4/3],
position uniform over where the box fits; the box resized as Pillow's bicubic resize of that
crop, antialiased when it shrinks, `render`), horizontal flip (p 0.5), colour jitter (p 0.8:
brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1), grayscale (p 0.2), then Gaussian blur
(kernel 9, sigma in [0.1, 2]; with the probabilities DINOv3's code runs, `BLUR_PROB`), solarize
(second global crop, p 0.2), and normalisation with crops.rgb_mean / rgb_std.

Global crops with a Gram teacher (crops.gram_teacher_crops_size = Gg), DINOv3's order: each global
view is cropped once at M = max(G, Gg). With the distortions shared (the default), they run at M,
and the normalised view is resized (bicubic, antialiased) to G for the student and the teacher and
to Gg for the Gram teacher. With crops.gram_teacher_no_distortions, the undistorted M view is
resized to G before the distortions (so the blur acts at G) and to Gg for the Gram teacher, which
gets no distortion. A resize to M is the identity; without a Gram teacher M = G.

Differences from torchvision, each a batched equivalent: the crop box is drawn once and its
width and height each clamped to the image's (torchvision retries 10 times, then centre-crops a
box of ratio clamped to [3/4, 4/3]): a box drawn too wide or too tall for its image spans it on
that axis, with less than the drawn area and a pixel ratio between the drawn one and the
image's own (so outside [3/4, 4/3] only on images outside it: at most sqrt(2 x 4/3) = 1.63 on
an image folder's 2 : 1 images, data.py); the box is not rounded to whole pixels (Pillow's
resize takes such a box: `resample_weights`); the jitter ops run in a fixed order (torchvision
permutes them); hue is a rotation in YIQ space (torchvision goes through HSV).
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
_BLUR_HALF = 4  # DINOv3's blur kernel has 2 * 4 + 1 = 9 taps, whatever the crop size
# The blur probabilities DINOv3 trains with (first global, second global, local crop). Its recipe
# names 1.0 / 0.1 / 0.5, but its GaussianBlur(p) passes 1 - p to torchvision's RandomApply, which
# applies the blur with the probability it is given: the code runs 0.0 / 0.9 / 0.5
# (facebookresearch/dinov3 issue #286, open). We run what DINOv3 ran: its released models saw it.
BLUR_PROB = (0.0, 0.9, 0.5)


@dataclass
class Crops:
    global_crops: torch.Tensor       # [2, B, 3, G, G]
    local_crops: torch.Tensor        # [n, B, 3, L, L]
    gram_crops: torch.Tensor | None  # [2, B, 3, Gg, Gg]


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


def _coin(n: int, p: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) < p


def crop_boxes(n: int, scale: tuple[float, float], flips: bool, gen: torch.Generator, device,
               aspect: torch.Tensor | None = None) -> torch.Tensor:
    """Crop boxes as affine maps theta [n, 2, 3] from a crop's normalised coordinates to its source
    image's (half-width and half-height, centre, as fractions of the image's own width and height;
    a negative theta[:, 0, 0] mirrors the crop). v2.RandomResizedCrop's draw in pixels: area
    a = s h_i w_i for s uniform in `scale`, ratio r log-uniform in [3/4, 4/3], width sqrt(a r),
    height sqrt(a / r), each clamped to the image's (the module docstring), the position uniform
    over where the box fits. `aspect` [n]: each image's width / height in pixels (None: square
    images); in fractions of the image the box is then sqrt(s r / aspect) wide and
    sqrt(s aspect / r) high."""
    area = _uniform(n, *scale, gen, device)
    log_ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), gen, device)
    ratio = log_ratio.exp()
    if aspect is not None:  # the ratio of the box's fractions of its image's width and height
        ratio = ratio / aspect.to(device=ratio.device, dtype=ratio.dtype)
    w = (area * ratio).sqrt().clamp(max=1.0)
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = w / 2 + torch.rand(n, generator=gen, device=device) * (1 - w)
    cy = h / 2 + torch.rand(n, generator=gen, device=device) * (1 - h)
    sx = torch.where(_coin(n, 0.5, gen, device), -w, w) if flips else w
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, 2 * cx - 1
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * cy - 1
    return theta


_CUBIC_A = -0.5  # Keys' cubic as Pillow has it (and torch's antialiased bicubic); grid_sample's is -0.75


def _cubic(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    a = _CUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(lo: torch.Tensor, hi: torch.Tensor, out: int, size: int) -> torch.Tensor:
    """Rows [B, out, size] that resample the source span [lo, hi) (pixels, per image) of a
    `size`-pixel axis to `out` pixels as Pillow's bicubic resize of that crop: output pixel o is
    centred at lo + (o + 0.5) * scale, scale = (hi - lo) / out; its taps are the cubic stretched
    by max(scale, 1) (antialiasing when the crop shrinks), over the source pixels that the crop
    covers (a crop is cut before it is resized), normalised to sum 1."""
    dt = torch.float32 if lo.dtype != torch.float64 else lo.dtype
    lo, hi = lo.to(dt), hi.to(dt)
    scale = (hi - lo) / out
    stretch = scale.clamp(min=1.0)
    centre = lo[:, None] + (torch.arange(out, device=lo.device, dtype=dt) + 0.5) * scale[:, None]  # [B, out]
    pix = torch.arange(size, device=lo.device, dtype=dt)
    w = _cubic((pix + 0.5 - centre[..., None]) / stretch[:, None, None])
    # the crop's pixels: an edge within 1e-3 px of a pixel boundary is on it (box fractions x side
    # are not exact in floating point)
    first, last = (lo + 1e-3).floor(), (hi - 1e-3).ceil()
    w = w * ((pix >= first[:, None, None]) & (pix < last[:, None, None]))
    return w / w.sum(-1, keepdim=True)


def render(images: torch.Tensor, theta: torch.Tensor, size: int, extents: torch.Tensor | None = None
           ) -> torch.Tensor:
    """Crops of images [B, 3, H, W] resized to [B, 3, size, size] as DINOv3's RandomResizedCrop on
    its PIL images: Pillow's bicubic (antialiased) resize of the box that theta [B, 2, 3] maps
    the output onto, mirrored where theta[:, 0, 0] < 0 (the flip), clamped to [0, 1] as 8-bit
    pixels are. theta is in fractions of each image's extent: extents [B, 2] (height, width; the
    image's top-left pixels of the canvas), or the whole H x W without extents. Separable, so two
    batched matmuls; a box inside its image puts no weight on the canvas beyond it."""
    if extents is None:
        h, w = images.shape[-2:]
    else:
        ext = extents.to(device=theta.device, dtype=theta.dtype)
        h, w = ext[:, 0], ext[:, 1]
    cx, cy = (theta[:, 0, 2] + 1) * (w / 2), (theta[:, 1, 2] + 1) * (h / 2)
    half_w, half_h = theta[:, 0, 0].abs() * (w / 2), theta[:, 1, 1] * (h / 2)
    wx = resample_weights(cx - half_w, cx + half_w, size, images.shape[-1])  # [B, size, W]
    wx = torch.where((theta[:, 0, 0] < 0)[:, None, None], wx.flip(1), wx)
    wy = resample_weights(cy - half_h, cy + half_h, size, images.shape[-2])  # [B, size, H]
    x = images.to(wx.dtype) @ wx.transpose(1, 2)[:, None]  # [B, 3, H, size]
    return (wy[:, None] @ x).to(images.dtype).clamp_(0, 1)


def resize(x: torch.Tensor, size: int, pixels: bool) -> torch.Tensor:
    """Square crops x [B, 3, S, S] resized to [B, 3, size, size], bicubic with antialiasing as
    torchvision's v2.Resize (x itself when size == S). `pixels`: x holds pixel values, clamped to
    [0, 1] after the resize as a resized image is; otherwise (normalised values) left unclamped."""
    if x.shape[-1] == size:
        return x
    y = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return y.clamp_(0, 1) if pixels else y


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
def device_constant(values: tuple, device: torch.device, dtype: torch.dtype, inverse: bool = False) -> torch.Tensor:
    """`values` as a tensor on `device` (its matrix inverse if `inverse`), made once per device and
    dtype: made per call on a GPU, it is a copy from pageable host memory, which waits for every
    queued kernel (as does linalg.inv's check of its result), several times per crop. Shared with
    the synthetic images (data.py), which need constants of their own per batch."""
    t = torch.tensor(values, dtype=dtype)
    return (torch.linalg.inv(t) if inverse else t).to(device)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (x * device_constant(_GRAY, x.device, x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)


def color(x: torch.Tensor, p: ColorParams) -> torch.Tensor:
    """Colour jitter then grayscale, per image. x [B, 3, H, W] in [0, 1]."""
    v = lambda t: t.view(-1, 1, 1, 1)  # noqa: E731
    y = (x * v(p.brightness)).clamp(0, 1)
    mean = _gray(y).mean((2, 3), keepdim=True)
    y = ((y - mean) * v(p.contrast) + mean).clamp(0, 1)
    g = _gray(y)
    y = ((y - g) * v(p.saturation) + g).clamp(0, 1)
    # hue: rotate the chroma (I, Q) plane of YIQ by 2 pi h
    yiq = torch.einsum("ij,bjhw->bihw", device_constant(_RGB_TO_YIQ, x.device, x.dtype), y)
    ang = 2 * math.pi * p.hue
    c, s = v(ang.cos()), v(ang.sin())
    i, q = yiq[:, 1:2], yiq[:, 2:3]
    yiq = torch.cat([yiq[:, :1], c * i - s * q, s * i + c * q], 1)
    y = torch.einsum("ij,bjhw->bihw", device_constant(_RGB_TO_YIQ, x.device, x.dtype, inverse=True), yiq).clamp(0, 1)
    x = torch.where(v(p.jitter), y, x)
    return torch.where(v(p.gray), _gray(x).expand_as(x), x)


@dataclass(frozen=True)
class BlurParams:
    """Per-image Gaussian blur draws: whether to blur, and sigma in [0.1, 2] (pixels of the crop
    it blurs)."""
    apply: torch.Tensor  # [B] bool
    sigma: torch.Tensor  # [B]

    @staticmethod
    def draw(n: int, prob: float, gen: torch.Generator, device) -> BlurParams:
        return BlurParams(_coin(n, prob, gen, device), _uniform(n, 0.1, 2.0, gen, device))


def blur(x: torch.Tensor, p: BlurParams) -> torch.Tensor:
    """Gaussian blur (kernel 9, reflect padding) of x [B, 3, H, W] where p.apply."""
    b, c, h, w = x.shape
    half = _BLUR_HALF
    taps = torch.arange(2 * half + 1, device=x.device, dtype=x.dtype) - half
    k = torch.exp(-(taps[None] ** 2) / (2 * p.sigma[:, None].to(x.dtype) ** 2))
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
        mean = device_constant(tuple(self.cfg.rgb_mean), x.device, x.dtype).view(1, 3, 1, 1)
        std = device_constant(tuple(self.cfg.rgb_std), x.device, x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, gen: torch.Generator, extents: torch.Tensor | None = None) -> Crops:
        """images [B, 3, H, W] (float in [0, 1], or uint8) -> Crops. `gen` lives on images' device.
        extents [B, 2] (height, width), on images' device: image i is the top-left extents[i] of
        its canvas images[i], of which nothing else is read (None: each fills its canvas)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        if extents is not None and tuple(extents.shape) != (images.shape[0], 2):
            raise ValueError(f"extents must be [B, 2] = [{images.shape[0]}, 2], got {tuple(extents.shape)}")
        if images.dtype == torch.uint8:
            images = images.float() / 255
        c, b, dev = self.cfg, images.shape[0], images.device
        aspect = None if extents is None else extents[:, 1].float() / extents[:, 0].float()
        globals_, grams = zip(*(self._global_crop(images, i == 0, gen, extents, aspect) for i in range(2)))
        locals_ = []
        for _ in range(c.local_crops_number):
            theta = crop_boxes(b, c.local_crops_scale, c.horizontal_flips, gen, dev, aspect)
            x = color(render(images, theta, c.local_crops_size, extents), ColorParams.draw(b, gen, dev))
            locals_.append(self._normalize(blur(x, BlurParams.draw(b, BLUR_PROB[2], gen, dev))))
        gram_crops = torch.stack(grams) if c.gram_teacher_crops_size is not None else None
        return Crops(torch.stack(globals_), torch.stack(locals_), gram_crops)

    def _global_crop(self, images: torch.Tensor, first: bool, gen: torch.Generator,
                     extents: torch.Tensor | None = None, aspect: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One global view of images [B, 3, H, W] (extents and their width / height `aspect` as in
        __call__): the normalised student / teacher crop [B, 3, G, G]
        and the Gram teacher's [B, 3, Gg, Gg] (None without crops.gram_teacher_crops_size), cropped
        once at M = max(G, Gg) and resized in DINOv3's order (module docstring). `first`: the first
        global crop (blur `BLUR_PROB[0]`, no solarisation; the second: `BLUR_PROB[1]`, solarisation
        p 0.2)."""
        c, b, dev = self.cfg, images.shape[0], images.device
        theta = crop_boxes(b, c.global_crops_scale, c.horizontal_flips, gen, dev, aspect)
        colors = ColorParams.draw(b, gen, dev)
        blurs = BlurParams.draw(b, BLUR_PROB[0] if first else BLUR_PROB[1], gen, dev)
        solar = None if first else _coin(b, 0.2, gen, dev)

        def distort(x: torch.Tensor) -> torch.Tensor:
            x = blur(color(x, colors), blurs)
            return x if solar is None else solarize(x, solar)

        gram_size = c.gram_teacher_crops_size
        view = render(images, theta, max(c.global_crops_size, gram_size or 0), extents)  # [B, 3, M, M]
        if gram_size is not None and c.gram_teacher_no_distortions:
            student = distort(resize(view, c.global_crops_size, pixels=True))
            return self._normalize(student), self._normalize(resize(view, gram_size, pixels=True))
        view = self._normalize(distort(view))
        gram = resize(view, gram_size, pixels=False) if gram_size is not None else None
        return resize(view, c.global_crops_size, pixels=False), gram
