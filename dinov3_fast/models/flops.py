"""Parameter and FLOP counts for the trainer's MFU figure.

`count_params` counts a module's parameters (meta tensors included, so any size can be counted
without memory). `flops_per_image` counts the backbone's forward matmul FLOPs (2 per multiply-add)
for one image seen through a list of crops: patch embedding, qkv, attention (q k^T and p v),
proj and FFN per block. Norms, softmax, RoPE and elementwise work are left out, as MFU
conventions do. A training step costs about 3x the forward (forward + backward); under
stochastic depth a block's branches run on a subset of the images (`block_keep_fraction`), and
only what runs is counted.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from dinov3_fast.models.ffn import ffn_hidden_size
from dinov3_fast.models.vision_transformer import ARCHS, PRESETS, DinoVisionTransformer, build_model


def count_params(model: nn.Module | str, *, trainable_only: bool = False, **overrides: Any) -> int:
    """Number of parameter elements of `model`, or of the model `build_model(name, **overrides)`
    would give (built on the meta device). Buffers (rope periods, bias masks) are not counted."""
    if isinstance(model, str):
        model = build_model(model, device="meta", **overrides)
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _shape(arch: DinoVisionTransformer | str, overrides: dict[str, Any]) -> dict[str, Any]:
    if isinstance(arch, DinoVisionTransformer):
        return dict(D=arch.embed_dim, depth=arch.n_blocks, prefix=1 + arch.n_storage_tokens,
                    patch=arch.patch_embed.patch_size, chans=arch.patch_embed.in_chans,
                    ffn=arch.ffn_layer_name,
                    hidden=ffn_hidden_size(arch.ffn_layer_name, arch.embed_dim, arch.ffn_ratio))
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a DinoVisionTransformer or a model name, got {type(arch).__name__}")
    if arch in PRESETS:
        cfg = {**PRESETS[arch], **overrides}
        cfg = {**ARCHS[cfg.pop("arch")], **cfg}
    elif arch in ARCHS:
        cfg = {**ARCHS[arch], **overrides}
    else:
        raise ValueError(f"unknown model {arch!r}; choose from {sorted(ARCHS) + sorted(PRESETS)}")
    patch = cfg.get("patch_size", 16)
    ffn = cfg.get("ffn_layer", "mlp")
    return dict(D=cfg["embed_dim"], depth=cfg["depth"], prefix=1 + cfg.get("n_storage_tokens", 0),
                patch=(patch, patch), chans=cfg.get("in_chans", 3), ffn=ffn,
                hidden=ffn_hidden_size(ffn, cfg["embed_dim"], cfg["ffn_ratio"]))


def flops_per_image(arch: DinoVisionTransformer | str, crop_sizes: Iterable[int | Sequence[int]],
                    branch_fraction: float = 1.0, **overrides: Any) -> float:
    """Forward FLOPs of the backbone for one image seen as `crop_sizes`.

    Args:
        arch: a model, or a name accepted by `build_model` (with `overrides`).
        crop_sizes: one entry per crop of the image, in pixels: an int (square) or (height, width);
            e.g. DINOv3's 7B recipe [256, 256] + [112] * 8.
        branch_fraction: the fraction of the images each block's attention and FFN branches run
            on: 1 in eval; under stochastic depth in training, the kept subset (`block_keep_fraction`).
    Returns:
        FLOPs; multiply by 3 for forward + backward.
    """
    s = _shape(arch, overrides)
    d, ph, pw = s["D"], *s["patch"]
    ffn_mats = 2 if s["ffn"] == "mlp" else 3
    total = 0
    for size in crop_sizes:
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if h % ph or w % pw:
            raise ValueError(f"crop size {h}x{w} is not divisible by the patch size {ph}x{pw}")
        hw = (h // ph) * (w // pw)
        n = s["prefix"] + hw
        per_block = (2 * n * d * 3 * d          # qkv
                     + 2 * 2 * n * n * d        # q k^T and p v over all heads
                     + 2 * n * d * d            # proj
                     + 2 * n * d * s["hidden"] * ffn_mats)
        total += 2 * hw * s["chans"] * ph * pw * d + s["depth"] * per_block * branch_fraction
    return total


def block_keep_fraction(batch: int, drop_path_rate: float) -> float:
    """The fraction of a crop group's `batch` images that a training block's branches run on:
    stochastic depth runs each branch on max(int(batch * (1 - rate)), 1) of them (`block.py`)."""
    if drop_path_rate <= 0.0:
        return 1.0
    return max(int(batch * (1 - drop_path_rate)), 1) / batch


def meta_model(name: str, **overrides: Any) -> DinoVisionTransformer:
    """`build_model(name, device="meta", ...)`: the structure without memory."""
    with torch.device("meta"):
        return build_model(name, device="meta", **overrides)
