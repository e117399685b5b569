"""Fused RoPE attention for DINOv3 ViTs: checks, backend dispatch, custom ops, autograd, and the
public functions `rope_attention`, `rope_attention_list` and `apply_rope`.

DINOv3's attention (dinov3/layers/attention.py) splits the packed qkv Linear output, rotates the
patch tokens of q and k in fp32 (rotate-half RoPE, prefix tokens untouched), casts back, runs SDPA
and transposes the result back. Every backend here reads the packed qkv [B, N, 3C] as it is,
rotates q and k on the fly and writes [B, N, C] for the proj Linear; the backward writes the
packed gradient [B, N, 3C] with the transposed rotation already applied to dq and dk. Crops of
different sizes (global and local) run in one launch through the packed (variable-length) layout
documented in cpu.py. RoPE tables are treated as constants (DINOv3 computes them from a
non-trainable buffer): no gradient flows to sin and cos except on the `reference` backend, and
the other backends refuse tables that require grad (in grad mode) rather than drop their gradient.

Precision of the rotation: the fused backends rotate in fp32 (fp64 for fp64 inputs on cpu) whatever
the tables' dtype; the reference, as DINOv3's apply_rope, casts q and k to the tables' dtype and
rotates in it. With tables of qkv's precision or higher (fp32 tables, as DINOv3's published
backbones use) the two agree to qkv's tolerance. With tables in a lower precision than qkv (bf16 tables, fp32 qkv) the
effective input precision is the lowest of the two: the backends then agree with the reference
to the tables' dtype tolerance (1e-2 for bf16), and the fused result is the more accurate one.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dinov3_fast.ops._common import compute_dtype, op_context
from dinov3_fast.ops._dispatch import (
    check_floating, check_no_double_backward, check_nonempty, check_positive_int, check_rank, check_same_device,
    dispatch_device_type, forced_by_env, select_backend,
)
from dinov3_fast.ops.attention.cpu import apply_rope_cpu, rope_attention_bwd_cpu, rope_attention_fwd_cpu
from dinov3_fast.ops.attention.reference import (
    Rope, apply_rope_ref, rope_attention_list_ref, rope_attention_ref,
)

__all__ = ["apply_rope", "apply_rope_ref", "rope_attention", "rope_attention_list", "rope_attention_ref"]

# Fastest first, per device type (see docs/architecture.md). `reference` is always the fallback.
# On CPU the reference (torch's SDPA, which never forms N x N scores) measured faster and leaner
# than our explicit cpu path (bench cpu_vits_*, fused:cpu: 0.59-0.61x, 1.8-2.9x the memory), so
# it is the default there; `backend="cpu"` or "triton" (interpreter) remain selectable.
PREFERENCE = {"cuda": ("triton",), "cpu": ("reference", "cpu", "triton")}
TRITON_HEAD_DIMS = (32, 64, 128)  # attention: Dh / 2 >= 16 for the tensor-core halves
ROPE_HEAD_DIMS = (4, 8, 16, 32, 64, 128, 256)  # standalone RoPE: power-of-two halves
# Long sequences with a gradient to compute: the fused rotation, then torch's SDPA (cuDNN, flash).
# On an H100 (2026-11-26) the fused backward ran at 67 TFLOP/s at N = 4101 against cuDNN's ~276,
# so fwd+bwd was 0.79-0.89x the DINOv3 path at N = 1029 and 0.33x at 4101 (1.8-2.0x at 261); the
# fused forward alone was 2.1x / 0.9-1.1x, so forward-only calls (the teachers) stay fused. Any
# threshold in (261, 1029] splits DINOv3's crop sizes the same way. Default dispatch only.
SDPA_ROUTE_MIN_TOKENS = 1024
SDPA_ROUTE_DEVICES = ("cuda",)


def _triton():
    from dinov3_fast.ops.attention import triton as attn_triton  # imported lazily: triton is optional
    return attn_triton


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("dinov3_fast::rope_attention_fwd", mutates_args=())
def _rope_attention_fwd(qkv: torch.Tensor, sin: torch.Tensor | None, cos: torch.Tensor | None,
                        seqinfo: torch.Tensor | None, num_heads: int, max_len: int,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _triton().rope_attention_fwd_triton if backend == "triton" else rope_attention_fwd_cpu
    with op_context(qkv):
        return impl(qkv, sin, cos, seqinfo, num_heads, max_len)


@_rope_attention_fwd.register_fake
def _(qkv, sin, cos, seqinfo, num_heads, max_len, backend):
    T, C = qkv.shape[0], qkv.shape[1] // 3
    return qkv.new_empty(T, C), qkv.new_empty(num_heads, T, dtype=compute_dtype(qkv))


@torch.library.custom_op("dinov3_fast::rope_attention_bwd", mutates_args=())
def _rope_attention_bwd(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                        sin: torch.Tensor | None, cos: torch.Tensor | None, seqinfo: torch.Tensor | None,
                        num_heads: int, max_len: int, backend: str) -> torch.Tensor:
    impl = _triton().rope_attention_bwd_triton if backend == "triton" else rope_attention_bwd_cpu
    with op_context(qkv):
        return impl(dout, qkv, out, lse, sin, cos, seqinfo, num_heads, max_len)


@_rope_attention_bwd.register_fake
def _(dout, qkv, out, lse, sin, cos, seqinfo, num_heads, max_len, backend):
    return qkv.new_empty(qkv.shape)


def _attn_setup_context(ctx, inputs, output):
    qkv, sin, cos, seqinfo, num_heads, max_len, backend = inputs
    ctx.save_for_backward(qkv, output[0], output[1], sin, cos, seqinfo)
    ctx.options = (num_heads, max_len, backend)


def _attn_backward(ctx, grad_out, _grad_lse):
    check_no_double_backward("rope_attention")
    qkv, out, lse, sin, cos, seqinfo = ctx.saved_tensors
    dqkv = _rope_attention_bwd(grad_out, qkv, out, lse, sin, cos, seqinfo, *ctx.options)
    return dqkv, None, None, None, None, None, None


_rope_attention_fwd.register_autograd(_attn_backward, setup_context=_attn_setup_context)


@torch.library.custom_op("dinov3_fast::apply_rope_fwd", mutates_args=())
def _apply_rope_fwd(q: torch.Tensor, k: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _triton().apply_rope_triton if backend == "triton" else apply_rope_cpu
    with op_context(q):
        return impl(q, k, sin, cos, False)


@_apply_rope_fwd.register_fake
def _(q, k, sin, cos, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format)


@torch.library.custom_op("dinov3_fast::apply_rope_bwd", mutates_args=())
def _apply_rope_bwd(grad_q: torch.Tensor, grad_k: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _triton().apply_rope_triton if backend == "triton" else apply_rope_cpu
    with op_context(grad_q):
        return impl(grad_q, grad_k, sin, cos, True)


@_apply_rope_bwd.register_fake
def _(grad_q, grad_k, sin, cos, backend):
    return torch.empty_like(grad_q, memory_format=torch.contiguous_format), torch.empty_like(
        grad_k, memory_format=torch.contiguous_format)


def _rope_setup_context(ctx, inputs, output):
    _, _, sin, cos, backend = inputs
    ctx.save_for_backward(sin, cos)
    ctx.backend = backend


def _rope_backward(ctx, grad_q, grad_k):
    check_no_double_backward("apply_rope")
    sin, cos = ctx.saved_tensors
    dq, dk = _apply_rope_bwd(grad_q, grad_k, sin, cos, ctx.backend)
    return dq, dk, None, None, None


_apply_rope_fwd.register_autograd(_rope_backward, setup_context=_rope_setup_context)


# ----------------------------------------------------------------------------- checks

def _check_qkv(name: str, qkv: torch.Tensor, num_heads: int) -> int:
    """Validate a [B, N, 3C] (or packed [T, 3C]) qkv tensor; returns the head dim."""
    check_floating(name, qkv)
    check_nonempty(name, qkv)
    check_positive_int("num_heads", num_heads)
    if qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"{name} last dim must be divisible by 3 * num_heads = {3 * num_heads}, "
                         f"got {qkv.shape[-1]} (shape {tuple(qkv.shape)})")
    return qkv.shape[-1] // (3 * num_heads)


def _check_rope(name: str, rope, like: torch.Tensor, n: int, head_dim: int, num_prefix_tokens: int | None,
                backend: str, like_name: str = "qkv") -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Validate rope = (sin, cos), each [HW, head_dim], against n tokens for `backend` and the
    device of the caller's argument `like_name` (`like`); returns (sin, cos)."""
    if rope is None:
        return None, None
    if not isinstance(rope, (tuple, list)) or len(rope) != 2:
        raise TypeError(f"{name} must be a (sin, cos) pair of [HW, head_dim] tensors or None, got {type(rope).__name__}")
    sin, cos = rope
    check_floating(f"{name} sin", sin)
    check_floating(f"{name} cos", cos)
    check_rank(f"{name} sin", sin, 2, f"[HW, head_dim={head_dim}]")
    if cos.shape != sin.shape:
        raise ValueError(f"{name} sin and cos must have the same shape, got {tuple(sin.shape)} and {tuple(cos.shape)}")
    check_same_device(f"{name} sin", sin, like_name, like)
    check_same_device(f"{name} cos", cos, like_name, like)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotate-half RoPE, got {head_dim}")
    hw, dh = sin.shape
    if dh != head_dim:
        raise ValueError(f"{name} last dim must equal head_dim = {head_dim}, got shape {tuple(sin.shape)}")
    if hw > n:
        raise ValueError(f"{name} has HW = {hw} rows but the sequence has only N = {n} tokens; "
                         f"rope applies to the last HW tokens, so HW <= N is required")
    if num_prefix_tokens is not None and n - hw != num_prefix_tokens:
        raise ValueError(f"num_prefix_tokens = {num_prefix_tokens} but N - HW = {n} - {hw} = {n - hw}")
    if backend != "reference" and torch.is_grad_enabled() and (sin.requires_grad or cos.requires_grad):
        raise ValueError(f"{name} sin/cos require grad, but the {backend} backend treats the RoPE tables as "
                         f"constants and gives them no gradient; use backend='reference' for gradients "
                         f"w.r.t. {name}, or pass detached tables")
    return sin, cos


def _select(op: str, t: torch.Tensor, head_dim: int, backend: str | None,
            head_dims: Sequence[int] = TRITON_HEAD_DIMS) -> str:
    chosen = select_backend(op, t.device, backend, PREFERENCE)
    if chosen != "triton":
        return chosen
    if t.dtype == torch.float64 or head_dim not in head_dims:
        if backend == "triton":
            raise ValueError(f"{op}: the triton backend needs float32/float16/bfloat16 and head_dim in "
                             f"{tuple(head_dims)}, got {t.dtype} and head_dim {head_dim}")
        return "cpu" if t.device.type == "cpu" else "reference"
    return chosen


# ----------------------------------------------------------------------------- long sequences

def _may_route_to_sdpa(qkv: torch.Tensor, backend: str | None) -> bool:
    """Whether sequences of at least SDPA_ROUTE_MIN_TOKENS in this call go to `_rope_then_sdpa`:
    default dispatch (no `backend=`, and no DINOV3_FAST_BACKEND naming a backend this op has for
    the device), a device in SDPA_ROUTE_DEVICES, and a gradient to compute."""
    return (backend is None and forced_by_env(qkv.device, PREFERENCE) is None
            and dispatch_device_type(qkv.device) in SDPA_ROUTE_DEVICES  # the planner's simulated GPU too
            and qkv.requires_grad and torch.is_grad_enabled())


def _rope_then_sdpa(qkv: torch.Tensor, sin: torch.Tensor | None, cos: torch.Tensor | None,
                    num_heads: int) -> torch.Tensor:
    """[B, N, 3C] -> [B, N, C]: `apply_rope` (fp32 rotation, the fused kernel on a GPU) on q and k,
    then torch's SDPA, whose backward is the fast one at long N. The same numbers as DINOv3's
    path with an fp32 rope; keeps the rotated q and k for the backward, as DINOv3's path does."""
    B, N, three_c = qkv.shape
    q, k, v = qkv.view(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, Dh] each
    if sin is not None:
        q, k = apply_rope(q, k, (sin, cos))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, three_c // 3)


# ----------------------------------------------------------------------------- public API

def rope_attention(qkv: torch.Tensor, rope: Rope | None, *, num_heads: int,
                   num_prefix_tokens: int | None = None, backend: str | None = None) -> torch.Tensor:
    """softmax(rot(q) rot(k)^T / sqrt(Dh)) v for the packed qkv of one crop size, as DINOv3 computes it.

    Args:
        qkv: [B, N, 3 * H * Dh], the qkv Linear output (viewed as [B, N, 3, H, Dh]); fp32/fp16/bf16
            (fp64 on the cpu and reference backends).
        rope: (sin, cos), each [HW, Dh] with HW <= N, applied (rotate-half, in fp32) to the last HW
            tokens of q and k; the first N - HW (prefix) tokens are not rotated. None: no rotation.
            The reference rotates in the tables' dtype (DINOv3's rule): with tables less precise
            than qkv, backends agree to the tables' dtype tolerance (module docstring). Constants:
            tables requiring grad need backend="reference".
        num_heads: H.
        num_prefix_tokens: if given, checked to equal N - HW.
        backend: force "triton", "cpu" or "reference"; default: fastest available for the device,
            and on a GPU, for N >= SDPA_ROUTE_MIN_TOKENS with a gradient to compute, the fused
            rotation followed by torch's SDPA (its backward is the faster one there).

    Returns:
        [B, N, H * Dh] in qkv's dtype, ready for the proj Linear.
    """
    check_rank("qkv", qkv, 3, "[B, N, 3 * num_heads * head_dim]")
    head_dim = _check_qkv("qkv", qkv, num_heads)
    B, N, three_c = qkv.shape
    chosen = _select("rope_attention", qkv, head_dim, backend)
    sin, cos = _check_rope("rope", rope, qkv, N, head_dim, num_prefix_tokens, chosen)
    if N >= SDPA_ROUTE_MIN_TOKENS and _may_route_to_sdpa(qkv, backend):
        return _rope_then_sdpa(qkv, sin, cos, num_heads)
    if chosen == "reference":
        return rope_attention_ref(qkv, rope, num_heads)
    out, _ = _rope_attention_fwd(qkv.reshape(B * N, three_c), sin, cos, None, num_heads, N, chosen)
    return out.view(B, N, three_c // 3)


def rope_attention_list(qkv_list: Sequence[torch.Tensor], rope_list: Sequence[Rope | None] | None, *,
                        num_heads: int, num_prefix_tokens: int | None = None,
                        backend: str | None = None) -> list[torch.Tensor]:
    """`rope_attention` for several crop sizes (DINOv3's forward_list), all in one kernel launch
    (when training on a GPU, crops of N >= SDPA_ROUTE_MIN_TOKENS go through the rotation + SDPA
    instead, see `rope_attention_packed`).

    Args:
        qkv_list: crops [B_i, N_i, 3 * H * Dh], same H * Dh and dtype.
        rope_list: one (sin, cos) pair ([HW_i, Dh] each) or None per crop; None for no rotation.
        num_heads, num_prefix_tokens, backend: as for `rope_attention`.

    Returns:
        [B_i, N_i, H * Dh] per crop.
    """
    if not isinstance(qkv_list, (list, tuple)) or not qkv_list:
        raise TypeError(f"qkv_list must be a non-empty list of [B, N, 3C] tensors, got {type(qkv_list).__name__}")
    for i, qkv in enumerate(qkv_list):
        check_floating(f"qkv_list[{i}]", qkv)
        check_rank(f"qkv_list[{i}]", qkv, 3, "[B, N, 3 * num_heads * head_dim]")
        check_same_device(f"qkv_list[{i}]", qkv, "qkv_list[0]", qkv_list[0])
        if qkv.shape[-1] != qkv_list[0].shape[-1] or qkv.dtype != qkv_list[0].dtype:
            raise ValueError(f"qkv_list[{i}] must match qkv_list[0] in last dim and dtype, got "
                             f"{tuple(qkv.shape)} {qkv.dtype} vs {tuple(qkv_list[0].shape)} {qkv_list[0].dtype}")
    crops = [(qkv.shape[0], qkv.shape[1]) for qkv in qkv_list]
    three_c = qkv_list[0].shape[-1]
    flat = torch.cat([qkv.reshape(-1, three_c) for qkv in qkv_list]) if len(qkv_list) > 1 else \
        qkv_list[0].reshape(-1, three_c)
    out = rope_attention_packed(flat, crops, rope_list, num_heads=num_heads,
                                num_prefix_tokens=num_prefix_tokens, backend=backend)
    return [o.view(b, n, three_c // 3) for o, (b, n) in zip(out.split([b * n for b, n in crops]), crops)]


def _build_sequence_table(layout: tuple[tuple[int, int, int], ...], device: torch.device) -> torch.Tensor:
    """int32 [sum_i B_i, 4], one row per sequence: (first token, tokens, first rope row, rope rows),
    from the crops' (B_i, N_i, HW_i) in packing order."""
    rows, tok, r0 = [], 0, 0
    for b, n, hw in layout:
        rows += [(tok + i * n, n, r0, hw) for i in range(b)]
        tok, r0 = tok + b * n, r0 + hw
    return torch.tensor(rows, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=64)
def _cached_sequence_table(layout: tuple[tuple[int, int, int], ...], device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # a table first made under inference mode must serve autograd later
        return _build_sequence_table(layout, device)


def _sequence_table(layout: tuple[tuple[int, int, int], ...], like: torch.Tensor) -> torch.Tensor:
    """The sequence table of a crop layout on `like`'s device, built once per (layout, device) for
    plain tensors in eager mode: a fresh one per call is a copy from pageable host memory, which
    makes the host wait for the GPU in every attention call (the host could no longer run ahead
    of the kernels), and cannot be captured in a CUDA graph. Traced, it is built in the graph,
    where Inductor makes it a constant; for tensor subclasses (fake, functional) it is built
    per call, so no such tensor is ever cached."""
    if torch.compiler.is_compiling() or type(like) is not torch.Tensor:
        return _build_sequence_table(layout, like.device)
    return _cached_sequence_table(layout, like.device)


def rope_attention_packed(qkv: torch.Tensor, crops: Sequence[tuple[int, int]], rope_list, *, num_heads: int,
                          num_prefix_tokens: int | None = None, backend: str | None = None) -> torch.Tensor:
    """The list form on tokens already packed back to back: qkv [sum B_i N_i, 3C] -> [sum B_i N_i, C].

    `crops` lists (B_i, N_i) in packing order (crop 0's B_0 sequences first); this is the layout of
    DINOv3's forward_list, which runs the qkv Linear on the concatenated tokens of all crops. With
    default dispatch on a GPU and a gradient to compute, crops of N_i >= SDPA_ROUTE_MIN_TOKENS go
    through the fused rotation + SDPA one by one and the others keep one fused launch.
    """
    check_rank("qkv", qkv, 2, "[sum_i B_i * N_i, 3 * num_heads * head_dim]")
    head_dim = _check_qkv("qkv", qkv, num_heads)
    rope_list = [None] * len(crops) if rope_list is None else list(rope_list)
    if len(rope_list) != len(crops):
        raise ValueError(f"rope_list must have one entry per crop ({len(crops)}), got {len(rope_list)}")
    if any(b < 1 or n < 1 for b, n in crops):
        raise ValueError(f"every crop needs B >= 1 sequences of N >= 1 tokens, got crops {list(crops)}")
    if sum(b * n for b, n in crops) != qkv.shape[0]:
        raise ValueError(f"crops {list(crops)} hold {sum(b * n for b, n in crops)} tokens but qkv has {qkv.shape[0]}")
    chosen = _select("rope_attention_list", qkv, head_dim, backend)
    tables = [_check_rope(f"rope_list[{i}]", r, qkv, n, head_dim, num_prefix_tokens, chosen)
              for i, (r, (_, n)) in enumerate(zip(rope_list, crops))]
    routed = [n >= SDPA_ROUTE_MIN_TOKENS for _, n in crops] if _may_route_to_sdpa(qkv, backend) else []
    if any(routed):
        return _packed_with_long_crops_routed(qkv, crops, tables, rope_list, routed, num_heads, chosen)
    return _packed(qkv, crops, tables, rope_list, num_heads, chosen)


def _packed(qkv: torch.Tensor, crops: Sequence[tuple[int, int]], tables, rope_list, num_heads: int,
            chosen: str) -> torch.Tensor:
    """`rope_attention_packed` on backend `chosen`, once its arguments are checked: one fused launch,
    or the per-crop reference."""
    if chosen == "reference":
        parts = qkv.split([b * n for b, n in crops])
        outs = rope_attention_list_ref([p.view(b, n, qkv.shape[-1]) for p, (b, n) in zip(parts, crops)], rope_list,
                                       num_heads)
        return torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])
    layout = tuple((b, n, 0 if sin is None else sin.shape[0]) for (b, n), (sin, _) in zip(crops, tables))
    seqinfo = _sequence_table(layout, qkv)
    present = [t for t in tables if t[0] is not None]
    sin = torch.cat([t[0] for t in present]) if present else None
    cos = torch.cat([t[1] for t in present]) if present else None
    out, _ = _rope_attention_fwd(qkv, sin, cos, seqinfo, num_heads, max(n for _, n in crops), chosen)
    return out


def _packed_with_long_crops_routed(qkv, crops, tables, rope_list, routed: Sequence[bool], num_heads: int,
                                   chosen: str) -> torch.Tensor:
    """The long crops (routed[i]) through `_rope_then_sdpa` one by one, the others in one `_packed`
    launch on backend `chosen` on their concatenated tokens; outputs back in packing order."""
    parts = list(qkv.split([b * n for b, n in crops]))
    three_c = qkv.shape[-1]
    outs = [_rope_then_sdpa(part.view(b, n, three_c), *table, num_heads).reshape(b * n, three_c // 3)
            if long_ else None for part, (b, n), table, long_ in zip(parts, crops, tables, routed)]
    short = [i for i, long_ in enumerate(routed) if not long_]
    if short:
        packed = torch.cat([parts[i] for i in short])
        out = _packed(packed, [crops[i] for i in short], [tables[i] for i in short],
                      [rope_list[i] for i in short], num_heads, chosen)
        for i, o in zip(short, out.split([crops[i][0] * crops[i][1] for i in short])):
            outs[i] = o
    return torch.cat(outs)


def apply_rope(q: torch.Tensor, k: torch.Tensor, rope: Rope, *,
               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv3's `SelfAttention.apply_rope`, fused: rotate the last HW tokens of q and k in fp32.

    Args:
        q, k: [B, H, N, Dh] (any strides), same shape.
        rope: (sin, cos), each [HW, Dh] with HW <= N. The reference rotates in the tables' dtype
            (DINOv3's rule), the fused backends in fp32: with tables less precise than q and k,
            they agree to the tables' dtype tolerance (module docstring). Constants: tables
            requiring grad need backend="reference".
        backend: force "triton", "cpu" or "reference"; default: fastest available for the device.

    Returns:
        (q_rot, k_rot), [B, H, N, Dh] each, contiguous, in the dtypes of q and k.
    """
    check_floating("q", q)
    check_floating("k", k)
    check_rank("q", q, 4, "[B, H, N, head_dim]")
    if k.shape != q.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    check_same_device("q", q, "k", k)
    check_nonempty("q", q)
    if rope is None:
        raise TypeError("rope must be a (sin, cos) pair of [HW, head_dim] tensors, got None")
    chosen = _select("apply_rope", q, q.shape[3], backend, ROPE_HEAD_DIMS)
    sin, cos = _check_rope("rope", rope, q, q.shape[2], q.shape[3], None, chosen, like_name="q")
    if chosen == "reference":
        return apply_rope_ref(q, k, rope)
    return _apply_rope_fwd(q, k, sin, cos, chosen)
