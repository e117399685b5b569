"""Distributed Sinkhorn-Knopp (2 ranks, gloo on CPU) against one process on the whole batch."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

WORLD = 2


def _worker(rank: int, init_file: str, full: torch.Tensor, temp: float):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        import dinov3_fast
        from dinov3_fast.ops import sinkhorn_knopp
        from dinov3_fast.ops.sinkhorn import sinkhorn_knopp_ref

        group = dist.group.WORLD
        local = full.chunk(WORLD)[rank]
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
            out = sinkhorn_knopp(big.chunk(WORLD)[rank], temp, group=group, backend=backend)
            assert torch.isfinite(out).all()
            assert ((out.double() - want_big).norm() / want_big.norm()).item() < 2e-4
        # drop-ins use the world group when torch.distributed is initialised
        out = dinov3_fast.DINOLoss(full.shape[1], backend="triton").sinkhorn_knopp_teacher(local, temp)
        assert ((out.double() - want).norm() / want.norm()).item() < 1e-5
        n_masked = torch.tensor([local.shape[0]])
        out = dinov3_fast.SinkhornKnoppTeacher(backend="cpu")(local, temp, n_masked)
        assert n_masked.item() == full.shape[0]  # all-reduced in place, as in DINOv3
        assert ((out.double() - want).norm() / want.norm()).item() < 1e-5
        # asynchronous centre EMA over both ranks
        mod = dinov3_fast.DINOLoss(full.shape[1], center_momentum=0.5)
        mod.init_weights()
        mod.update_center(local)
        mod.apply_center_update()
        torch.testing.assert_close(mod.center, 0.5 * full.mean(0, keepdim=True))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_two_ranks_match_single_process():
    full = torch.randn(10, 300)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), full, 0.06), nprocs=WORLD, join=True)
