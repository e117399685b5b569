"""iBOT block masking with DINOv3's per-image mask ratios (dinov3/data/masking.py, collate.py).

Per rank, of the 2B global crops int(2B * mask_sample_probability) are masked; the i-th of them
gets int(HW * r_{i+1}) patches, with r = linspace(min, max, n_masked + 1): the top of its band of
[min, max], no random draw (DINOv3's collate; DINOv2's drew U(r_i, r_{i+1})). The counts are
therefore a function of the config (`mask_counts`); the list is shuffled. Each mask is grown from
random rectangles (area in [4, max patches], log-uniform aspect in [0.3, 1/0.3]) and completed
with random single patches to the exact count, DINOv3's `MaskingGenerator`.

The generator owns its random state (a `random.Random`), so a checkpoint can save and restore it.
Masks are drawn on the host with numpy, as DINOv3 does: the rectangle loop runs per masked crop
and step, and torch's per-op overhead on tiny tensors made it ~4x slower (ViT-L batch 128, 14 x 14
patches, on the 2-core CI machine: 31 ms of host time per step with torch ops, 8.5 ms with numpy;
the same masks from the same random state).
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch


class MaskingGenerator:
    """DINOv3's block-mask generator for an (H, W) patch grid.

    __call__(num_masking_patches) -> bool [H, W] with exactly that many True entries.
    """

    def __init__(self, input_size: tuple[int, int], max_num_patches: float | None = None, min_num_patches: int = 4,
                 min_aspect: float = 0.3, max_aspect: float | None = None, rng: random.Random | None = None) -> None:
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.rng = rng or random.Random()

    def _mask(self, mask: np.ndarray, max_mask_patches: float) -> int:
        delta = 0
        for _ in range(10):
            target_area = self.rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            if w < self.width and h < self.height:
                top = self.rng.randint(0, self.height - h)
                left = self.rng.randint(0, self.width - w)
                block = mask[top: top + h, left: left + w]
                num_masked = int(block.sum())
                if 0 < h * w - num_masked <= max_mask_patches:
                    delta += h * w - num_masked
                    block[...] = True
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches: int = 0) -> torch.Tensor:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            delta = self._mask(mask, min(num_masking_patches - count, self.max_num_patches))
            if delta == 0:
                break
            count += delta
        flat = mask.reshape(-1)  # a view; complete with random single patches to the exact count
        missing = num_masking_patches - int(flat.sum())
        if missing > 0:
            flat[self.rng.sample(np.flatnonzero(~flat).tolist(), missing)] = True
        return torch.from_numpy(mask)


def dinov3_max_num_patches(crop_size: int, patch_size: int) -> float:
    """The generator's `max_num_patches` as DINOv3's train.py passes it: the expression
    `0.5 * img_size // patch_size * img_size // patch_size`, evaluated left to right,
    ((0.5 * S) // p * S) // p. It is half the grid for an even grid side and less for an odd one
    (S = 112, p = 16: 21.0, not 24.5)."""
    return ((0.5 * crop_size) // patch_size * crop_size) // patch_size


def global_crop_masker(crop_size: int, patch_size: int, rng: random.Random) -> MaskingGenerator:
    """DINOv3's iBOT mask generator for global crops of `crop_size` px: the (grid, grid) patch grid,
    train.py's `max_num_patches`, and its own random source `rng` (which a checkpoint restores)."""
    grid = crop_size // patch_size
    return MaskingGenerator((grid, grid), max_num_patches=dinov3_max_num_patches(crop_size, patch_size), rng=rng)


def mask_counts(n_images: int, n_tokens: int, mask_ratio_min_max: tuple[float, float],
                mask_probability: float) -> list[int]:
    """Masked patches per masked image, DINOv3's collate: int(n_images * mask_probability) images,
    the i-th with int(n_tokens * r[i + 1]), r = linspace(min, max, n_masked + 1) (in torch's
    default dtype, as DINOv3 computes it). The other images get no masked patch."""
    n_masked = int(n_images * mask_probability)
    ratios = torch.linspace(*mask_ratio_min_max, n_masked + 1)[1:]
    return (n_tokens * ratios).long().tolist()


def sample_masks(n_images: int, grid: tuple[int, int], mask_ratio_min_max: tuple[float, float],
                 mask_probability: float, generator: MaskingGenerator) -> torch.Tensor:
    """DINOv3's collate-time masks for `n_images` global crops: bool [n_images, H*W], the
    `mask_counts` masked images and the unmasked rest in a shuffled order.

    A rank can get no masked patch at all: when int(n_images * mask_probability) == 0, or when
    every count int(H*W * r) is 0 (mask_ratio_min_max[1] < 1 / (H*W)). The iBOT path handles it
    (an empty Sinkhorn input that still joins the all-reduces, a zero iBOT loss with zero head
    gradients)."""
    counts = mask_counts(n_images, grid[0] * grid[1], mask_ratio_min_max, mask_probability)
    masks = [generator(n) for n in counts] + [generator(0) for _ in range(len(counts), n_images)]
    generator.rng.shuffle(masks)
    return torch.stack(masks).flatten(1)


def mask_metadata(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From bool masks [N, HW]: (mask_indices_list [M] into the flattened [N*HW] tokens,
    masks_weight [M] = 1 / (masked tokens of that image), n_masked_patches [1])."""
    indices = masks.flatten().nonzero().flatten()
    weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    return indices, weight, torch.full((1,), indices.shape[0], dtype=torch.long, device=masks.device)
