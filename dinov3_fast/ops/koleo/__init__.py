"""KoLeo loss: checks, backend dispatch, custom ops, autograd, and `koleo_loss`.

The Kozachenko-Leonenko regulariser spreads the (CLS) features: each row is L2-normalised, its
nearest neighbour is the other row with the largest dot product, and the loss is
-mean log(||y_i - y_nn + 1e-8|| + eps) (DINOv3's KoLeoLoss / KoLeoLossDistributed; semantics in
reference.py). No backend other than `reference` forms the n x n matrix of dots: the search runs
tile by tile (triton.py, csrc/koleo_cpu.cpp) and keeps only each row's running top-k.

The custom ops work on a candidate set x (M, D) whose rows [q0, q0 + nq) are the queries:
q0 = 0, nq = M for the single-process loss; this rank's rows of its gathered loss group for the
distributed one (distributed.py). Gradients w.r.t. the gathered rows flow back through the
autograd-aware gather, so neighbours on other ranks receive theirs.
"""
from __future__ import annotations

import torch

from dinov3_fast.ops._common import op_context, result_dtype
from dinov3_fast.ops._dispatch import (
    check_floating, check_no_double_backward, check_positive, check_positive_int, check_rank, select_backend,
    single_rank_as_none,
)
from dinov3_fast.ops.koleo.cpu import koleo_bwd_cpu, koleo_fwd_cpu
from dinov3_fast.ops.koleo.reference import group_layout, koleo_distributed_ref, koleo_loss_ref

__all__ = ["koleo_loss", "koleo_loss_ref", "koleo_distributed_ref"]

# Fastest first, per device type (see docs/architecture.md). `reference` is always the fallback.
PREFERENCE = {"cuda": ("triton",), "cpu": ("cpu", "triton")}


def _triton():
    from dinov3_fast.ops.koleo import triton as koleo_triton  # imported lazily: triton is optional
    return koleo_triton


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("dinov3_fast::koleo_fwd", mutates_args=())
def _koleo_fwd(x: torch.Tensor, q0: int, nq: int, eps: float, topk: int,
               backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _triton().koleo_fwd_triton if backend == "triton" else koleo_fwd_cpu
    with op_context(x):
        return impl(x, q0, nq, eps, topk)


@_koleo_fwd.register_fake
def _(x, q0, nq, eps, topk, backend):
    dtype = result_dtype(x, backend)
    return (x.new_empty((), dtype=dtype), x.new_empty((nq, topk), dtype=torch.int64),
            x.new_empty((3, nq, topk), dtype=dtype), x.new_empty((x.shape[0],), dtype=dtype))


@torch.library.custom_op("dinov3_fast::koleo_bwd", mutates_args=())
def _koleo_bwd(grad: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, stats: torch.Tensor, nrm: torch.Tensor,
               q0: int, nq: int, eps: float, topk: int, backend: str) -> torch.Tensor:
    impl = _triton().koleo_bwd_triton if backend == "triton" else koleo_bwd_cpu
    with op_context(x):
        return impl(grad, x, idx, stats, nrm, q0, nq, eps, topk)


@_koleo_bwd.register_fake
def _(grad, x, idx, stats, nrm, q0, nq, eps, topk, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, q0, nq, eps, topk, backend = inputs
    _, idx, stats, nrm = output
    ctx.save_for_backward(x, idx, stats, nrm)
    ctx.options = (q0, nq, eps, topk, backend)


def _backward(ctx, grad_loss, _grad_idx, _grad_stats, _grad_r):
    check_no_double_backward("koleo_loss")
    x, idx, stats, nrm = ctx.saved_tensors
    dx = _koleo_bwd(grad_loss, x, idx, stats, nrm, *ctx.options) if ctx.needs_input_grad[0] else None
    return dx, None, None, None, None, None


_koleo_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API

def koleo_loss(
    x: torch.Tensor,
    *,
    eps: float = 1e-8,
    topk: int = 1,
    group=None,
    loss_group_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """KoLeo loss, the same function as DINOv3's `KoLeoLoss` / `KoLeoLossDistributed`.

    Args:
        x: (n, D) features (bf16, fp16, fp32 or fp64), normalised inside in fp32 with autocast
            off. Gradients flow to it.
        eps: F.normalize's eps and the eps inside the log (PairwiseDistance's own eps is 1e-8).
        topk: neighbours per row; the loss averages over the n * topk (row, neighbour) pairs.
            Among equal dot products the lowest index wins (torch.max's rule).
        group: a torch.distributed process group spanning the global batch (e.g.
            `dist.group.WORLD`): rows are all-gathered with autograd within this rank's loss
            group and each local row searches that group. None, or a group of one rank: single
            process, no gather.
        loss_group_size: samples per loss group (DINOv3's `loss_group_size`); None: the whole
            global batch. Must be a multiple of n and divide the global batch (n * world size).
        backend: force "triton", "cpu" or "reference"; default: fastest available for the device.

    Returns:
        0-dim fp32 loss (fp64 for fp64 inputs on the cpu/reference backends): the mean over this
        process's rows.
    """
    check_floating("x", x)
    check_rank("x", x, 2, "(n, D)")
    check_positive("eps", eps)
    check_positive_int("topk", topk)
    if x.shape[1] < 1:
        raise ValueError(f"x must have at least one feature, got shape {tuple(x.shape)}")
    if loss_group_size is not None and (isinstance(loss_group_size, bool) or not isinstance(loss_group_size, int)
                                        or loss_group_size < 1):
        raise ValueError(f"loss_group_size must be None or a positive int, got {loss_group_size!r}")
    n = x.shape[0]
    if n == 0:
        raise ValueError(f"KoLeo needs at least 2 samples to search, got 0 (x has shape {tuple(x.shape)})")
    if group is None:
        search_size = group_layout(n, 1, 0, loss_group_size)[0]  # DINOv3's divisibility errors
    else:
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("koleo_loss: group= needs an initialised torch.distributed process group")
        search_size = group_layout(n, dist.get_world_size(group), dist.get_rank(group), loss_group_size)[0]
    if search_size < 2:
        raise ValueError(f"KoLeo needs at least 2 samples to search, got {search_size} (x has shape {tuple(x.shape)})")
    if topk > search_size:
        raise ValueError(f"topk must be <= the {search_size} samples searched, got topk={topk}")
    group = single_rank_as_none(group)

    chosen = select_backend("koleo_loss", x.device, backend, PREFERENCE)
    if chosen == "reference":
        if group is None:
            return koleo_loss_ref(x, eps, topk)
        return koleo_distributed_ref(x, eps, topk, group, loss_group_size)
    q0 = 0
    if group is not None:
        from dinov3_fast.ops.koleo.distributed import gather_loss_group
        x, q0 = gather_loss_group(x, group, loss_group_size)
    loss, _, _, _ = _koleo_fwd(x, q0, n, float(eps), topk, chosen)
    return loss
