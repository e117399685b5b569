"""Launch limits the interpreter does not check, at shapes the CPU tests cannot reach.

Grids: CUDA allows 2^31 - 1 programs on grid axis 0, 65535 on axes 1 and 2. A launcher that puts
rows on axis 1 or 2 passes every CPU test and fails on the GPU once the rows pass 65535 (iBOT's
masked tokens, B x H for the rope kernel); attention, whose kernels keep sequences on axis 1,
launches in chunks of 65535 sequences. Each launcher runs at such a size with its kernels replaced
by recorders: only the grids (and tile sizes) are checked, nothing is computed. The production
shapes (DINOv3's largest: ViT-L at batch 1064 under full AC, ViT-7B at high resolution) run on the
meta device with the GPU's tile choices.

Offsets: `tl.program_id`, `tl.arange` and Python int arguments below 2^31 are int32 in a kernel, so
`row * stride` wraps once a tensor spans 2^31 elements, silently, and the interpreter wraps too.
The last tests read strided views that span more than 2^31 elements of a sparse virtual mapping
(only the rows the views cover are ever touched) and compare with the same call on a contiguous
copy: a wrapped offset reads the wrong rows.
"""
import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from dinov3_fast.ops.attention import triton as attention_triton  # noqa: E402
from dinov3_fast.ops.gram import triton as gram_triton  # noqa: E402
from dinov3_fast.ops.koleo import triton as koleo_triton  # noqa: E402
from dinov3_fast.ops.linear_soft_ce import chunked as linear_soft_ce_chunked  # noqa: E402
from dinov3_fast.ops.sinkhorn import triton as sinkhorn_triton  # noqa: E402
from dinov3_fast.ops.soft_ce import triton as soft_ce_triton  # noqa: E402

CUDA_GRID_MAX = (2**31 - 1, 65535, 65535)
ROWS = 70_000  # past the axis 1 / 2 limit


class _GridRecorder:
    """Stands in for a Triton kernel: `kernel[grid](...)` records the grid and launches nothing."""

    def __init__(self, name: str, grids: list, constexprs: list | None = None):
        self.name, self.grids, self.constexprs = name, grids, constexprs

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append((self.name, tuple(grid(kwargs) if callable(grid) else grid)))
            if self.constexprs is not None:
                self.constexprs.append((self.name, kwargs))
        return launch


def _record(monkeypatch, module, constexprs: list | None = None) -> list:
    grids: list = []
    for name in dir(module):
        if name.endswith("_kernel"):
            monkeypatch.setattr(module, name, _GridRecorder(name, grids, constexprs))
    return grids


def _launch_soft_ce():
    student, teacher = torch.randn(2, ROWS, 32), torch.randn(2, ROWS, 32).softmax(-1)
    _, row_max, lse_rest, a = soft_ce_triton.soft_ce_fwd_triton(student, teacher, 0.1, True)
    soft_ce_triton.soft_ce_bwd_student_triton(torch.ones(2, ROWS), student, teacher, row_max, lse_rest, a, 0.1, True)


def _launch_sinkhorn():
    sinkhorn_triton.sinkhorn_triton(torch.randn(ROWS, 32), 0.05, 3)


def _launch_rope():
    q = torch.randn(ROWS, 1, 2, 64)
    sin = cos = torch.randn(2, 64)
    attention_triton.apply_rope_triton(q, q, sin, cos, transpose=False)


def _launch_attention():
    sequences, tokens, heads, dh = ROWS, 2, 2, 64
    qkv = torch.randn(sequences * tokens, 3 * heads * dh)
    out, lse = attention_triton.rope_attention_fwd_triton(qkv, None, None, None, heads, tokens)
    attention_triton.rope_attention_bwd_triton(torch.randn_like(out), qkv, out, lse, None, None, None, heads, tokens)
    sin = cos = torch.randn(1, dh)  # the other schedules: pre-rotated q and k, a separate dq launch
    attention_triton.rope_attention_fwd_triton(qkv, sin, cos, None, heads, tokens, prerotate=True)
    attention_triton.rope_attention_bwd_triton(torch.randn_like(out), qkv, out, lse, sin, cos, None, heads, tokens,
                                               dq_config=attention_triton.bwd_config(tokens, dh), prerotate=True)


@pytest.mark.parametrize("module,launch", [
    (soft_ce_triton, _launch_soft_ce),
    (sinkhorn_triton, _launch_sinkhorn),
    (attention_triton, _launch_rope),
    (attention_triton, _launch_attention),
], ids=["soft_ce_70k_rows", "sinkhorn_70k_rows", "rope_70k_heads", "attention_70k_sequences"])
def test_grids_fit_cuda_limits(monkeypatch, module, launch):
    grids = _record(monkeypatch, module)
    launch()
    assert grids, "no kernel launch was recorded"
    for name, grid in grids:
        assert all(0 < n <= limit for n, limit in zip(grid, CUDA_GRID_MAX)), (name, grid)
    assert sum(math.prod(grid) for _, grid in grids) >= ROWS  # the rows did reach the grids


@pytest.mark.parametrize("varlen", [False, True])
def test_attention_launched_in_sequence_chunks_matches_one_launch(monkeypatch, varlen):
    """The sequence-chunked attention launches (first sequence s0 > 0) compute what one launch
    does, forward and backward, for equal-length and variable-length batches."""
    from dinov3_fast.ops.attention import rope_attention, rope_attention_list

    heads, dh = 2, 32
    crops = [(5, 7), (2, 12)] if varlen else [(5, 7)]
    qkvs = [torch.randn(b, n, 3 * heads * dh, requires_grad=True) for b, n in crops]

    def run():
        if varlen:
            outs = rope_attention_list(qkvs, None, num_heads=heads, backend="triton")
        else:
            outs = [rope_attention(qkvs[0], None, num_heads=heads, backend="triton")]
        grads = torch.autograd.grad(sum(o.square().sum() for o in outs), qkvs)
        return [o.detach() for o in outs], grads

    want_out, want_grad = run()
    monkeypatch.setattr(attention_triton, "_MAX_GRID_AXIS_1", 2)
    got_out, got_grad = run()
    for got, want in zip([*got_out, *got_grad], [*want_out, *want_grad]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- production shapes

IBOT_VITL_B1064 = 62_400  # masked tokens of ViT-L at batch 1064 (full AC's largest), 7,503 at 128
TILE_MAX = 4096           # no tile (tl.arange extent) may grow with the problem, e.g. next_power_of_2(K)


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, device="meta", dtype=dtype)


def _gram(G, P, D, clamp):
    identity = clamp == 0 and D < P
    gram_triton.gram_loss_triton(_meta(G, P, D), _meta(G, P, D), True, clamp, identity, True, True)


def _soft_ce(S, T, B, K):
    student, teacher = _meta(S, B, K), _meta(T, B, K, dtype=torch.float32)
    out = soft_ce_triton.soft_ce_fwd_triton(student, teacher, 0.1, S == T)
    soft_ce_triton.soft_ce_bwd_student_triton(_meta(S, B, dtype=torch.float32), student, teacher, *out[1:], 0.1, S == T)


def _linear_soft_ce(S, T, B, K, d):
    linear_soft_ce_chunked.linear_soft_ce_chunked(
        _meta(S, B, d), _meta(K, d), _meta(T, B, K, dtype=torch.float32), _meta(B, dtype=torch.float32), 0.1, False,
        linear_soft_ce_chunked.CHUNK_LOGITS["cuda"], soft_ce_triton.soft_ce_fwd_triton,
        soft_ce_triton.soft_ce_bwd_student_triton, True, True)


def _attention(sequences, tokens, heads, dh, prefix=5):
    qkv = _meta(sequences * tokens, 3 * heads * dh)
    sin = cos = _meta(tokens - prefix, dh, dtype=torch.float32)
    out, lse = attention_triton.rope_attention_fwd_triton(qkv, sin, cos, None, heads, tokens)
    attention_triton.rope_attention_fwd_triton(qkv, sin, cos, None, heads, tokens, prerotate=True)
    attention_triton.rope_attention_bwd_triton(torch.empty_like(out), qkv, out, lse, sin, cos, None, heads, tokens)


PRODUCTION = {
    # Gram: 7B at 1152 px (identity, D < P) and 1024 px (tiled), 64 images; ViT-L b1064 flattened
    "gram_7b_1152px_identity": (gram_triton, lambda: _gram(64, 5184, 4096, 0)),
    "gram_7b_1024px_tiled": (gram_triton, lambda: _gram(64, 4096, 4096, 0)),
    "gram_vitl_b1064_flat_clamped": (gram_triton, lambda: _gram(1, 2128 * 256, 1024, 1)),
    "koleo_group_16384_d4096": (koleo_triton, lambda: (
        out := koleo_triton.koleo_fwd_triton(_meta(16384, 4096), 0, 16384, 1e-8, 1),
        koleo_triton.koleo_bwd_triton(_meta(), _meta(16384, 4096), *out[1:], 0, 16384, 1e-8, 1))),
    "soft_ce_ibot_vitl_b1064": (soft_ce_triton, lambda: _soft_ce(1, 1, IBOT_VITL_B1064, 65536)),
    "soft_ce_dino_7b": (soft_ce_triton, lambda: _soft_ce(10, 2, 16, 262144)),
    "sinkhorn_ibot_vitl_b1064": (sinkhorn_triton, lambda: sinkhorn_triton.sinkhorn_triton(
        _meta(IBOT_VITL_B1064, 65536, dtype=torch.float32), 0.07, 3)),
    "sinkhorn_dino_7b": (sinkhorn_triton, lambda: sinkhorn_triton.sinkhorn_triton(
        _meta(32, 262144, dtype=torch.float32), 0.07, 3)),
    "linear_soft_ce_ibot_vitl_b1064": (soft_ce_triton, lambda: _linear_soft_ce(1, 1, IBOT_VITL_B1064, 65536, 256)),
    "linear_soft_ce_dino_7b": (soft_ce_triton, lambda: _linear_soft_ce(10, 2, 16, 262144, 512)),
    "attention_vitl_b1064_local": (attention_triton, lambda: _attention(8 * 1064, 54, 16, 64)),
    "attention_vitl_b1064_global": (attention_triton, lambda: _attention(2 * 1064, 261, 16, 64)),
    "attention_7b_1024px": (attention_triton, lambda: _attention(32, 4101, 32, 128)),
}


@pytest.mark.parametrize("case", sorted(PRODUCTION))
def test_production_shapes_fit_cuda_limits(monkeypatch, case):
    """DINOv3's largest shapes, on the meta device, with the launchers' GPU tile choices: every
    grid fits CUDA's limits and every tile stays a fixed size."""
    module, launch = PRODUCTION[case]
    for mod in (soft_ce_triton, sinkhorn_triton):  # the GPU's tiles and splits, not the interpreter's
        monkeypatch.setattr(mod, "triton_interpreting", lambda: False)
    constexprs: list = []
    grids = _record(monkeypatch, module, constexprs)
    launch()
    assert grids, "no kernel launch was recorded"
    for name, grid in grids:
        assert all(0 < n <= limit for n, limit in zip(grid, CUDA_GRID_MAX)), (name, grid)
    for name, kwargs in constexprs:
        tiles = {k: v for k, v in kwargs.items() if "BLOCK" in k or k.endswith("_PAD")}
        assert all(v <= TILE_MAX for v in tiles.values()), (name, tiles)


# ----------------------------------------------------------------------------- int32 offsets

_SPAN = (1 << 32) + (1 << 22)  # fp16 elements of the virtual mapping: 8 GiB, almost all never touched
_BEFORE = 1 << 31              # where the views start: a wrapped (negative) offset still lands in it


@pytest.fixture(scope="module")
def sparse_fp16():
    """A 1-D fp16 tensor over an anonymous 8 GiB mapping: pages are allocated only where written
    or read, so views spanning more than 2^31 elements cost a few pages."""
    import mmap

    import numpy as np
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("reads CPU memory through the Triton interpreter")
    try:
        mapping = mmap.mmap(-1, 2 * _SPAN)
    except (OSError, OverflowError, ValueError) as exc:
        pytest.skip(f"no 8 GiB virtual mapping here: {exc}")
    base = torch.from_numpy(np.frombuffer(mapping, dtype=np.float16))
    yield base
    del base  # the mapping is closed with the last reference to it


def _views(base, shape, strides, count):
    """`count` views with the same shape and strides, interleaved (each starts right after the
    previous one's first group, or row), each filled with fresh normal values."""
    step = shape[-1] if len(shape) == 2 else shape[1] * shape[2]
    views = [base.as_strided(shape, strides, storage_offset=_BEFORE + i * step) for i in range(count)]
    for v in views:
        v.copy_(torch.randn(shape))
    return views


# (shape, strides): the group stride or the row stride passes 2^31 elements within the tensor
GRAM_LAYOUTS = {
    "group_stride": ((3, 16, 16), ((1 << 30) + (1 << 20), 16, 1)),  # g = 2 at 2^31 + 2^21
    "row_stride": ((1, 17, 16), (1 << 32, 1 << 27, 1)),            # row 16 at 2^31
}


@pytest.mark.parametrize("layout", sorted(GRAM_LAYOUTS))
@pytest.mark.parametrize("clamp", [0, 1], ids=["no_clamp", "remove_neg"])
def test_gram_offsets_past_int32(sparse_fp16, layout, clamp):
    """Every Gram kernel (row norms, tiled, D x D products, identity gradient) reads a view whose
    group or row offsets pass 2^31 elements as it reads a contiguous copy."""
    shape, strides = GRAM_LAYOUTS[layout]
    xs, xt = _views(sparse_fp16, shape, strides, 2)
    P = shape[1]
    if layout == "group_stride" and clamp == 0:  # the identity form needs D < P
        xs, xt = xs[:, :, :8], xt[:, :, :8]
    identity = clamp == 0 and xs.shape[2] < P
    got = gram_triton.gram_loss_triton(xs, xt, True, clamp, identity, True, True)
    want = gram_triton.gram_loss_triton(xs.contiguous(), xt.contiguous(), True, clamp, identity, True, True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_koleo_rows_past_int32(sparse_fp16):
    """KoLeo's kernels form row * stride in int32: a view whose rows span 2^31 elements (CLS
    tokens of a [n, N, D] batch with n N D >= 2^31) is read as its contiguous copy, forward and
    backward."""
    (x,) = _views(sparse_fp16, (17, 16), (1 << 27, 1), 1)  # row 16 at 2^31
    results = []
    for inp in (x, x.contiguous()):
        loss, idx, stats, r = koleo_triton.koleo_fwd_triton(inp, 0, 17, 1e-8, 1)
        dx = koleo_triton.koleo_bwd_triton(torch.ones(()), inp, idx, stats, r, 0, 17, 1e-8, 1)
        results.append((loss, idx, dx))
    for g, w in zip(*results):
        torch.testing.assert_close(g, w)
