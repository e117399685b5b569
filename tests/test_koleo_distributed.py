"""Distributed KoLeo on CPU (gloo): each rank's loss and gradient equal a single-process evaluation
of the same global batch, for every loss-group layout, backend and topk. Each rank backpropagates
its own upstream gradient (a loss weight, not 1), so the gradients check that the backward applies
it, and that the gather's backward brings every rank's weighted terms to the rows they came from."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dinov3_fast.ops.koleo.reference import koleo_group_loss_ref
from gloo_ranks import run_on_ranks

pytestmark = pytest.mark.distributed

N_LOCAL, DIM = 2, 12


def upstream(rank: int) -> float:
    """The upstream gradient rank `rank` backpropagates from its loss."""
    return 0.37 + 0.25 * rank


def single_process(x_global: torch.Tensor, n: int, loss_group_size: int, topk: int):
    """Per-rank losses and the gradient of their sum, each weighted by its rank's upstream gradient,
    w.r.t. the global batch, in float64."""
    x = x_global.detach().double().requires_grad_()
    y = F.normalize(x, dim=-1, eps=1e-8)
    losses = []
    for rank in range(x.shape[0] // n):
        g0 = rank * n // loss_group_size * loss_group_size
        losses.append(koleo_group_loss_ref(y[rank * n:(rank + 1) * n], y[g0:g0 + loss_group_size], rank * n - g0, topk))
    weights = torch.tensor([upstream(rank) for rank in range(len(losses))], dtype=torch.float64)
    (grad,) = torch.autograd.grad((torch.stack(losses) * weights).sum(), x)
    return torch.stack(losses).detach(), grad


def _check_layouts(rank: int, world: int, layouts) -> None:
    """Every backend and the drop-in module, for each (loss_group_size, topk) layout, against the
    single process; then the layout validation. Collects every mismatch before failing."""
    import dinov3_fast
    from dinov3_fast.ops import koleo_loss

    errors = []
    torch.manual_seed(1234)  # the same global batch on every rank
    for loss_group_size, topk in layouts:
        x_global = torch.randn(world * N_LOCAL, DIM)
        want_loss, want_grad = single_process(x_global, N_LOCAL, loss_group_size, topk)
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        runs = {b: (lambda x, b=b: koleo_loss(x, topk=topk, group=dist.group.WORLD, loss_group_size=loss_group_size,
                                              backend=b)) for b in ("cpu", "triton", "reference")}
        runs["module"] = dinov3_fast.KoLeoLossDistributed(topk=topk, loss_group_size=loss_group_size)
        for name, fn in runs.items():
            x = x_global[rows].clone().requires_grad_()
            loss = fn(x)
            loss.backward(loss.new_tensor(upstream(rank)))
            tag = f"rank {rank} L={loss_group_size} topk={topk} {name}"
            loss_err = abs(loss.item() - want_loss[rank].item()) / abs(want_loss[rank].item())
            grad_err = ((x.grad.double() - want_grad[rows]).norm() / want_grad[rows].norm()).item()
            if not (loss_err < 1e-5 and grad_err < 1e-5):
                errors.append(f"{tag}: loss err {loss_err:.2e}, grad err {grad_err:.2e}")
    for bad, match in ((3, "must be a multiple of local batch size"), (4 * world, "must be divisible by loss group size")):
        try:
            koleo_loss(torch.randn(N_LOCAL, DIM), group=dist.group.WORLD, loss_group_size=bad)
            errors.append(f"rank {rank}: loss_group_size={bad} did not raise")
        except ValueError as exc:
            if match not in str(exc):
                errors.append(f"rank {rank}: loss_group_size={bad}: unexpected message {exc}")
    assert not errors, "\n".join(errors)


def test_two_ranks_match_single_process():
    """2 ranks x 2 samples: loss groups of 2 (each rank searches its own rows) and 4 (the world)."""
    run_on_ranks(_check_layouts, [(2, 1), (4, 1), (4, 3)], world=2)


def test_four_ranks_two_loss_groups():
    """4 ranks x 2 samples, loss groups of 4: ranks {0, 1} and {2, 3} gather within a subgroup."""
    run_on_ranks(_check_layouts, [(4, 1), (8, 3)], world=4)
