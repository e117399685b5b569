"""Image sources and the per-step batch.

`SyntheticShapes` (the default: nothing to download) draws procedural images with learnable
structure -- a shape (disk, square, triangle, ring) filled with a texture (stripes, checks) in a
class colour over a noisy two-colour gradient -- from a hidden class label. Each image is a pure
function of (seed, index) but for its background noise, which is drawn per batch (see `batch`);
generated in batches with torch ops on any device.

`ImageFolder` reads the user's own JPEG/PNG files (recursively), short side resized to a fixed
side S and aspect ratio kept up to 2 : 1 (a longer side is centre-cropped to 2 S), and batches
them as one canvas padded to the batch's largest height and width, with each image's extent
(height, width), so the augmentation draws its crops from the whole image as DINOv3 does (its
RandomResizedCrop runs on the full decoded image) and still runs batched on the device.

Both sources give `batch_with_extents(idx, device)` -> (images, labels, extents | None), what a
training step crops from (extents None: every image fills its [S, S]); the synthetic source also
`batch(idx, device)` -> (images [B, 3, S, S], labels), which the kNN probe reads.

`Batch` is what one SSL step consumes, DINOv3's collated dict as a dataclass; `make_batch` builds
one from source images (augmentation on the images' device, masks on the CPU).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dinov3_fast.train.augment import MultiCropAugmentation, device_constant
from dinov3_fast.train.config import ConfigError
from dinov3_fast.train.masking import MaskingGenerator, global_crop_masker, mask_metadata, sample_masks

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# An image folder's images keep their aspect ratio up to this (long side / short side); longer
# sides are centre-cropped to it. It bounds a batch's canvas to MAX_ASPECT^2 = 4 x S^2 per image
# (a batch holding the longest landscape and the longest portrait image), while 3 : 2 photos and
# 16 : 9 frames stay whole; only panoramas lose their ends.
MAX_ASPECT = 2
DECODE_THREADS = min(8, os.cpu_count() or 1)  # per ImageFolder; Pillow releases the GIL while it decodes


def to_device_async(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on `device` without waiting for the GPU: on CUDA through pinned memory with
    non_blocking (CUDA runs a stream sync before a copy from pageable host memory, so a plain
    .to(cuda) would stall the host until every queued kernel has run)."""
    device = torch.device(device) if device is not None else t.device
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# --------------------------------------------------------------------------- sources

class SyntheticShapes:
    """Procedural images with a hidden label: label(i) = hash(seed, i) mod num_classes.

    Class c fixes the shape (c mod 4), the texture (c // 4 mod 2) and the foreground hue
    (c / num_classes); position, size, rotation, texture frequency and phase, background colours
    and noise vary per image.
    """

    def __init__(self, image_size: int, num_classes: int = 8, seed: int = 0) -> None:
        if image_size < 8:
            raise ConfigError(f"image_size must be >= 8, got {image_size}")
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        self.image_size, self.num_classes, self.seed = image_size, num_classes, seed

    def _u(self, idx: torch.Tensor, k: int) -> torch.Tensor:
        """Deterministic uniforms in [0, 1) per (index, stream k), float64."""
        x = idx.double() * (12.9898 + 0.731 * k) + self.seed * 78.233 + 17.0 * k
        return torch.frac(torch.sin(x) * 43758.5453).abs()

    def labels(self, idx: torch.Tensor) -> torch.Tensor:
        return (self._u(idx, 0) * self.num_classes).long().clamp(max=self.num_classes - 1)

    def __len__(self) -> int:
        return 2**31 - 1

    @torch.no_grad()
    def batch(self, idx: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images float [B, 3, S, S] in [0, 1] and labels [B] for dataset indices idx [B]. The
        background noise comes from a generator seeded by (seed, the batch's first index), so it
        is a function of the batch; everything else of each image's own index."""
        # the noise seed, read before idx moves: reading a device tensor waits for the GPU's queue
        noise_seed = int(self.seed * 1_000_003 + int(idx[0])) if idx.numel() else 0
        idx = to_device_async(idx, device)
        s, dev = self.image_size, idx.device
        lab = self.labels(idx)
        u = [self._u(idx, k).float().view(-1, 1, 1) for k in range(1, 14)]
        lin = (torch.arange(s, device=dev, dtype=torch.float32) + 0.5) / s * 2 - 1
        yy, xx = torch.meshgrid(lin, lin, indexing="ij")
        cx, cy = (u[0] - 0.5) * 0.8, (u[1] - 0.5) * 0.8
        radius = 0.35 + 0.3 * u[2]
        rot = u[3] * math.pi
        dx, dy = xx - cx, yy - cy
        rx, ry = dx * rot.cos() + dy * rot.sin(), -dx * rot.sin() + dy * rot.cos()
        shape = (lab % 4).view(-1, 1, 1)
        r = (dx**2 + dy**2).sqrt()
        disk = r < radius
        square = (rx.abs() < radius * 0.8) & (ry.abs() < radius * 0.8)
        tri = (ry < radius * 0.6) & (ry > -radius * 0.9 + 1.6 * rx.abs())
        ring = (r < radius) & (r > radius * 0.6)
        inside = torch.where(shape == 0, disk, torch.where(shape == 1, square, torch.where(shape == 2, tri, ring)))
        freq = 3 + 5 * u[4]
        phase = u[5] * 2 * math.pi
        stripes = torch.sin(freq * math.pi * rx + phase) > 0
        checks = (torch.sin(freq * math.pi * rx + phase) * torch.sin(freq * math.pi * ry)) > 0
        texture = torch.where(((lab // 4) % 2).view(-1, 1, 1) == 0, stripes, checks)
        hue = lab.float().view(-1, 1, 1) / self.num_classes + 0.05 * (u[6] - 0.5)
        fg = _hue_to_rgb(hue)                                        # [B, 3, 1, 1]
        fg_dark = fg * (0.35 + 0.2 * u[7]).unsqueeze(1)
        bg1, bg2 = _hue_to_rgb(u[8]) * 0.5 + 0.25, _hue_to_rgb(u[9]) * 0.5 + 0.25
        t = ((xx * (u[10] - 0.5) + yy * (u[11] - 0.5)) + 0.5).clamp(0, 1).unsqueeze(1)
        bg = bg1 * (1 - t) + bg2 * t
        gen = torch.Generator(device=dev).manual_seed(noise_seed)
        bg = bg + 0.08 * torch.randn(idx.shape[0], 3, s, s, generator=gen, device=dev)
        fgc = torch.where(texture.unsqueeze(1), fg, fg_dark)
        img = torch.where(inside.unsqueeze(1), fgc, bg)
        return img.clamp(0, 1), lab

    def batch_with_extents(self, idx: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor, None]:
        """`batch` and no extents (every image fills its [S, S]): what a training step crops from."""
        return (*self.batch(idx, device), None)


def _hue_to_rgb(h: torch.Tensor) -> torch.Tensor:
    """Saturated colours for hues h [B, 1, 1] in [0, 1): [B, 3, 1, 1]. The channel offsets are a
    cached device constant: made per call, they were a pageable host-to-device copy, which waits
    for every queued kernel (three times per batch, so each step's data waited for the previous
    step's kernels to drain)."""
    k = device_constant((0.0, 1 / 3, 2 / 3), h.device, torch.float32).view(1, 3, 1, 1)
    return 0.5 + 0.5 * torch.cos(2 * math.pi * (h.unsqueeze(1) - k))


class ImageFolder:
    """The user's own images: every .jpg/.jpeg/.png under `root`, short side resized to
    `image_size` (S), aspect ratio kept up to MAX_ASPECT (beyond it, the long side centre-cropped
    to MAX_ASPECT x S). Labels are the index of the first sub-folder (or 0)."""

    def __init__(self, root: str | Path, image_size: int) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"image folder {self.root} does not exist or is not a directory")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise ConfigError(f"image folder {self.root} contains no images ({', '.join(IMAGE_SUFFIXES)} files)")
        self.image_size = image_size
        classes = sorted({p.relative_to(self.root).parts[0] for p in self.files if len(p.relative_to(self.root).parts) > 1})
        self._class = {c: i for i, c in enumerate(classes)}
        self._pool: ThreadPoolExecutor | None = None  # made at the first batch

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        """Image i as uint8 [3, h, w] (min(h, w) = S, max(h, w) <= MAX_ASPECT x S) and its label. A
        file Pillow cannot decode (corrupt, truncated, not an image) is a ConfigError naming it,
        where Pillow's own error may name none."""
        path = self.files[i]
        try:
            image = _read_image(path, self.image_size)
        except (OSError, SyntaxError, ValueError) as exc:  # Pillow's errors for a bad file
            raise ConfigError(f"image {path} could not be decoded ({type(exc).__name__}: {exc}); "
                              f"remove or replace it, then resume from the last checkpoint") from exc
        parts = path.relative_to(self.root).parts
        return image, self._class.get(parts[0], 0) if len(parts) > 1 else 0

    def _load_all(self, idx: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """`load` of dataset indices idx [B] (a CPU tensor), on DECODE_THREADS threads, in idx's
        order: one after another, 500 x 375 px JPEGs took ~7 ms each on the CI machine, 0.9 s of
        host time per step at batch 128, more than the H100 ViT-L step (0.63 s, BENCHMARKS.md)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="dinov3_fast-decode")
        return list(self._pool.map(self.load, [int(i) % len(self) for i in idx.tolist()]))

    def batch_with_extents(self, idx: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What a training step crops from, for dataset indices idx [B] (a CPU tensor): the images
        as one canvas float [B, 3, H, W] in [0, 1] on `device` (H, W: the batch's largest height
        and width; image i in its top-left h_i x w_i pixels, zeros beyond), labels [B] and extents
        [B, 2] = (h_i, w_i) (int64). The canvas holds S^2 to 4 S^2 pixels per image
        (MAX_ASPECT), sent to the device as uint8."""
        items = self._load_all(idx)
        ext = torch.tensor([x.shape[1:] for x, _ in items], dtype=torch.int64).view(-1, 2)
        h, w = (int(v) for v in ext.amax(0)) if items else (self.image_size,) * 2
        pin = device is not None and torch.device(device).type == "cuda"
        canvas = torch.zeros(len(items), 3, h, w, dtype=torch.uint8, pin_memory=pin)
        for c, (x, _) in zip(canvas, items):
            c[:, :x.shape[1], :x.shape[2]] = x
        images = to_device_async(canvas, device).float() / 255
        labels = to_device_async(torch.tensor([y for _, y in items]), device)
        return images, labels, to_device_async(ext, device)


def _read_image(path: Path, size: int) -> torch.Tensor:
    """The image at `path` as uint8 [3, h, w]: 8-bit RGB, short side resized to `size` (bicubic),
    aspect ratio kept up to MAX_ASPECT (a longer side centre-cropped to MAX_ASPECT x size)."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("reading an image folder needs Pillow: pip install 'dinov3-fast[train]'") from exc
    with Image.open(path) as im:
        im = _to_rgb(im)
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = im.size
        cap = MAX_ASPECT * size
        if max(w, h) > cap:
            left, top = max(0, (w - cap) // 2), max(0, (h - cap) // 2)
            im = im.crop((left, top, left + min(w, cap), top + min(h, cap)))
            w, h = im.size
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.view(h, w, 3).permute(2, 0, 1)


def _to_rgb(im):
    """A Pillow image as 8-bit RGB. 16-bit grayscale PNGs (Pillow's modes "I;16*", or "I") are
    scaled to 8 bits first: Pillow's own conversion clips them at 255, which turns all but the
    darkest 0.4% of their range white. Any other mode converts as DINOv3's loader does."""
    if im.mode.startswith("I"):
        im = im.convert("I").point(lambda v: v / 257 + 0.5).convert("L")
    return im.convert("RGB")


def source_image_size(cfg) -> int:
    """The source images' side for `cfg`: train.image_size, else 1.25 x the largest crop taken
    from them, max(crops.global_crops_size, crops.gram_teacher_crops_size)."""
    c = cfg.crops
    return cfg.train.image_size or int(1.25 * max(c.global_crops_size, c.gram_teacher_crops_size or 0))


def build_source(dataset_path: str, image_size: int, num_classes: int = 8, seed: int = 0):
    if dataset_path == "synthetic":
        return SyntheticShapes(image_size, num_classes, seed)
    return ImageFolder(dataset_path, image_size)


def step_indices(source, step: int, batch: int, rank: int, world: int, seed: int) -> torch.Tensor:
    """Dataset indices of this rank's images at `step`: the global batch is images
    [step * batch * world, ...) of an epoch-wise permutation (folders) or of the index line."""
    start = (step * world + rank) * batch
    pos = torch.arange(start, start + batch)
    if isinstance(source, SyntheticShapes):
        return pos
    n = len(source)
    epochs = pos // n
    out = torch.empty_like(pos)
    for e in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + e))
        sel = epochs == e
        out[sel] = perm[pos[sel] % n]
    return out


# --------------------------------------------------------------------------- the step's batch

@dataclass
class Batch:
    """One rank's SSL batch (DINOv3's collated dict). B images, n local crops, HW global patches."""
    global_crops: torch.Tensor       # [2, B, 3, G, G]
    local_crops: torch.Tensor        # [n, B, 3, L, L]
    masks: torch.Tensor              # [2, B, HW] bool (iBOT masks of the student's global crops)
    gram_crops: torch.Tensor | None  # [2, B, 3, Gg, Gg]
    labels: torch.Tensor             # [B] (hidden labels; unused by the SSL step)
    # `mask_metadata(masks.flatten(0, 1))`, made on the CPU with the masks as DINOv3's collate does
    # (on the GPU its nonzero would stall the host); None: the step computes it
    mask_indices: torch.Tensor | None = None  # [M]
    masks_weight: torch.Tensor | None = None  # [M]
    n_masked: torch.Tensor | None = None      # [1]

    @property
    def batch_size(self) -> int:
        return self.global_crops.shape[1]

    def with_masks(self, masks: torch.Tensor) -> Batch:
        """This batch with other iBOT masks [2, B, HW] (their metadata recomputed in the step)."""
        return replace(self, masks=masks, mask_indices=None, masks_weight=None, n_masked=None)

    def shard(self, rank: int, world: int) -> Batch:
        """Images [rank * B / world, (rank + 1) * B / world) of every crop: one rank's part of a global batch."""
        if self.batch_size % world:
            raise ValueError(f"the batch of {self.batch_size} images does not split over {world} ranks")
        b = self.batch_size // world
        sl = slice(rank * b, (rank + 1) * b)
        dims = {"global_crops": 1, "local_crops": 1, "masks": 1, "gram_crops": 1, "labels": 0}
        return replace(self, **{k: (getattr(self, k).narrow(d, sl.start, b) if getattr(self, k) is not None else None)
                                for k, d in dims.items()}, mask_indices=None, masks_weight=None, n_masked=None)


def make_batch(images: torch.Tensor, labels: torch.Tensor, aug: MultiCropAugmentation, gen: torch.Generator,
               masker: MaskingGenerator, mask_ratio_min_max: tuple[float, float], mask_probability: float,
               extents: torch.Tensor | None = None) -> Batch:
    """Augment images [B, 3, H, W] (on their device; extents [B, 2] of a padded canvas, or None:
    `MultiCropAugmentation.__call__`); draw the iBOT masks and their metadata on the CPU and send
    them over without waiting for the device."""
    crops = aug(images, gen, extents)
    b = images.shape[0]
    masks = sample_masks(2 * b, (masker.height, masker.width), mask_ratio_min_max, mask_probability, masker)
    meta = [to_device_async(t, images.device) for t in mask_metadata(masks)]
    return Batch(crops.global_crops, crops.local_crops, to_device_async(masks.view(2, b, -1), images.device),
                 crops.gram_crops, labels, *meta)


def synthetic_batch(cfg, n_images: int, seed: int = 0, device=None) -> Batch:
    """A reproducible batch of `n_images` synthetic images for `cfg` (tests, benchmarks)."""
    import random

    source = SyntheticShapes(source_image_size(cfg), cfg.train.synthetic_classes, seed)
    images, labels = source.batch(torch.arange(n_images), device)
    masker = global_crop_masker(cfg.crops.global_crops_size, cfg.student.patch_size, random.Random(seed))
    gen = torch.Generator(device=images.device).manual_seed(seed)
    return make_batch(images, labels, MultiCropAugmentation(cfg.crops), gen, masker, cfg.ibot.mask_ratio_min_max,
                      cfg.ibot.mask_sample_probability)
