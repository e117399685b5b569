"""FSDP2 on 2 gloo ranks against a single process on the same global batch (fp32, 3 steps, AC
none / full / selective), and the activation memory each AC mode keeps."""
import os

import warnings

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
            masks = batch.masks.clone()
            masks[:, GLOBAL_BATCH // 2:] = False
            batch = batch.with_masks(masks)
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
    assert all(torch.isfinite(torch.tensor(single))) and len(single) == STEPS and len(sharded) == len(runs)
    for (ac, _), losses in sharded.items():
        assert len(losses) == STEPS, (ac, losses)
        for a, b in zip(losses, single):
            assert abs(a - b) <= 1e-5 * abs(b), (ac, losses, single)


@pytest.mark.distributed
def test_fsdp2_rank_without_masked_patch(tmp_path):
    """Rank 1's crops hold no masked patch: it joins iBOT's Sinkhorn all-reduces and FSDP2's
    reduce-scatters (its iBOT head gets zero gradients), and the run matches the single process."""
    run_on_ranks(_save_sharded_losses, str(tmp_path), (("none", True),), world=2)
    sharded = torch.load(tmp_path / "losses.pt")[("none", True)]
    single = _run("none", 0, 1, unmasked_half=True)
    assert all(torch.isfinite(torch.tensor(single))) and len(single) == len(sharded) == STEPS
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



def _train_logs(cfg) -> tuple[list[dict[str, float]], bool]:
    """The per-step logs of `train(cfg)`, and whether its student was sharded (DTensor params)."""
    from torch.distributed.tensor import DTensor

    from dinov3_fast.train.loop import train
    hist = train(cfg, progress=False, log_fn=None)
    return hist["steps"], isinstance(next(hist["state"].arch.student.parameters()), DTensor)


def test_trainer_on_a_one_rank_group_matches_the_plain_process(tmp_path):
    """One GPU with a bf16 param dtype trains under FSDP2 on a 1-rank group (`setup_distributed`,
    `shards_single_process`). The same path on the CPU (a 1-rank gloo group made here; the trainer
    shards whenever a group exists): in fp32 its losses equal the unsharded process's; with bf16
    params (the MixedPrecisionPolicy's casts, no autocast) the DINO and iBOT losses stay within
    bf16 rounding. (KoLeo does not: at initialisation the tiny LayerScale leaves every CLS token
    within ~1e-5 of the others, a distance below bf16's resolution, so only its finiteness is checked.)"""
    from dinov3_fast.train.parallelize import shards_single_process
    cfg = apply_overrides(get_preset("debug"), [f"train.output_dir={tmp_path}", "train.steps=3", "train.log_every=1",
                                                "checkpointing.period=-1", "evaluation.knn_val_samples=0",
                                                "train.device=cpu"])
    assert not shards_single_process(cfg, "cuda")  # the debug preset trains in fp32
    bf16 = apply_overrides(cfg, ["compute_precision.param_dtype=bf16"])
    assert shards_single_process(bf16, "cuda") and not shards_single_process(bf16, "cpu")
    assert not shards_single_process(apply_overrides(bf16, ["compute_precision.single_rank_fsdp=false"]), "cuda")
    plain, plain_sharded = _train_logs(cfg)
    assert not plain_sharded and not dist.is_initialized()  # a CPU process makes no group of its own
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            one_rank, one_rank_sharded = _train_logs(cfg)
            low, _ = _train_logs(bf16)
            # FSDP2's returned-a-view warning is silenced for our blocks and backbone only
            warnings.warn("FSDP2-wrapped module (FSDPUserModule) returned a view tensor.", UserWarning)
    finally:
        dist.destroy_process_group()
    views = [str(w.message) for w in caught if "returned a view" in str(w.message)]
    assert views == ["FSDP2-wrapped module (FSDPUserModule) returned a view tensor."], views
    assert one_rank_sharded and len(one_rank) == len(plain) == len(low) == 3
    for got, want in zip(one_rank, plain):
        assert got["total_loss"] == pytest.approx(want["total_loss"], rel=1e-5), (one_rank, plain)
    for got, want in zip(low, plain):
        for k in ("dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss"):
            assert got[k] == pytest.approx(want[k], rel=1e-2), (k, got, want)
        assert torch.isfinite(torch.tensor(got["koleo_loss"]))
    assert low[0]["koleo_loss"] != plain[0]["koleo_loss"]  # so the bf16 casts did happen
