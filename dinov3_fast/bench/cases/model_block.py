"""One DINOv3 ViT block, fused ops vs reference ops (op "vit_block", `dinov3-fast bench --model`).

Both implementations are the same `SelfAttentionBlock` with the same weights; only the attention
backend differs: "reference" is DINOv3's path (split qkv, fp32 RoPE with concatenations, SDPA),
"fused" is the fused RoPE attention op (default backend). Norms, LayerScale and the FFN are plain
PyTorch in both. Weights are in the input dtype (FSDP2's bf16 param dtype on GPU); the block is in
training mode with the published drop path rate (0), so forward+backward is a training step's
work for one block (weight gradients included).
Presets: the 261-token global crop (256 px: 256 patches + cls + 4 storage), B = 2 global crops
per image of DINOv3's per-GPU batch, and DINOv3's multi-crop list (2 global + 8 local, 54 tokens).
"""
from __future__ import annotations

import functools

import torch

from dinov3_fast.bench.case import BenchCase
from dinov3_fast.models.ffn import ffn_hidden_size
from dinov3_fast.models.vision_transformer import ARCHS, PRESETS as MODEL_PRESETS, build_model

# (preset, device, model name, images, crops [(count per image, px)], dtype)
PRESETS = (
    ("cpu_vits_local", "cpu", "dinov3_vits16", 2, ((1, 112),), torch.float32),
    ("vitl_261tok", "cuda", "dinov3_vitl16", 32, ((2, 256),), torch.bfloat16),
    ("vitl_multicrop", "cuda", "dinov3_vitl16", 32, ((2, 256), (8, 112)), torch.bfloat16),
    ("vit7b_261tok", "cuda", "dinov3_vit7b16", 16, ((2, 256),), torch.bfloat16),
)


def _device_key(device) -> str:
    """One name per device ("cuda" and "cuda:0" are the same GPU), so every caller of `_blocks`
    gets the same cached block."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


@functools.lru_cache(maxsize=None)
def _blocks(name: str, dtype: torch.dtype, device: str):
    """The block of `name` (depth 1) on `device` (a `_device_key`), and its RoPE module; shared by
    both impls."""
    model = build_model(name, depth=1, device="meta")
    model.to_empty(device=device)
    model.init_weights()
    block = model.blocks[0].to(dtype).train()
    return block, model.rope_embed.eval()


def _inputs(name, images, crops, dtype, device):
    block, rope = _blocks(name, dtype, _device_key(device))
    d, prefix, p = block.norm1.normalized_shape[0], 1 + 4, 16
    xs, ropes = [], []
    for count, px in crops:
        g = px // p
        xs.append(torch.randn(count * images, prefix + g * g, d, device=device, dtype=dtype, requires_grad=True))
        ropes.append(rope(H=g, W=g))
    return (xs, ropes), {}


def _run(name, dtype, backend, xs, ropes):
    """The block's outputs per crop."""
    block, _ = _blocks(name, dtype, _device_key(xs[0].device))
    block.attn.backend = backend
    return block(xs, ropes)


def _parameters(name, dtype, device) -> list[torch.Tensor]:
    """The block's weights: their gradients are cleared between runs like the inputs'."""
    return list(_blocks(name, dtype, _device_key(device))[0].parameters())


def _flops(name: str, images: int, crops) -> int:
    """Forward matmul FLOPs of the block per crop of N tokens: qkv + proj (8 N D^2), attention
    (4 N^2 D), FFN (2 N D hidden per matrix: 2 for the MLP, 3 for SwiGLU)."""
    arch = MODEL_PRESETS[name]
    shape = ARCHS[arch["arch"]]
    d = shape["embed_dim"]
    hidden = ffn_hidden_size(arch["ffn_layer"], d, arch.get("ffn_ratio", shape["ffn_ratio"]))
    mats = 2 if arch["ffn_layer"] == "mlp" else 3
    total = 0
    for count, px in crops:
        b, n = count * images, 5 + (px // 16) ** 2
        total += b * (2 * n * d * 4 * d + 4 * n * n * d + 2 * n * d * hidden * mats)
    return total


def cases() -> list[BenchCase]:
    out = []
    for preset, device, name, images, crops, dtype in PRESETS:
        out.append(BenchCase(
            op="vit_block", preset=preset, device=device,
            make_inputs=functools.partial(_inputs, name, images, crops, dtype),
            impls={"reference": functools.partial(_run, name, dtype, "reference"),
                   "fused": functools.partial(_run, name, dtype, None)},
            parameters=functools.partial(_parameters, name, dtype),
            flops=_flops(name, images, crops), bytes=None,
            note=f"{name} block, {images} images x " + " + ".join(f"{c}x{px}px" for c, px in crops)
                 + f", {str(dtype)[6:]}",
            tags=("model",),
        ))
    return out
