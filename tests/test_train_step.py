"""Trainer parts: config, schedules, parameter groups, masking, augmentation, and one SSL step
through the fused ops against the same step through the reference ops."""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinov3_fast.train.augment import MultiCropAugmentation
from dinov3_fast.train.config import apply_overrides, get_preset, load_config, save_config, update_config, validate
from dinov3_fast.train.data import ImageFolder, SyntheticShapes, synthetic_batch
from dinov3_fast.train.masking import MaskingGenerator, mask_counts, mask_metadata, sample_masks
from dinov3_fast.train.meta_arch import SSLMetaArch
from dinov3_fast.train.optim import apply_schedule, build_optimizer, param_groups
from dinov3_fast.train.schedules import Schedules, WarmupCosine, loss_weight_schedules


def _batch(cfg, n_images=8, seed=0):
    return synthetic_batch(cfg, n_images, seed)


def _arch(cfg, seed=0):
    torch.manual_seed(seed)
    arch = SSLMetaArch(cfg)
    arch.init_weights()
    with torch.no_grad():  # move off the symmetric init, so KoLeo's neighbours are well separated
        for p in arch.student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    arch.teacher.load_state_dict(arch.student.state_dict())
    return arch.train()


@pytest.mark.parametrize("gram", [False, True])
def test_ssl_step_fused_matches_reference(gram):
    base = get_preset("debug")
    extra = ["gram.use_loss=true", "gram.it_load_ema_teacher=0", "crops.gram_teacher_crops_size=64"] if gram else []
    batch = _batch(apply_overrides(base, extra))
    out = {}
    for ops in ("fused", "reference"):
        cfg = apply_overrides(base, [f"train.ops={ops}", *extra])
        arch = _arch(cfg)
        if gram:
            arch.gram_load_ema_teacher()
        torch.manual_seed(1)  # RoPE coordinate jitter draws
        loss, logs = arch.forward_backward(batch, teacher_temp=0.05)
        grads = {n: p.grad.clone() for n, p in arch.student.named_parameters() if p.grad is not None}
        out[ops] = (loss, logs, grads)
    (lf, df, gf), (lr_, dr, gr) = out["fused"], out["reference"]
    assert torch.isfinite(lf) and set(df) == set(dr)
    assert ("gram_loss" in df) == gram
    for k in dr:
        assert torch.allclose(df[k], dr[k], rtol=1e-5, atol=1e-6), (k, df[k], dr[k])
    assert torch.allclose(lf, lr_, rtol=1e-5)
    assert set(gf) == set(gr) and len(gr) > 20
    for k in gr:
        err = ((gf[k] - gr[k]).norm() / gr[k].norm().clamp(min=1e-12)).item()
        assert err < 1e-4, (k, err)


@pytest.mark.parametrize("ops", ["fused", "reference"])
@pytest.mark.parametrize("global_ignore_diagonal", [True, False])
def test_total_loss_is_dinov3s_weighted_sum_of_the_logged_terms(ops, global_ignore_diagonal):
    """The step's total loss is DINOv3's weighted sum of the terms it logs, the expression of
    ssl_meta_arch.SSLMetaArch.compute_losses (facebookresearch/dinov3) written out here: the fused
    and reference steps share SSLMetaArch.compute_losses, so test_ssl_step_fused_matches_reference
    cannot see a wrong weight. Every weight is off its default and off 1, so that a dropped or
    swapped factor shows:
        dino_local_scale  = local_terms / (global_terms + local_terms),  local_terms = n_global * n_local
        dino_global_scale = global_terms / (global_terms + local_terms),
        global_terms = n_global * (n_global - 1) with dino.global_ignore_diagonal, else n_global ** 2
        loss = dino.loss_weight * dino_local_scale * local_weight * dino_local_crops_loss
             + dino.loss_weight * dino_global_scale * dino_global_crops_loss
             + dino.koleo_loss_weight * n_global * koleo_loss
             + ibot.loss_weight * ibot_loss
             + gram_loss * gram_loss_weight
    with local_weight DINOv3's local_loss_weight_schedule value (dino.reweight_dino_local_loss)."""
    weights = dict(dino=1.3, koleo=0.3, ibot=0.7, gram=0.6, local=0.8)
    cfg = apply_overrides(get_preset("debug"), [
        f"train.ops={ops}", "gram.use_loss=true", "gram.it_load_ema_teacher=0", "crops.gram_teacher_crops_size=64",
        f"dino.global_ignore_diagonal={str(global_ignore_diagonal).lower()}",
        f"dino.loss_weight={weights['dino']}", f"dino.koleo_loss_weight={weights['koleo']}",
        f"ibot.loss_weight={weights['ibot']}", f"gram.loss_weight={weights['gram']}",
        "dino.reweight_dino_local_loss=true",
        f"dino.local_loss_weight_schedule={{start: {weights['local']}, peak: {weights['local']}, "
        f"end: {weights['local']}}}"])
    arch = _arch(cfg)
    arch.gram_load_ema_teacher()
    batch = _batch(cfg)
    loss, logs = arch.forward_backward(batch, teacher_temp=0.05)
    assert logs["dino_local_loss_weight"].item() == pytest.approx(weights["local"], rel=1e-7)  # logged in fp32
    assert logs["gram_loss_weight"].item() == pytest.approx(weights["gram"], rel=1e-7)
    n_global, n_local = batch.global_crops.shape[0], batch.local_crops.shape[0]
    assert (n_global, n_local) == (2, cfg.crops.local_crops_number)  # DINOv3: always 2 global crops
    global_terms = n_global * (n_global - 1) if global_ignore_diagonal else n_global**2
    local_terms = n_global * n_local
    term = {k: v.double() for k, v in logs.items()}
    want = (weights["dino"] * local_terms / (global_terms + local_terms) * term["dino_local_loss_weight"]
            * term["dino_local_crops_loss"]
            + weights["dino"] * global_terms / (global_terms + local_terms) * term["dino_global_crops_loss"]
            + weights["koleo"] * n_global * term["koleo_loss"]
            + weights["ibot"] * term["ibot_loss"]
            + term["gram_loss"] * term["gram_loss_weight"])
    assert all(term[k].abs() > 1e-3 for k in ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss",
                                               "ibot_loss", "gram_loss"))  # every term weighs in
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("ops", ["fused", "reference"])
def test_teacher_targets_are_freed_before_the_backward_with_fused_head_losses(ops):
    """The fused head losses consume the teacher's targets (and never form the student logits),
    so by the time the backward starts nothing holds them: the memory planner counts them up to
    the end of the forward only. The reference DINO loss's einsum keeps its targets for the backward
    (its iBOT loss keeps a weighted copy instead), which is what makes the check able to fail."""
    from torch.multiprocessing.reductions import StorageWeakRef
    cfg = apply_overrides(get_preset("debug"), [f"train.ops={ops}"])
    arch = _arch(cfg)
    refs, alive_at_backward = [], []
    get_teacher_output, compute_losses = arch.get_teacher_output, arch.compute_losses

    def teacher_output(*args, **kwargs):
        out = get_teacher_output(*args, **kwargs)
        refs.extend(StorageWeakRef(out[k].untyped_storage()) for k in ("cls_centered", "masked_patch_centered"))
        return out

    def losses(*args, **kwargs):
        loss, logs = compute_losses(*args, **kwargs)
        loss.register_hook(lambda g: alive_at_backward.append([not r.expired() for r in refs]))
        return loss, logs

    arch.get_teacher_output, arch.compute_losses = teacher_output, losses
    arch.forward_backward(_batch(cfg), teacher_temp=0.05)
    dino_alive, ibot_alive = alive_at_backward[0]
    assert len(alive_at_backward) == 1 and dino_alive == (ops == "reference")
    assert not ibot_alive


@pytest.mark.parametrize("gram", [False, True], ids=["no_gram", "gram_on_masked_tokens"])
def test_ssl_step_without_masked_patch(gram):
    """No masked patch anywhere (e.g. ibot.mask_sample_probability * 2B < 1): Sinkhorn gets (0, K),
    iBOT is 0, and the iBOT head still gets (zero) gradients. A Gram loss on the masked tokens
    (gram.tokens_used=masked) sees no token: it is 0, not an error."""
    cfg = get_preset("debug")
    if gram:
        cfg = apply_overrides(cfg, ["gram.use_loss=true", "gram.it_load_ema_teacher=0", "gram.tokens_used=masked",
                                    "gram.img_level=false", "crops.gram_teacher_crops_size=64"])
    batch = _batch(cfg)
    batch = batch.with_masks(torch.zeros_like(batch.masks))
    arch = _arch(cfg)
    if gram:
        arch.gram_load_ema_teacher()  # the Gram teacher loads the EMA teacher (it_load_ema_teacher=0)
    loss, logs = arch.forward_backward(batch, teacher_temp=0.05)
    assert torch.isfinite(loss) and logs["ibot_loss"].item() == 0.0
    assert logs.get("gram_loss", torch.tensor(0.0)).item() == 0.0 and ("gram_loss" in logs) == gram
    grads = [p.grad for p in arch.student.ibot_head.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)
    assert all(torch.isfinite(p.grad).all() for p in arch.student.parameters() if p.grad is not None)


@pytest.mark.parametrize("used", ["masked", "unmasked"])
def test_gram_token_selection_is_dinov3s_boolean_index(used):
    """gram.tokens_used gathers by index (no host sync); the tokens and their order are DINOv3's
    `x[masks]` / `x[~masks]` on the [2B, HW, D] patch features."""
    cfg = apply_overrides(get_preset("debug"), ["gram.use_loss=true", "gram.ema_teacher=true", "gram.rep_update=false",
                                                "crops.gram_teacher_crops_size=null", f"gram.tokens_used={used}"])
    arch = SSLMetaArch(cfg)
    masks = torch.rand(2 * 3, 16) < 0.4
    mask_indices, _, _ = mask_metadata(masks)
    student, teacher = (torch.randn(2, 3, 16, 5) for _ in range(2))
    out = arch.get_gram_teacher_output(None, masks=masks, mask_indices=mask_indices,
                                       teacher_global={"patch_pre_head": teacher},
                                       student_global={"patch_pre_head": student}, student_crop_size=32)
    keep = masks if used == "masked" else ~masks
    assert torch.equal(out["student_patches"], student.flatten(0, 1)[keep])
    assert torch.equal(out["teacher_patches"], teacher.flatten(0, 1)[keep])


def test_autocast_covers_the_forward_only():
    """forward_backward runs the forward under the autocast it is given and the backward outside
    it, as torch advises (the trainer's non-FSDP path on a GPU passes one)."""
    cfg = get_preset("debug")
    arch = _arch(cfg)
    seen = {"forward": [], "backward": []}
    block = arch.student.backbone.blocks[0]
    block.register_forward_hook(lambda *_: seen["forward"].append(torch.is_autocast_enabled("cpu")))
    next(block.parameters()).register_hook(lambda g: seen["backward"].append(torch.is_autocast_enabled("cpu")))
    loss, _ = arch.forward_backward(_batch(cfg), teacher_temp=0.05, autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    assert torch.isfinite(loss)
    assert seen["forward"] and all(seen["forward"])
    assert seen["backward"] and not any(seen["backward"])


def test_ema_update_and_gram_refresh():
    cfg = apply_overrides(get_preset("debug"), ["gram.use_loss=true", "gram.it_load_ema_teacher=0",
                                                "crops.gram_teacher_crops_size=64"])
    arch = _arch(cfg)
    t0 = [p.clone() for p in arch.teacher.parameters()]
    with torch.no_grad():
        for p in arch.student.parameters():
            p.add_(1.0)
    arch.update_ema(0.9)
    for p0, p, s in zip(t0, arch.teacher.parameters(), arch.student.parameters()):
        torch.testing.assert_close(p, 0.9 * p0 + 0.1 * s)
    assert not arch.gram_teacher_initialized
    arch.gram_load_ema_teacher()
    assert arch.gram_teacher_initialized
    for g, t in zip(arch.gram_teacher.backbone.parameters(), arch.teacher.backbone.parameters()):
        assert torch.equal(g, t)


def test_meta_init_leaves_no_nan_in_gram_teacher():
    """Multi-GPU runs build on meta, to_empty (garbage, here NaN, in every tensor), then init: the Gram
    teacher's parameters and buffers (rope periods, qkv bias_mask) must all be defined, at init and after a
    load of the EMA teacher, which must be plain copies (g * 0 + t keeps NaN)."""
    cfg = apply_overrides(get_preset("debug"), ["gram.use_loss=true", "gram.it_load_ema_teacher=0",
                                                "crops.gram_teacher_crops_size=64", "student.mask_k_bias=true"])
    arch = SSLMetaArch(cfg, device="meta")
    arch.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*arch.parameters(), *arch.buffers()]:
            if t.is_floating_point():
                t.fill_(float("nan"))
    buffers = dict(arch.gram_teacher.backbone.named_buffers())
    assert any(k.endswith("rope_embed.periods") for k in buffers)
    assert any(k.endswith("qkv.bias_mask") for k in buffers)
    arch.init_weights()

    def check():
        for name, t in arch.gram_teacher.state_dict().items():
            assert not t.isnan().any(), name
        teacher = arch.teacher.backbone.state_dict()
        for name, t in arch.gram_teacher.backbone.state_dict().items():
            assert torch.equal(t, teacher[name]), name

    check()
    assert not arch.gram_teacher_initialized
    with torch.no_grad():  # the Gram teacher holds NaN again; a load must overwrite it, not scale it
        for t in arch.gram_teacher.parameters():
            t.fill_(float("nan"))
        for p in arch.teacher.parameters():
            p.add_(0.5)
    arch.gram_load_ema_teacher()
    assert arch.gram_teacher_initialized
    check()
    with torch.no_grad():
        for t in arch.gram_teacher.parameters():
            t.fill_(float("nan"))
    arch.gram_load_ema_teacher()
    check()



def test_sharded_meta_init_defines_every_tensor():
    """What a GPU run does (build on meta, shard -- on one GPU over a 1-rank group --, to_empty,
    init_weights), here on a 1-rank gloo group: after NaN in every parameter and buffer shard,
    init_weights defines them all, and the teacher starts as a copy of the student."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from dinov3_fast.train.parallelize import parallelize
    cfg = apply_overrides(get_preset("debug"), ["gram.use_loss=true", "crops.gram_teacher_crops_size=64"])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        arch = SSLMetaArch(cfg, device="meta")
        parallelize(arch, ac="selective", param_dtype=torch.bfloat16, shard=True)
        arch.to_empty(device="cpu")

        def local(t):
            return t.to_local() if isinstance(t, DTensor) else t
        with torch.no_grad():
            for t in [*arch.parameters(), *arch.buffers()]:
                if t.is_floating_point():
                    local(t).fill_(float("nan"))
        arch.init_weights()
        assert isinstance(next(arch.student.backbone.parameters()), DTensor)
        for name, t in arch.state_dict().items():
            assert not local(t).isnan().any(), name
        teacher = arch.teacher.state_dict()
        for name, t in arch.student.state_dict().items():
            assert torch.equal(local(t), local(teacher[name])), name
    finally:
        dist.destroy_process_group()

def test_schedules_follow_dinov3():
    cfg = apply_overrides(get_preset("debug"), ["optim.lr=0.01", "optim.min_lr=0.001", "optim.warmup_epochs=0.2",
                                                "optim.freeze_last_layer_epochs=0.1", "train.OFFICIAL_EPOCH_LENGTH=100",
                                                "optim.epochs=1", "teacher.warmup_teacher_temp_epochs=0.3"])
    s = Schedules(cfg)

    def cosine_scheduler(base, final, total, warmup=0, start=0.0):  # DINOv3's CosineScheduler, as numpy
        iters = np.arange(total - warmup)
        return np.concatenate([np.linspace(start, base, warmup),
                               final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))])

    lr = cosine_scheduler(0.01, 0.001, 100, 20)
    last_layer_lr = lr.copy()
    last_layer_lr[:10] = 0
    wd = cosine_scheduler(cfg.optim.weight_decay, cfg.optim.weight_decay_end, 100)
    mom = cosine_scheduler(0.99, 0.999, 100)
    temp = np.linspace(0.04, 0.07, 30)  # total_iters = warmup_iters: the warmup alone
    for it in range(100):
        assert s.lr(it) == pytest.approx(lr[it], rel=1e-12, abs=1e-15), it
        assert s.last_layer_lr(it) == pytest.approx(last_layer_lr[it], rel=1e-12, abs=1e-15), it
        assert s.weight_decay(it) == pytest.approx(wd[it], rel=1e-12), it
        assert s.momentum(it) == pytest.approx(mom[it], rel=1e-12), it
        assert s.teacher_temp(it) == pytest.approx(temp[it] if it < 30 else 0.07, rel=1e-12), it
    assert s.lr(19) == pytest.approx(0.01) and s.teacher_temp(29) == pytest.approx(0.07)  # peak at the warmup's end
    assert s.lr(100) == pytest.approx(0.001) and s.momentum(100) == pytest.approx(0.999)
    const = Schedules(apply_overrides(cfg, ["optim.schedule=constant"]))
    assert const.lr(20) == const.lr(99) == pytest.approx(0.01)
    sq = Schedules(apply_overrides(cfg, ["optim.scaling_rule=sqrt_wrt_1024", "train.batch_size_per_gpu=64"]), world_size=4)
    assert sq.lr(20) == pytest.approx(0.01 * 4 * math.sqrt(256 / 1024))  # DINOv3: lr *= 4 * sqrt(B / 1024)
    vitl = get_preset("vitl16_h100")  # DINOv3's default lr 1e-3; batch 64 x 32 = 2048: 1e-3 * 4 * sqrt(2)
    assert vitl.optim.weight_decay == 0.04 and vitl.optim.weight_decay_end == 0.4  # DINOv3's defaults
    assert vitl.optim.lr == 1e-3 and Schedules(vitl, world_size=32).lr.base_value == pytest.approx(4e-3 * math.sqrt(2))


def test_vit7b16_preset_follows_dinov3_yaml():
    """Values of dinov3/configs/train/dinov3_vit7b16_pretrain.yaml (its v2 `schedules:` as constants)."""
    cfg = get_preset("vit7b16")
    o, t, d = cfg.optim, cfg.teacher, cfg.dino
    assert (o.epochs, cfg.train.OFFICIAL_EPOCH_LENGTH, cfg.total_steps) == (1000, 1000, 1_000_000)
    assert (o.lr, o.warmup_epochs, o.freeze_last_layer_epochs, o.scaling_rule) == (5e-5, 100, 5, "sqrt_wrt_1024")
    assert (o.weight_decay, o.weight_decay_end, o.clip_grad, o.layerwise_decay, o.adamw_beta2) == (0.04, 0.04, 30.0,
                                                                                                     0.98, 0.99)
    assert (t.momentum_teacher, t.final_momentum_teacher) == (0.994, 0.994)
    assert (t.warmup_teacher_temp, t.teacher_temp, t.warmup_teacher_temp_epochs) == (0.04, 0.07, 100)
    assert not cfg.crops.horizontal_flips
    assert (d.koleo_loss_distributed, d.koleo_topk, d.koleo_distributed_loss_group_size) == (False, 1, None)
    assert cfg.train.batch_size_per_gpu == 16 and cfg.student.norm_layer == "layernormbf16"
    s = Schedules(cfg, world_size=256)  # global batch 4096: peak 5e-5 * 4 * sqrt(4)
    # its v2 schedules' warmup leaves out the endpoint: the peak is first reached at iteration 100k
    assert s.lr(100_000) == s.lr(500_000) == pytest.approx(4e-4) and s.lr(99_999) < 4e-4
    assert s.last_layer_lr(4_999) == 0 and s.last_layer_lr(5_000) == s.lr(5_000) > 0
    assert s.momentum(0) == s.momentum(999_999) == pytest.approx(0.994)
    assert s.teacher_temp(0) == pytest.approx(0.04) and s.teacher_temp(100_000) == pytest.approx(0.07)
    assert s.weight_decay(0) == s.weight_decay(999_999) == pytest.approx(0.04)


def test_param_groups_decay_and_multipliers():
    cfg = apply_overrides(get_preset("debug"), ["optim.layerwise_decay=0.5", "optim.patch_embed_lr_mult=0.2"])
    arch = SSLMetaArch(cfg)
    groups = param_groups(cfg, arch.student)
    by_name = {n: g for g in groups for n in g["names"]}
    depth = cfg.student.depth
    assert by_name["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.5 ** (depth + 1) * 0.2)
    assert by_name["backbone.cls_token"]["lr_multiplier"] == pytest.approx(0.5 ** (depth + 1))
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.5**depth)
    assert by_name[f"backbone.blocks.{depth - 1}.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(0.5)
    assert by_name["backbone.norm.weight"]["lr_multiplier"] == 1.0
    for n in ("backbone.blocks.0.norm1.weight", "backbone.blocks.0.attn.qkv.bias", "backbone.blocks.0.ls1.gamma",
              "dino_head.mlp.0.bias"):
        assert by_name[n]["wd_multiplier"] == 0.0, n
    for n in ("backbone.blocks.0.attn.qkv.weight", "dino_head.mlp.0.weight", "backbone.cls_token"):
        assert by_name[n]["wd_multiplier"] == 1.0, n
    assert by_name["dino_head.last_layer.weight"]["is_last_layer"] and not by_name["dino_head.mlp.0.weight"]["is_last_layer"]
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in arch.student.parameters())
    opt = build_optimizer(cfg, arch.student)
    s = Schedules(cfg).at(3)
    apply_schedule(opt, s)
    g = next(g for g in opt.param_groups if "backbone.patch_embed.proj.weight" in g["names"])
    assert g["lr"] == pytest.approx(s.lr * 0.5 ** (depth + 1) * 0.2) and g["weight_decay"] == pytest.approx(s.weight_decay)


def test_masks_follow_dinov3_ratios():
    gen = MaskingGenerator((8, 8), max_num_patches=32, rng=random.Random(0))
    for n in (0, 1, 5, 20, 32):
        assert int(gen(n).sum()) == n
    masks = sample_masks(20, (8, 8), (0.1, 0.5), 0.5, gen)
    counts = masks.sum(1)
    assert masks.shape == (20, 64) and (counts > 0).sum() == 10 and (counts == 0).sum() == 10
    # DINOv3's collate: the i-th masked image gets int(64 * r[i + 1]), r = linspace(0.1, 0.5, 11),
    # the top of its band, with no draw (DINOv2 drew a ratio within the band)
    probs = torch.linspace(0.1, 0.5, 11)
    want = [int(64 * probs[i + 1]) for i in range(10)]  # DINOv3's expression, in float32
    assert want == [8, 11, 14, 16, 19, 21, 24, 26, 29, 32]
    assert sorted(c for c in counts.tolist() if c > 0) == want
    assert mask_counts(20, 64, (0.1, 0.5), 0.5) == want
    assert sorted(sample_masks(20, (8, 8), (0.1, 0.5), 0.5, gen).sum(1).tolist())[10:] == want  # every draw
    idx, w, n = mask_metadata(masks)
    assert n.item() == idx.numel() == counts.sum()
    torch.testing.assert_close(w.sum(), torch.tensor(10.0))  # each masked image's weights sum to 1


def test_augmentation_shapes_range_and_determinism():
    cfg = apply_overrides(get_preset("debug"), ["crops.gram_teacher_crops_size=64"])
    images, _ = SyntheticShapes(48).batch(torch.arange(6))
    aug = MultiCropAugmentation(cfg.crops)
    a = aug(images, torch.Generator().manual_seed(3))
    b = aug(images, torch.Generator().manual_seed(3))
    assert a.global_crops.shape == (2, 6, 3, 32, 32) and a.local_crops.shape == (2, 6, 3, 16, 16)
    assert a.gram_crops.shape == (2, 6, 3, 64, 64)
    assert torch.equal(a.global_crops, b.global_crops) and torch.isfinite(a.local_crops).all()
    mean = torch.tensor(cfg.crops.rgb_mean).view(3, 1, 1)
    std = torch.tensor(cfg.crops.rgb_std).view(3, 1, 1)
    for crops in (a.gram_crops, a.local_crops):
        raw = crops * std + mean
        assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    # the global crops are the normalised 64 px view resized, unclamped as in DINOv3: bicubic overshoots a little
    raw = a.global_crops * std + mean
    assert raw.min() >= -0.02 and raw.max() <= 1.02
    c = aug(images, torch.Generator().manual_seed(4))
    assert not torch.equal(a.global_crops, c.global_crops)


def test_gram_crops_are_distorted_at_the_gram_size_then_resized():
    """DINOv3 crops each global view once at max(global, Gram size) = 64 px. With the distortions
    shared, colour jitter, blur and solarisation run there and the student crop is that view
    resized to 32 px (bicubic, antialiased), exactly; blurring the student crop at 32 px instead (a
    kernel of 9 taps covers twice as much of it) missed by 0.7-2% of the range. Without the
    distortions (gram_teacher_no_distortions) the Gram crop is the plain view, ~11% off."""
    images, _ = SyntheticShapes(48).batch(torch.arange(16))
    diffs = {}
    for plain in (False, True):
        cfg = apply_overrides(get_preset("debug"), ["crops.gram_teacher_crops_size=64",
                                                    f"crops.gram_teacher_no_distortions={plain}"])
        crops = MultiCropAugmentation(cfg.crops)(images, torch.Generator().manual_seed(3))
        resized = F.interpolate(crops.gram_crops.flatten(0, 1), size=(32, 32), mode="bicubic",
                                align_corners=False, antialias=True).view_as(crops.global_crops)
        std = torch.tensor(cfg.crops.rgb_std).view(1, 1, 3, 1, 1)
        diffs[plain] = ((resized - crops.global_crops) * std).abs().mean((1, 2, 3, 4))  # per crop, in [0, 1] units
    assert diffs[False].max() < 1e-6 and diffs[True].min() > 0.05, diffs


def test_synthetic_labels_are_learnable_structure():
    src = SyntheticShapes(32, num_classes=8, seed=0)
    x1, y1 = src.batch(torch.arange(64))
    x2, y2 = src.batch(torch.arange(64))
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and len(set(y1.tolist())) == 8
    assert x1.min() >= 0 and x1.max() <= 1


def test_batch_shard_and_divisibility():
    cfg = get_preset("debug")
    batch = _batch(cfg, n_images=6)
    part = batch.shard(1, 3)
    assert part.global_crops.shape[1] == 2 and torch.equal(part.masks, batch.masks[:, 2:4])
    with pytest.raises(ValueError, match="does not split over 4 ranks"):
        batch.shard(0, 4)
    bad = apply_overrides(cfg, ["dino.koleo_loss_distributed=true", "dino.koleo_distributed_loss_group_size=24",
                                "train.batch_size_per_gpu=16"])
    with pytest.raises(ValueError, match="koleo_distributed_loss_group_size"):
        validate(bad, world_size=2)


def test_config_errors_and_yaml(tmp_path):
    cfg = get_preset("debug")
    with pytest.raises(ValueError, match="unknown arch 'vit_nope'"):
        validate(apply_overrides(cfg, ["student.arch=vit_nope"]))
    with pytest.raises(ValueError, match=r"crops.global_crops_size \(36\) must be a positive multiple"):
        validate(apply_overrides(cfg, ["crops.global_crops_size=36"]))
    with pytest.raises(ValueError, match="unknown config key optim.lrr"):
        apply_overrides(cfg, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")
    with pytest.raises(ValueError, match="train.ac must be one of"):
        validate(apply_overrides(cfg, ["train.ac=some"]))
    path = tmp_path / "c.yaml"
    save_config(apply_overrides(cfg, ["optim.lr=0.123"]), path)
    assert load_config(path, base="vitl16_h100") == apply_overrides(cfg, ["optim.lr=0.123"])
    assert update_config(cfg, {"train": {"checkpointing": True}}).train.ac == "selective"  # DINOv3's AC flag
    for name in ("debug", "cpu", "vitl16_h100", "vit7b16"):
        validate(get_preset(name), world_size=8)


@pytest.mark.parametrize("key", ["param_dtype", "reduce_dtype"])
def test_fp16_is_rejected_with_a_bf16_hint(key):
    """The loop has no GradScaler, so fp16 would underflow gradients silently: refused up front."""
    cfg = apply_overrides(get_preset("debug"), [f"compute_precision.{key}=fp16"])
    with pytest.raises(ValueError, match=rf"compute_precision.{key}=fp16 is not supported: .*loss scaling.*use bf16"):
        validate(cfg)
    with pytest.raises(ValueError, match=rf"compute_precision.{key} must be one of \('fp32', 'bf16'\), got 'fp8'"):
        validate(apply_overrides(get_preset("debug"), [f"compute_precision.{key}=fp8"]))
    validate(apply_overrides(get_preset("debug"), [f"compute_precision.{key}=bf16"]))


def test_image_folder(tmp_path):
    with pytest.raises(ValueError, match="contains no images"):
        ImageFolder(tmp_path, 32)
    from PIL import Image
    for i, cls in enumerate(("a", "a", "b")):
        (tmp_path / cls).mkdir(exist_ok=True)
        Image.new("RGB", (40 + 10 * i, 30), (50 * i, 100, 200)).save(tmp_path / cls / f"{i}.png")
    folder = ImageFolder(tmp_path, 24)
    images, labels, extents = folder.batch_with_extents(torch.arange(4))
    assert images.shape == (4, 3, 24, 48) and labels.tolist() == [0, 0, 1, 0]
    assert extents.tolist() == [[24, 32], [24, 40], [24, 48], [24, 32]]  # short side 24, aspect kept
    assert images[2, 0].mean().item() == pytest.approx(100 / 255, abs=0.01)


def _dinov3_linear_warmup_cosine_decay(start, peak, end, warmup_iterations, total_iterations, cosine_iterations=None):
    """DINOv3's dinov3/train/cosine_lr_scheduler.py, as the oracle."""
    linear = np.linspace(start, peak, warmup_iterations, endpoint=False)
    if cosine_iterations is None:
        cosine_iterations = total_iterations - warmup_iterations
    cosine = (peak - end) * (np.cos(np.linspace(0, np.pi, cosine_iterations)) + 1) / 2 + end
    constant = np.full((total_iterations - cosine_iterations - warmup_iterations,), fill_value=end)
    return np.concatenate([linear, cosine, constant])


@pytest.mark.parametrize("args", [(1.0, 1.0, 0.5, 10, 100, None), (0.0, 2.0, 0.1, 7, 60, 20),
                                  (0.5, 0.5, 0.5, 0, 30, None), (0.3, 1.0, 0.2, 0, 25, 1)])
def test_loss_weight_schedule_is_dinov3s(args):
    start, peak, end, warmup, total, cosine = args
    want = _dinov3_linear_warmup_cosine_decay(*args)
    sched = WarmupCosine(start, peak, end, warmup, cosine if cosine is not None else total - warmup)
    got = [sched(i) for i in range(total)]
    assert got == pytest.approx(want.tolist(), rel=1e-12, abs=1e-12)
    assert sched(total + 5) == end


def test_loss_weight_schedules_reweight_the_step(tmp_path):
    extra = ["gram.use_loss=true", "gram.it_load_ema_teacher=0", "crops.gram_teacher_crops_size=64"]
    base = apply_overrides(get_preset("debug"), extra)
    assert loss_weight_schedules(base) == (None, None)
    sched = ["dino.reweight_dino_local_loss=true",
             "dino.local_loss_weight_schedule={start: 1.0, peak: 1.0, end: 0.5, warmup_epochs: 0.2, "
             "cosine_epochs: 0.5}",
             "gram.loss_weight_schedule={start: 0.0, peak: 2.0, end: 1.0, warmup_epochs: 0.4}"]
    cfg = apply_overrides(base, sched)
    local, gram = loss_weight_schedules(cfg)  # epoch length 50: warmup 10, cosine 25; Gram warmup 20, cosine 30
    assert (local.warmup_iters, local.cosine_iters, gram.warmup_iters, gram.cosine_iters) == (10, 25, 20, 30)
    assert local(0) == 1.0 and local(34) == pytest.approx(0.5) and local(49) == 0.5
    assert gram(10) == pytest.approx(1.0) and gram(20) == 2.0 and gram(49) == pytest.approx(1.0)
    path = tmp_path / "c.yaml"  # nested schedules survive a YAML round trip, in DINOv3's layout
    save_config(cfg, path)
    assert load_config(path, base="debug") == cfg
    with pytest.raises(ValueError, match="unknown config key dino.local_loss_weight_schedule.peek"):
        apply_overrides(base, ["dino.local_loss_weight_schedule={start: 1, peek: 1, end: 1}"])
    with pytest.raises(ValueError, match=r"needs the keys \['end'\]"):
        apply_overrides(base, ["gram.loss_weight_schedule={start: 1, peak: 1}"])
    with pytest.raises(ValueError, match="warmup_epochs must be >= 0"):
        validate(apply_overrides(cfg, ["gram.loss_weight_schedule={start: 1, peak: 1, end: 1, warmup_epochs: -1}"]))
    batch = _batch(base)
    out = {}
    for name, c in (("plain", base), ("scheduled", cfg)):
        arch = _arch(c)
        arch.gram_load_ema_teacher()
        torch.manual_seed(1)
        out[name] = arch.forward_backward(batch, teacher_temp=0.05, iteration=30)
    (l0, d0), (l1, d1) = out["plain"], out["scheduled"]
    for k in ("dino_local_crops_loss", "gram_loss", "ibot_loss"):
        torch.testing.assert_close(d1[k], d0[k])
    w_local, w_gram = local(30), gram(30)
    assert d0["dino_local_loss_weight"].item() == 1.0 and d1["dino_local_loss_weight"].item() == pytest.approx(w_local)
    assert d0["gram_loss_weight"].item() == 1.0 and d1["gram_loss_weight"].item() == pytest.approx(w_gram)
    n_local = cfg.crops.local_crops_number
    local_scale = 2 * n_local / (2 + 2 * n_local)  # DINOv3's term scale: local pairs / (global pairs + local pairs)
    want = l0 - local_scale * (1 - w_local) * d0["dino_local_crops_loss"] - (1 - w_gram) * d0["gram_loss"]
    torch.testing.assert_close(l1, want, rtol=1e-5, atol=1e-6)


def test_batch_carries_the_mask_metadata_made_on_the_cpu():
    """make_batch computes the iBOT mask metadata with the masks on the CPU (DINOv3's collate), so
    the step needs no nonzero on the device; it equals what the step would compute, and a batch
    with other masks or a shard recomputes it."""
    cfg = get_preset("debug")
    batch = _batch(cfg)
    want = mask_metadata(batch.masks.flatten(0, 1))
    for got, ref in zip((batch.mask_indices, batch.masks_weight, batch.n_masked), want, strict=True):
        assert torch.equal(got, ref)
    assert batch.shard(0, 2).mask_indices is None and batch.with_masks(batch.masks).n_masked is None
    arch = _arch(cfg)
    torch.manual_seed(0)
    loss, _ = arch.forward_backward(batch, teacher_temp=0.05)
    arch.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    again, _ = arch.forward_backward(batch.with_masks(batch.masks), teacher_temp=0.05)
    assert torch.equal(loss, again)
