"""Autograd-aware all_gather within DINOv3's KoLeo loss groups.

DINOv3 gathers the whole world's features and then keeps its loss group (`loss_group_size`
consecutive samples of the global batch, i.e. `loss_group_size / n` consecutive ranks). Only the
ranks of one loss group ever read each other's rows, so we gather within the loss group only (a
process subgroup, created once per layout and cached): the same rows and the same gradients, with
n_groups times less traffic. The backward sums every group member's gradient for our rows
(reduce-scatter; all-reduce plus a slice where the backend has no reduce-scatter, e.g. gloo).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dinov3_fast.ops.koleo.reference import group_layout

_SUBGROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}
# torch >= 2.13 renames the flat-tensor collectives (the old names warn); torch 2.6 has only those.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class GroupAllGather(torch.autograd.Function):
    """(n, D) per rank -> (world * n, D) rows of every rank of `group`, in rank order."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        n = grad.shape[0] // world
        if dist.get_backend(group) == dist.Backend.GLOO:
            dist.all_reduce(grad, group=group)
            return grad[rank * n:(rank + 1) * n].clone(), None
        out = grad.new_empty((n, *grad.shape[1:]))
        _reduce_scatter(out, grad, group=group)
        return out, None


def _loss_subgroup(group: dist.ProcessGroup, ranks_per_group: int) -> dist.ProcessGroup:
    """The process group of this rank's loss group: `ranks_per_group` consecutive ranks of `group`."""
    members = dist.get_process_group_ranks(group)
    first = dist.get_rank(group) // ranks_per_group * ranks_per_group
    ranks = tuple(members[first:first + ranks_per_group])
    if ranks not in _SUBGROUPS:
        # Only the members take part in creating it, so each loss group is created independently.
        _SUBGROUPS[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
    return _SUBGROUPS[ranks]


def gather_loss_group(x: torch.Tensor, group: dist.ProcessGroup,
                      loss_group_size: int | None) -> tuple[torch.Tensor, int]:
    """This rank's loss group, gathered with autograd, and where this rank's rows start in it.

    Args:
        x: (n, D) this rank's features (the same n on every rank).
        group: the process group spanning the global batch (e.g. dist.group.WORLD).
        loss_group_size: samples per loss group (None: the global batch). Raises DINOv3's
            ValueErrors when it is not a multiple of n or does not divide the global batch.

    Returns:
        (candidates (loss_group_size, D), q0): this rank's rows are candidates[q0:q0 + n].
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    _, ranks_per_group, rank_in_group = group_layout(x.shape[0], world, rank, loss_group_size)
    if ranks_per_group == 1:
        return x, 0
    sub = group if ranks_per_group == world else _loss_subgroup(group, ranks_per_group)
    return GroupAllGather.apply(x, sub), rank_in_group * x.shape[0]
