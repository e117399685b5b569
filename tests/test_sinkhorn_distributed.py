"""Distributed Sinkhorn-Knopp (2 ranks, gloo on CPU) against one process on the whole batch."""
import pytest
import torch
import torch.distributed as dist

from gloo_ranks import run_on_ranks

pytestmark = pytest.mark.distributed


def _check_split_batch(rank: int, world: int, full: torch.Tensor, temp: float):
    import dinov3_fast
    from dinov3_fast.ops import sinkhorn_knopp
    from dinov3_fast.ops.sinkhorn import sinkhorn_knopp_ref

    group = dist.group.WORLD
    local = full.chunk(world)[rank]
    rows = slice(rank * local.shape[0], (rank + 1) * local.shape[0])
    want = sinkhorn_knopp_ref(full.double(), temp)[rows]
    for backend in ("cpu", "triton", "reference"):
        out = sinkhorn_knopp(local, temp, group=group, backend=backend)
        err = ((out.double() - want).norm() / want.norm()).item()
        assert err < 1e-5, (backend, err)
    # logits far beyond the fp32 range: the first step's max is all-reduced too
    big = full * 40.0
    want_big = sinkhorn_knopp_ref((big - big.amax(0)).double(), temp)[rows]
    for backend in ("cpu", "triton"):
        out = sinkhorn_knopp(big.chunk(world)[rank], temp, group=group, backend=backend)
        assert torch.isfinite(out).all()
        assert ((out.double() - want_big).norm() / want_big.norm()).item() < 2e-4
    # drop-ins use the world group when torch.distributed is initialised
    out = dinov3_fast.DINOLoss(full.shape[1], backend="triton").sinkhorn_knopp_teacher(local, temp)
    assert ((out.double() - want).norm() / want.norm()).item() < 1e-5
    for backend in ("cpu", "triton", "reference"):  # iBOT: an int64 count, all-reduced by the module
        n_masked = torch.tensor([local.shape[0]])
        out = dinov3_fast.SinkhornKnoppTeacher(backend=backend)(local, temp, n_masked)
        assert n_masked.item() == full.shape[0]  # all-reduced in place, as in DINOv3
        assert ((out.double() - want).norm() / want.norm()).item() < 1e-5, backend
    # a NaN logit on the last rank reaches every rank through the all-reduced sums, as in DINOv3
    poisoned = full.clone()
    poisoned[-1, 3] = float("nan")
    for backend in ("cpu", "triton", "reference"):
        assert torch.isnan(sinkhorn_knopp(poisoned.chunk(world)[rank], temp, group=group, backend=backend)).all()
    # asynchronous centre EMA over both ranks
    mod = dinov3_fast.DINOLoss(full.shape[1], center_momentum=0.5)
    mod.init_weights()
    mod.update_center(local)
    mod.apply_center_update()
    torch.testing.assert_close(mod.center, 0.5 * full.mean(0, keepdim=True))


def test_two_ranks_match_single_process():
    run_on_ranks(_check_split_batch, torch.randn(10, 300), 0.06)


def _check_rank_without_tokens(rank: int, world: int, tokens: torch.Tensor, temp: float):
    import dinov3_fast
    from dinov3_fast.ops import sinkhorn_knopp

    group = dist.group.WORLD
    n, k = tokens.shape
    dominated = tokens.clone()  # a token beaten by > 100 nats everywhere: the cpu backend's
    dominated[2] = tokens.amax(0) - 7.0 - tokens[3].abs()  # all-reduced switch to the log domain
    cases = [(tokens, ("cpu", "triton", "reference")), (dominated, ("cpu", "triton"))]
    for logits, backends in cases:
        for backend in backends:
            want = sinkhorn_knopp(logits, temp, backend=backend)  # one process, every token
            local = logits if rank == 0 else logits[:0]
            out = sinkhorn_knopp(local, temp, n_samples=n, group=group, backend=backend)
            assert out.shape == local.shape and out.dtype == torch.float32, (backend, out.shape)
            if rank == 0:
                assert torch.isfinite(out).all(), backend
                torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-7)
    for backend in ("cpu", "triton", "reference"):  # no token on any rank
        assert sinkhorn_knopp(tokens[:0], temp, n_samples=0, group=group, backend=backend).shape == (0, k)

    # the drop-ins, as the trainer calls them: rank 1 holds no masked patch
    masks = torch.zeros(2, 8, dtype=torch.bool)
    if rank == 0:
        masks.view(-1)[:n] = True
    head = torch.nn.Linear(16, k)
    student = head(torch.randn(int(masks.sum()), 16))
    n_masked = torch.tensor([int(masks.sum())])
    centred = dinov3_fast.SinkhornKnoppTeacher(backend="cpu")(tokens if rank == 0 else tokens[:0], temp, n_masked)
    assert n_masked.item() == n and centred.shape == (int(masks.sum()), k)
    loss = dinov3_fast.iBOTPatchLoss(k, backend="cpu").forward_masked(student, centred, masks)
    assert torch.isfinite(loss) and (rank == 0 or loss.item() == 0.0)
    loss.backward()
    grads = [head.weight.grad, head.bias.grad]  # zeros, not None, on rank 1: both ranks reduce them
    for g in grads:
        assert g is not None and torch.isfinite(g).all()
        if rank == 1:
            assert not g.any()
    reduced = [g.clone() for g in grads]
    for g in reduced:
        dist.all_reduce(g, group=group)
    if rank == 0:
        for g, r in zip(grads, reduced):
            torch.testing.assert_close(r, g)


def _check_one_rank_falls_back(rank: int, world: int, logits: torch.Tensor, want: torch.Tensor, temp: float):
    """Rank 0's result is poisoned; both ranks hold rows, then rank 1 holds none."""
    from dinov3_fast.ops.sinkhorn import cpu, sinkhorn_knopp

    scaling = cpu._sinkhorn_scaling

    def poisoned(*args):  # rank 0's scaling result holds an inf, its masses in range
        out = scaling(*args)
        if rank == 0 and out is not None:
            out[0, 0] = float("inf")
        return out

    cpu._sinkhorn_scaling = poisoned
    out = sinkhorn_knopp(logits.chunk(world)[rank], temp, group=dist.group.WORLD, backend="cpu")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want.chunk(world)[rank], rtol=1e-5, atol=1e-7)
    local = logits if rank == 0 else logits[:0]  # rank 1 without rows joins the same collectives
    out = sinkhorn_knopp(local, temp, group=dist.group.WORLD, backend="cpu")
    assert out.shape == local.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, want[: local.shape[0]], rtol=1e-5, atol=1e-7)


def test_one_rank_non_finite_result_sends_every_rank_to_the_log_domain():
    """The cpu backend's last guard is all-reduced: one rank's non-finite scaling result sends
    both ranks to the log domain together (a local decision left the ranks in different
    collectives: a mismatch or a receive that times out). 20 s collective timeout: a regression
    fails fast."""
    from dinov3_fast.ops.sinkhorn import sinkhorn_knopp

    logits = torch.randn(8, 200, generator=torch.Generator().manual_seed(1))
    run_on_ranks(_check_one_rank_falls_back, logits, sinkhorn_knopp(logits, 0.07, backend="cpu"), 0.07, timeout_s=20)


def test_rank_without_tokens_joins_the_all_reduces():
    """iBOT on a rank whose crops hold no masked patch: it joins every all-reduce (no hang) and gets
    a (0, K) assignment; the other rank's assignment is the one-process result over all tokens;
    the empty rank's iBOT loss is 0 with zero head gradients."""
    run_on_ranks(_check_rank_without_tokens, torch.randn(10, 300, generator=torch.Generator().manual_seed(0)), 0.06)
