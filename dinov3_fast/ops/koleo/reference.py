"""Plain-PyTorch KoLeo loss with DINOv3's exact semantics (dinov3/loss/koleo_loss.py).

This is the test oracle (evaluated in float64) and the `reference` backend. Imports torch and
ops._common only.

DINOv3, `KoLeoLoss.forward(student_output, eps=1e-8)` (autocast off):
    y = F.normalize(x, eps=eps)                          # (n, D)
    dots = y @ y.T; dots.diagonal() := -1                # self is a candidate with value -1
    nn = argmax_j dots[i, j]                             # torch.max: lowest index among ties
    d_i = PairwiseDistance(2, eps=1e-8)(y_i, y_nn) = || y_i - y_nn + 1e-8 ||
    loss = -mean_i log(d_i + eps)
`KoLeoLossDistributed(topk, loss_group_size)` all-gathers y (autograd-aware), keeps the loss group
this rank belongs to (groups of `loss_group_size` consecutive samples of the global batch), takes
the `topk` largest dots of each local row against that group (own entry set to -1, no gradient
through the search) and averages -log(d + eps) over the n * topk (row, neighbour) pairs.

Normalisation here is done in fp32 (fp64 for fp64 inputs) for every input dtype, as the fused
backends do: a deliberate departure for bf16/fp16 inputs, which DINOv3 normalises in their own
dtype. In bf16, dots near 1 are 2^-8 apart, so candidates within ~0.09 of a row (distance
sqrt(2 - 2 dot)) tie and the neighbour search degenerates into an index-order pick. Ties are
broken towards the lowest index for topk > 1 too (a stable sort), where torch.topk leaves the
order unspecified.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dinov3_fast.ops._common import autocast_disabled, compute_dtype

PDIST_EPS = 1e-8  # nn.PairwiseDistance(2, eps=1e-8) in both DINOv3 modules


def koleo_neighbors_ref(queries: torch.Tensor, candidates: torch.Tensor, offset: int, topk: int) -> torch.Tensor:
    """Indices of the `topk` candidates with the largest dot product with each query.

    Args:
        queries: (nq, D) L2-normalised rows; query i is candidate `offset + i`.
        candidates: (M, D) L2-normalised rows.
        offset: position of the first query among the candidates.
        topk: neighbours per query.

    Returns:
        (nq, topk) int64 candidate indices, best first; among equal dots the lowest index wins.
        The query's own entry competes with value -1, exactly like DINOv3's diagonal fill.
    """
    dots = queries @ candidates.T
    rows = torch.arange(queries.shape[0], device=dots.device)
    dots[rows, rows + offset] = -1
    if topk == 1:
        return torch.max(dots, dim=1).indices[:, None]
    return torch.sort(dots, dim=1, descending=True, stable=True).indices[:, :topk]


def koleo_group_loss_ref(queries: torch.Tensor, candidates: torch.Tensor, offset: int, topk: int,
                         eps: float = 1e-8) -> torch.Tensor:
    """-mean log(||q_i - c_nn + 1e-8|| + eps) over the (nq, topk) pairs; rows already normalised.

    Args:
        queries: (nq, D) normalised rows (query i is candidate `offset + i`).
        candidates: (M, D) normalised rows.
    Returns:
        0-dim loss in the rows' dtype.
    """
    with torch.no_grad():
        indices = koleo_neighbors_ref(queries, candidates, offset, topk)
    expanded = queries.unsqueeze(1).expand(-1, topk, -1).flatten(0, 1)
    distances = F.pairwise_distance(expanded, candidates[indices].flatten(0, 1), p=2, eps=PDIST_EPS)
    return -torch.log(distances + eps).mean()


def koleo_loss_ref(x: torch.Tensor, eps: float = 1e-8, topk: int = 1) -> torch.Tensor:
    """Single-process KoLeo loss: DINOv3's `KoLeoLoss` (topk=1), or `KoLeoLossDistributed` on one rank.

    Args:
        x: (n, D) features, n >= 2.
        eps: normalisation eps and the eps inside the log.
        topk: neighbours per row (DINOv3's KoLeoLoss uses 1).

    Returns:
        0-dim fp32 loss (fp64 for fp64 inputs).
    """
    with autocast_disabled(x.device.type):
        y = F.normalize(x.to(compute_dtype(x)), p=2, dim=-1, eps=eps)
        return koleo_group_loss_ref(y, y, 0, topk, eps)


def group_layout(local_n: int, world_size: int, rank: int, loss_group_size: int | None) -> tuple[int, int, int]:
    """DINOv3's loss-group arithmetic, with its errors.

    Returns:
        (loss_group_size, ranks_per_group, rank_in_group): this rank's rows are rows
        [rank_in_group * local_n, (rank_in_group + 1) * local_n) of its loss group, which spans
        ranks [rank - rank_in_group, rank - rank_in_group + ranks_per_group).
    """
    global_n = local_n * world_size
    size = global_n if loss_group_size is None else loss_group_size
    if size % local_n != 0:
        raise ValueError(f"Loss group size size {size} must be a multiple of local batch size {local_n}.")
    if global_n % size != 0:
        raise ValueError(f"Global batch size {global_n} must be divisible by loss group size {size}.")
    ranks_per_group = world_size // (global_n // size)
    return size, ranks_per_group, rank % ranks_per_group


def koleo_distributed_ref(x: torch.Tensor, eps: float = 1e-8, topk: int = 1, group=None,
                          loss_group_size: int | None = None) -> torch.Tensor:
    """DINOv3's `KoLeoLossDistributed.forward` over `group` (default: the world, when initialised).

    Args:
        x: (n, D) this rank's features; every rank passes the same n.
    Returns:
        0-dim fp32 loss (fp64 for fp64 inputs): the mean over this rank's n * topk pairs.
    """
    import torch.distributed as dist
    import torch.distributed.nn as dist_nn

    with autocast_disabled(x.device.type):
        y = F.normalize(x.to(compute_dtype(x)), p=2, dim=-1, eps=eps)
        if dist.is_available() and dist.is_initialized():
            gathered = torch.cat(dist_nn.all_gather(y, group=group or dist.group.WORLD), dim=0)
            world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        else:
            gathered, world_size, rank = y, 1, 0
        size, ranks_per_group, rank_in_group = group_layout(y.shape[0], world_size, rank, loss_group_size)
        candidates = gathered.view(-1, size, y.shape[1])[rank // ranks_per_group]
        return koleo_group_loss_ref(y, candidates, rank_in_group * y.shape[0], topk, eps)
