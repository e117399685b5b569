"""RoPE-attention presets (op "rope_attention") and standalone RoPE presets (op "apply_rope").

Shapes are DINOv3's per-GPU multi-crop batch of 16 images: 2 global crops of 261 tokens (256 px:
256 patches + cls + 4 storage) and 8 local crops of 54 tokens (112 px), the mixed list of both
(one launch for the fused op), and high-resolution crops of 1029 (512 px) and 4101 tokens
(1024 px). ViT-L: 16 heads of 64; ViT-7B: 32 heads of 128. bf16, as trained.

Baselines: DINOv3's path (`rope_attention_ref`: fp32 RoPE with concatenations, then SDPA) with
torch's default SDPA choice ("reference"), then with each SDPA backend forced in turn
("dinov3:flash", "dinov3:cudnn", "dinov3:efficient"; a backend this GPU cannot run at the shape
is left out). FLOPs: 4 B H N^2 Dh forward, 2.5x that for the backward. Where default dispatch
routes training calls to SDPA (crops of N >= SDPA_ROUTE_MIN_TOKENS), "fused:kernels" forces the
Triton kernels, so both are timed.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from dinov3_fast.bench.case import BenchCase
from dinov3_fast.ops.attention import (
    SDPA_ROUTE_MIN_TOKENS, apply_rope, apply_rope_ref, rope_attention, rope_attention_list,
)
from dinov3_fast.ops.attention.reference import rope_attention_list_ref

PREFIX = 5  # cls + 4 storage tokens
MODELS = {"vits": (6, 64), "vitl": (16, 64), "vit7b": (32, 128)}  # name -> (heads, head dim)
# (preset, device, model, crops [(B, N)], dtype)
PRESETS = (
    ("cpu_vits_local", "cpu", "vits", ((8, 54),), torch.float32),
    ("cpu_vits_multicrop", "cpu", "vits", ((4, 261), (16, 54)), torch.float32),
    ("vitl_54tok", "cuda", "vitl", ((128, 54),), torch.bfloat16),
    ("vitl_261tok", "cuda", "vitl", ((32, 261),), torch.bfloat16),
    ("vitl_1029tok", "cuda", "vitl", ((16, 1029),), torch.bfloat16),
    ("vitl_4101tok", "cuda", "vitl", ((4, 4101),), torch.bfloat16),
    ("vitl_multicrop", "cuda", "vitl", ((32, 261), (128, 54)), torch.bfloat16),
    ("vit7b_54tok", "cuda", "vit7b", ((128, 54),), torch.bfloat16),
    ("vit7b_261tok", "cuda", "vit7b", ((32, 261),), torch.bfloat16),
    ("vit7b_1029tok", "cuda", "vit7b", ((16, 1029),), torch.bfloat16),
    ("vit7b_4101tok", "cuda", "vit7b", ((4, 4101),), torch.bfloat16),
    ("vit7b_multicrop", "cuda", "vit7b", ((32, 261), (128, 54)), torch.bfloat16),
    # fp32 tiles, the largest shared-memory footprint (tests/test_triton_compile.py checks it fits an A100),
    # and fp32 at head dim 64, one crop size and a crop list (the AOT check compiles what these launch)
    ("vit7b_1029tok_fp32", "cuda", "vit7b", ((4, 1029),), torch.float32),
    ("vitl_54tok_fp32", "cuda", "vitl", ((128, 54),), torch.float32),
    ("vitl_multicrop_fp32", "cuda", "vitl", ((32, 261), (128, 54)), torch.float32),
)
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def rope_tables(n_patches: int, head_dim: int, device, base: float = 100.0):
    """DINOv3's fp32 (sin, cos) [HW, Dh] for a square grid of n_patches (eval mode: no augmentation)."""
    side = int(n_patches ** 0.5)
    periods = base ** (2 * torch.arange(head_dim // 4, device=device, dtype=torch.float32) / (head_dim // 2))
    c = torch.arange(0.5, side, device=device, dtype=torch.float32) / side
    coords = 2.0 * torch.stack(torch.meshgrid(c, c, indexing="ij"), dim=-1).flatten(0, 1) - 1.0
    angles = (2 * torch.pi * coords[:, :, None] / periods[None, None, :]).flatten(1, 2).tile(2)
    return torch.sin(angles), torch.cos(angles)


def _inputs(heads, head_dim, crops, dtype, device):
    qkvs = tuple(torch.randn(b, n, 3 * heads * head_dim, device=device, dtype=dtype, requires_grad=True)
                 for b, n in crops)
    ropes = [rope_tables(n - PREFIX, head_dim, device) for _, n in crops]
    return qkvs, {"ropes": ropes}


def _sdpa(backend: str | None):
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[backend]))


def _dinov3(heads, sdpa_backend, *qkvs, ropes):
    """DINOv3's attention, per crop, with `sdpa_backend` forced (None: torch's choice): the outputs per crop."""
    with _sdpa(sdpa_backend):
        return rope_attention_list_ref(list(qkvs), ropes, heads)


def _fused(heads, *qkvs, ropes, backend=None):
    """The fused op on one crop (the tensor form) or on a crop list (one launch): the outputs per crop."""
    if len(qkvs) == 1:
        return rope_attention(qkvs[0], ropes[0], num_heads=heads, backend=backend)
    return rope_attention_list(list(qkvs), ropes, num_heads=heads, backend=backend)


@functools.lru_cache(maxsize=None)
def _sdpa_runs(backend: str, head_dim: int, dtype: torch.dtype, n: int) -> bool:
    """Whether forced SDPA backend `backend` runs forward+backward here at this head dim and length."""
    try:
        q = torch.randn(1, 1, n, head_dim, device="cuda", dtype=dtype, requires_grad=True)
        with _sdpa(backend):
            torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
        return True
    except RuntimeError:
        return False


def _attention_cases() -> list[BenchCase]:
    out = []
    for preset, device, model, crops, dtype in PRESETS:
        heads, head_dim = MODELS[model]
        impls = {"reference": functools.partial(_dinov3, heads, None)}
        if device == "cuda":
            for name in SDPA_BACKENDS:
                if not torch.cuda.is_available() or all(_sdpa_runs(name, head_dim, dtype, n) for _, n in crops):
                    impls[f"dinov3:{name}"] = functools.partial(_dinov3, heads, name)
        if device == "cpu":  # default dispatch runs the reference there (measured faster): time our cpu path
            impls["fused:cpu"] = functools.partial(_fused, heads, backend="cpu")
        else:
            impls["fused"] = functools.partial(_fused, heads)
        routed = device == "cuda" and max(n for _, n in crops) >= SDPA_ROUTE_MIN_TOKENS
        if routed:  # default dispatch trains these through SDPA: time the fused kernels too
            impls["fused:kernels"] = functools.partial(_fused, heads, backend="triton")
        elt = torch.finfo(dtype).bits // 8
        flops = sum(4 * b * heads * n * n * head_dim for b, n in crops)
        tokens = sum(b * n for b, n in crops)
        out.append(BenchCase(
            op="rope_attention", preset=preset, device=device,
            make_inputs=functools.partial(_inputs, heads, head_dim, crops, dtype),
            impls=impls, flops=flops, bwd_flops=2.5 * flops,
            bytes=4 * tokens * heads * head_dim * elt,
            note=f"{model} H={heads} Dh={head_dim} crops (B, N)={list(crops)} {str(dtype)[6:]}"
                 + ("; default dispatch trains N >= "
                    f"{SDPA_ROUTE_MIN_TOKENS} through the fused rotation + SDPA, so the fused row's fwd (no "
                    "gradient) is the Triton forward and its fwd+bwd that route (its bwd TFLOP/s mixes the two); "
                    "fused:kernels forces the Triton kernels" if routed else ""),
        ))
    return out


# (preset, device, model, B, N, dtype): q and k as DINOv3 has them, transposed views of the qkv output
ROPE_PRESETS = (
    ("cpu_vits_261tok", "cpu", "vits", 4, 261, torch.float32),
    ("vitl_261tok", "cuda", "vitl", 32, 261, torch.bfloat16),
    ("vit7b_261tok", "cuda", "vit7b", 32, 261, torch.bfloat16),
    ("vitl_261tok_fp32", "cuda", "vitl", 32, 261, torch.float32),
)


def _rope_inputs(heads, head_dim, b, n, dtype, device):
    qkv = torch.randn(b, n, 3, heads, head_dim, device=device, dtype=dtype)
    q, k = (t.transpose(1, 2).requires_grad_() for t in qkv[:, :, :2].unbind(2))
    return (q, k, rope_tables(n - PREFIX, head_dim, device)), {}


def _rope_cases() -> list[BenchCase]:
    out = []
    for preset, device, model, b, n, dtype in ROPE_PRESETS:
        heads, head_dim = MODELS[model]
        elt = torch.finfo(dtype).bits // 8
        out.append(BenchCase(
            op="apply_rope", preset=preset, device=device,
            make_inputs=functools.partial(_rope_inputs, heads, head_dim, b, n, dtype),
            impls={"reference": apply_rope_ref,  # (q_rot, k_rot): the runner back-propagates both
                   # on the CPU default dispatch runs the reference: time our cpu path there
                   **({"fused:cpu": functools.partial(apply_rope, backend="cpu")}
                      if device == "cpu" else {"fused": apply_rope})},
            bytes=4 * b * heads * n * head_dim * elt,
            note=f"{model} q, k [B={b}, H={heads}, N={n}, Dh={head_dim}] {str(dtype)[6:]} (strided views)",
        ))
    return out


def cases() -> list[BenchCase]:
    return _attention_cases() + _rope_cases()
