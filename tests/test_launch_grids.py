"""Launch grids fit CUDA's limits: 2^31 - 1 programs on grid axis 0, 65535 on axes 1 and 2. The
interpreter does not check them, so a launcher that puts rows on axis 1 or 2 passes every CPU test
and fails on the GPU once the rows pass 65535 (iBOT's masked tokens, B x H for the rope kernel);
attention, whose kernels keep sequences on axis 1, launches in chunks of 65535 sequences.
Each launcher runs at such a size with its kernels replaced by recorders: only the grids are
checked, nothing is computed."""
import math

import pytest
import torch

triton = pytest.importorskip("triton")

from dinov3_fast.ops.attention import triton as attention_triton  # noqa: E402
from dinov3_fast.ops.sinkhorn import triton as sinkhorn_triton  # noqa: E402
from dinov3_fast.ops.soft_ce import triton as soft_ce_triton  # noqa: E402

CUDA_GRID_MAX = (2**31 - 1, 65535, 65535)
ROWS = 70_000  # past the axis 1 / 2 limit


class _GridRecorder:
    """Stands in for a Triton kernel: `kernel[grid](...)` records the grid and launches nothing."""

    def __init__(self, name: str, grids: list):
        self.name, self.grids = name, grids

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append((self.name, tuple(grid(kwargs) if callable(grid) else grid)))
        return launch


def _record(monkeypatch, module) -> list:
    grids: list = []
    for name in dir(module):
        if name.endswith("_kernel"):
            monkeypatch.setattr(module, name, _GridRecorder(name, grids))
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
    sin = cos = torch.randn(1, dh)  # the backward's other schedules: pre-rotated q and k, a separate dq launch
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
