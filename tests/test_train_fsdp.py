"""FSDP2 on 2 gloo ranks against a single process on the same global batch (fp32, 3 steps, AC
none / full / selective), and the activation memory each AC mode keeps."""
import os

import pytest
import torch
import torch.distributed as dist

from dinov3_fast.train.config import apply_overrides, get_preset
from dinov3_fast.train.data import synthetic_batch
from dinov3_fast.train.meta_arch import SSLMetaArch, build_backbone
from dinov3_fast.train.optim import apply_schedule, build_optimizer, clip_gradients
from dinov3_fast.train.parallelize import apply_ac, parallelize
from dinov3_fast.train.planner import saved_activation_bytes
from dinov3_fast.train.schedules import Schedules
from gloo_ranks import run_on_ranks

STEPS, GLOBAL_BATCH = 3, 8


def _cfg():
    # global KoLeo (all-gathered), so 2 ranks compute the single process's loss
    return apply_overrides(get_preset("debug"), ["dino.koleo_loss_distributed=true", "optim.warmup_epochs=0",
                                                 f"train.batch_size_per_gpu={GLOBAL_BATCH}"])


def _run(ac: str, rank: int, world: int, unmasked_half: bool = False) -> list[float]:
    """STEPS steps on the global batch (this rank's shard); with `unmasked_half`, the second half of
    the images (rank 1's shard on 2 ranks) has no masked patch."""
    cfg = _cfg()
    torch.manual_seed(0)
    arch = SSLMetaArch(cfg)
    arch.init_weights()
    with torch.no_grad():
        for p in arch.student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    arch.teacher.load_state_dict(arch.student.state_dict())
    parallelize(arch, ac=ac, param_dtype=None, reduce_dtype=torch.float32, shard=world > 1)
    arch.train()
    opt, sched = build_optimizer(cfg, arch.student), Schedules(cfg)
    losses = []
    for step in range(STEPS):
        batch = synthetic_batch(cfg, GLOBAL_BATCH, seed=step)
        if unmasked_half:
            batch.masks[:, GLOBAL_BATCH // 2:] = False
        batch = batch.shard(rank, world)
        values = sched.at(step)
        apply_schedule(opt, values)
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(100 + step)  # the same RoPE jitter on every rank and in the single process
        loss, _ = arch.forward_backward(batch, teacher_temp=values.teacher_temp, iteration=step)
        clip_gradients(arch.student, cfg.optim.clip_grad)
        opt.step()
        arch.update_ema(values.momentum)
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    return losses


def _save_sharded_losses(rank: int, world: int, out_dir: str, runs: tuple[tuple[str, bool], ...]) -> None:
    """Each (AC mode, unmasked_half) run on this rank's shard; rank 0 saves the losses."""
    results = {(ac, unmasked): _run(ac, rank, world, unmasked) for ac, unmasked in runs}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "losses.pt"))


@pytest.mark.distributed
def test_fsdp2_two_ranks_match_single_process(tmp_path):
    runs = tuple((ac, False) for ac in ("none", "full", "selective"))
    run_on_ranks(_save_sharded_losses, str(tmp_path), runs, world=2)
    sharded = torch.load(tmp_path / "losses.pt")
    single = _run("none", 0, 1)
    assert all(torch.isfinite(torch.tensor(single)))
    for (ac, _), losses in sharded.items():
        for a, b in zip(losses, single):
            assert abs(a - b) <= 1e-5 * abs(b), (ac, losses, single)


@pytest.mark.distributed
def test_fsdp2_rank_without_masked_patch(tmp_path):
    """Rank 1's crops hold no masked patch: it joins iBOT's Sinkhorn all-reduces and FSDP2's
    reduce-scatters (its iBOT head gets zero gradients), and the run matches the single process."""
    run_on_ranks(_save_sharded_losses, str(tmp_path), (("none", True),), world=2)
    sharded = torch.load(tmp_path / "losses.pt")[("none", True)]
    single = _run("none", 0, 1, unmasked_half=True)
    assert all(torch.isfinite(torch.tensor(single)))
    for a, b in zip(sharded, single):
        assert abs(a - b) <= 1e-5 * abs(b), (sharded, single)


def test_selective_ac_keeps_less_than_none_and_more_than_full():
    cfg = apply_overrides(get_preset("debug"), ["student.depth=3"])
    x = torch.randn(8, 3, 32, 32)
    saved = {}
    for ac in ("none", "full", "selective"):
        torch.manual_seed(0)
        backbone = build_backbone(cfg, drop_path_rate=0.0)
        apply_ac(backbone.blocks, ac)
        saved[ac] = saved_activation_bytes(lambda: backbone(x, is_training=True)["x_norm_patchtokens"])
        out = backbone(x, is_training=True)["x_norm_patchtokens"]
        out.square().sum().backward()  # the checkpointed forward still trains
        assert all(p.grad is not None for p in backbone.blocks.parameters())
    assert saved["full"] < saved["selective"] < saved["none"], saved
    with pytest.raises(ValueError, match="ac must be one of"):
        apply_ac(backbone.blocks, "some")
    with pytest.raises(RuntimeError, match="already applied"):
        apply_ac(backbone.blocks, "full")


def test_ac_keeps_state_dict_names_and_gradients():
    cfg = get_preset("debug")
    x = torch.randn(4, 3, 32, 32)
    grads = {}
    for ac in ("none", "selective", "full"):
        torch.manual_seed(0)
        arch = SSLMetaArch(cfg)
        keys = list(arch.state_dict())
        parallelize(arch, ac=ac, shard=False)
        assert list(arch.state_dict()) == keys
        torch.manual_seed(1)
        arch.student.backbone(x, is_training=True)["x_norm_clstoken"].sum().backward()
        grads[ac] = [p.grad.clone() for p in arch.student.backbone.blocks.parameters()]
    for ac in ("selective", "full"):
        for a, b in zip(grads[ac], grads["none"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
