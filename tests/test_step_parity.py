"""One SSL step against DINOv3's computation restated here in plain torch, in fp64.

The oracle below is written from DINOv3's source (facebookresearch/dinov3:
dinov3/train/ssl_meta_arch.py `forward_backward`, `get_teacher_output`, `get_student_output`,
`get_gram_teacher_output`, `compute_losses`; dinov3/loss/*.py; dinov3/data/collate.py and
masking.py; dinov3/train/train.py for the mask generator's arguments). It uses only the models'
modules (backbones, the heads' MLPs and last-layer weights) and plain torch: every centring,
cross-entropy, crop pairing, token selection, mask weighting, resize and term weight is its own.
tests/test_train_step.py already checks fused against reference ops, the weighted sum of the
logged terms and the Gram token gather; this file checks each term (and the student's gradients)
against DINOv3's definitions, with the teacher, the Gram teacher and the student all different
models, so that a target taken from the wrong model, crop or token shows (checked by breaking the
step on purpose: softmax instead of Sinkhorn centring, Gram targets from the EMA teacher, iBOT
averaged over tokens instead of per image over 2B, unmasked student crops, a KoLeo without
gradient: each fails every case it applies to).
"""
import random

import pytest
import torch
import torch.nn.functional as F

from dinov3_fast.train.config import apply_overrides, get_preset
from dinov3_fast.train.data import synthetic_batch
from dinov3_fast.train.masking import MaskingGenerator, dinov3_max_num_patches, mask_metadata, sample_masks
from dinov3_fast.train.meta_arch import SSLMetaArch

STUDENT_TEMP = 0.1  # DINOv3's DINOLoss / iBOTPatchLoss default


# ----------------------------------------------------------------------------- DINOv3, restated

def _head(head, x):
    """DINOHead: MLP, L2-normalise (eps 1e-12), bias-free last layer."""
    return F.linear(F.normalize(head.mlp(x), dim=-1, p=2, eps=1e-12), head.last_layer.weight)


def _sinkhorn(logits, temp, n_samples, iters=3):
    """Sinkhorn-Knopp centring (one process): Q = exp(l / t)^T, normalised to total 1, then
    rows to 1/K and columns to 1/B three times; columns sum to 1 at the end."""
    q = torch.exp(logits / temp).t()
    k = q.shape[0]
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / n_samples
    return (q * n_samples).t()


def _dino_ce(student_logits, teacher_probs, ignore_diagonal):
    """Mean over (student crop s, teacher crop t, image b) of -sum_k p_t log softmax(z_s / 0.1),
    without the s == t pairs when ignore_diagonal."""
    s_crops, b, _ = student_logits.shape
    t_crops = teacher_probs.shape[0]
    log_p = F.log_softmax(student_logits / STUDENT_TEMP, dim=-1)
    total = 0.0
    count = 0
    for s in range(s_crops):
        for t in range(t_crops):
            if ignore_diagonal and s == t:
                continue
            total = total - (teacher_probs[t] * log_p[s]).sum()
            count += b
    return total / count


def _koleo(x, eps=1e-8):
    """KoLeo on one crop's CLS tokens: normalise, nearest other row by dot product,
    -mean log(||x_i - x_nn + eps|| + eps) (nn.PairwiseDistance(2, eps=1e-8))."""
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-1)
        nn_idx = dots.argmax(dim=1)
    dist = (x - x[nn_idx] + eps).norm(dim=-1)
    return -torch.log(dist + eps).mean()


def _gram(student, teacher, img_level, remove_neg=False, remove_only_teacher_neg=False):
    """Gram anchoring: L2-normalised features, per image or over the flattened batch, MSE of the
    two similarity matrices."""
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    if not img_level and s.dim() == 3:
        s, t = s.flatten(0, 1), t.flatten(0, 1)
    ss, ts = s @ s.transpose(-1, -2), t @ t.transpose(-1, -2)
    if remove_neg:
        ss, ts = ss.clamp(min=0), ts.clamp(min=0)
    elif remove_only_teacher_neg:
        ss = torch.where((ss < 0) & (ts < 0), torch.zeros_like(ss), ss)
        ts = ts.clamp(min=0)
    return ((ss - ts) ** 2).mean()


def dinov3_step(arch, cfg, batch, teacher_temp, local_weight=1.0):
    """DINOv3's loss terms and total for one step, on `arch`'s modules (in their dtype)."""
    dt = next(arch.parameters()).dtype
    g_crops, l_crops = batch.global_crops.to(dt), batch.local_crops.to(dt)
    n_global, b = g_crops.shape[:2]
    n_local = l_crops.shape[0]
    # the collate's mask metadata: the 2B global crops in crop-major order, like the crops
    masks = batch.masks.flatten(0, 1)                                           # [2B, HW]
    masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    n_masked = int(masks.sum())

    # teacher: the two global crops, unmasked; DINO head on CLS, iBOT head on the student-masked patches
    with torch.no_grad():
        t_out = arch.teacher.backbone(g_crops.flatten(0, 1), is_training=True)
        t_cls, t_patch = t_out["x_norm_clstoken"], t_out["x_norm_patchtokens"]
        t_dino = _sinkhorn(_head(arch.teacher.dino_head, t_cls), teacher_temp, n_global * b).unflatten(0, (n_global, b))
        t_ibot = _sinkhorn(_head(arch.teacher.ibot_head, t_patch[masks]), teacher_temp, n_masked)

    # student: masked global crops and local crops
    s_g, s_l = arch.student.backbone([g_crops.flatten(0, 1), l_crops.flatten(0, 1)], masks=[masks, None],
                                     is_training=True)
    g_cls, g_patch, l_cls = s_g["x_norm_clstoken"], s_g["x_norm_patchtokens"], s_l["x_norm_clstoken"]
    s_dino_g = _head(arch.student.dino_head, g_cls).unflatten(0, (n_global, b))
    s_dino_l = _head(arch.student.dino_head, l_cls).unflatten(0, (n_local, b))
    s_ibot = _head(arch.student.ibot_head, g_patch[masks])

    d = cfg.dino
    terms = {
        "dino_local_crops_loss": _dino_ce(s_dino_l, t_dino, ignore_diagonal=False),
        "dino_global_crops_loss": _dino_ce(s_dino_g, t_dino, ignore_diagonal=d.global_ignore_diagonal),
        "koleo_loss": sum(_koleo(x) for x in g_cls.unflatten(0, (n_global, b))) / n_global,
        # per masked token: CE weighted 1 / (its image's masked count); summed, over the 2B crops
        "ibot_loss": -((t_ibot * F.log_softmax(s_ibot / STUDENT_TEMP, dim=-1)).sum(-1) * masks_weight).sum()
        / masks.shape[0],
    }
    global_terms = n_global * (n_global - 1) if d.global_ignore_diagonal else n_global**2
    local_terms = n_global * n_local
    total = (d.loss_weight * local_terms / (global_terms + local_terms) * local_weight * terms["dino_local_crops_loss"]
             + d.loss_weight * global_terms / (global_terms + local_terms) * terms["dino_global_crops_loss"]
             + d.koleo_loss_weight * n_global * terms["koleo_loss"]
             + cfg.ibot.loss_weight * terms["ibot_loss"])

    gc = cfg.gram
    if gc.use_loss:
        student_patches = g_patch                                                  # [2B, HW, D]
        if gc.ema_teacher:
            teacher_patches = t_patch
        else:
            with torch.no_grad():
                gram_crops = batch.gram_crops.to(dt).flatten(0, 1)
                teacher_patches = arch.gram_teacher.backbone(gram_crops, is_training=True)["x_norm_patchtokens"]
                p = cfg.student.patch_size
                n_t, n_s = gram_crops.shape[-2] // p, g_crops.shape[-2] // p
                if n_t != n_s:  # [2B, P_t, D] -> [2B, D, n_t, n_t] -> resized to the student grid
                    grid = teacher_patches.transpose(-2, -1).unflatten(-1, (n_t, n_t))
                    grid = F.interpolate(grid, size=(n_s, n_s), mode=gc.global_teacher_resize_method,
                                         align_corners=False, antialias=gc.global_teacher_resize_antialias)
                    teacher_patches = grid.flatten(-2, -1).transpose(-2, -1)
        if gc.tokens_used == "masked":
            student_patches, teacher_patches = student_patches[masks], teacher_patches[masks]
        elif gc.tokens_used == "unmasked":
            student_patches, teacher_patches = student_patches[~masks], teacher_patches[~masks]
        terms["gram_loss"] = _gram(student_patches, teacher_patches, gc.img_level, gc.remove_neg,
                                   gc.remove_only_teacher_neg)
        total = total + gc.loss_weight * terms["gram_loss"]
    return total, terms


# ----------------------------------------------------------------------------- the step vs the oracle

def _build(cfg, seed=0):
    """Student, EMA teacher and Gram teacher as three different models (the teacher is the student
    plus noise, the Gram teacher the teacher plus other noise)."""
    torch.manual_seed(seed)
    arch = SSLMetaArch(cfg)
    arch.init_weights()
    with torch.no_grad():
        for p in arch.student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        arch.teacher.load_state_dict(arch.student.state_dict())
        for p in arch.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        if arch.has_gram_teacher:
            arch.gram_load_ema_teacher()
            for p in arch.gram_teacher.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return arch.train()


BASE = [  # no random draw in the step (RoPE rescale off; the debug preset has no drop path)
    "student.pos_embed_rope_rescale_coords=null", "dino.loss_weight=1.3", "dino.koleo_loss_weight=0.3",
    "ibot.loss_weight=0.7",
]
CASES = {
    # DINOv3's Gram-anchoring shape: a separate Gram teacher on 2x crops, bicubic resize to the student grid
    "gram_hires_all_tokens": ["gram.use_loss=true", "gram.it_load_ema_teacher=0", "crops.gram_teacher_crops_size=64",
                              "gram.loss_weight=0.6"],
    "no_diagonal_skip_gram_masked": ["dino.global_ignore_diagonal=false", "gram.use_loss=true",
                                     "gram.it_load_ema_teacher=0", "crops.gram_teacher_crops_size=64",
                                     "gram.tokens_used=masked", "gram.global_teacher_resize_antialias=true",
                                     "gram.remove_only_teacher_neg=true"],
    "gram_ema_teacher_img_level": ["gram.use_loss=true", "gram.ema_teacher=true", "gram.rep_update=false",
                                   "gram.img_level=true", "gram.remove_neg=true"],
    # one process: DINOv3's distributed KoLeo is the plain one over this rank's batch
    "no_gram_distributed_koleo": ["dino.koleo_loss_distributed=true"],
}


# every case on the fused ops; one on the reference ops (test_train_step holds fused == reference)
@pytest.mark.parametrize("ops,case", [("fused", c) for c in CASES] + [("reference", "gram_hires_all_tokens")])
def test_step_is_dinov3s_computation(ops, case):
    cfg = apply_overrides(get_preset("debug"), [f"train.ops={ops}", *BASE, *CASES[case]])
    batch = synthetic_batch(cfg, 8, seed=3)
    assert batch.masks.flatten(0, 1).any(-1).sum() == int(2 * 8 * cfg.ibot.mask_sample_probability)
    arch = _build(cfg)
    oracle = SSLMetaArch(apply_overrides(cfg, ["train.ops=reference"]))
    oracle.load_state_dict(arch.state_dict())
    oracle.gram_teacher_initialized = arch.gram_teacher_initialized
    oracle = oracle.double().train()

    teacher_temp = 0.06
    loss, logs = arch.forward_backward(batch, teacher_temp=teacher_temp)
    want, terms = dinov3_step(oracle, cfg, batch, teacher_temp)
    want.backward()

    assert set(terms) <= set(logs)
    for k, v in terms.items():
        assert abs(v.item()) > 1e-4, k  # every term weighs in
        torch.testing.assert_close(logs[k].double(), v.detach(), rtol=1e-5, atol=1e-7, msg=k)  # ~1e-7 measured
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-7)
    got = {n: p.grad for n, p in arch.student.named_parameters() if p.grad is not None}
    ref = {n: p.grad for n, p in oracle.student.named_parameters() if p.grad is not None}
    assert set(got) == set(ref) and len(ref) > 20
    for n, g in ref.items():
        err = ((got[n].double() - g).norm() / g.norm().clamp(min=1e-30)).item()
        assert err < 3e-5, (n, err)  # fp32 against fp64: ~3e-6 measured


# ----------------------------------------------------------------------------- the masking collate

def _dinov3_counts(n_images, n_tokens, ratio, probability):
    """DINOv3's collate: int(2B * p) masked crops, the i-th with int(HW * r[i + 1]) patches,
    r = linspace(min, max, n + 1) in float32; the others none."""
    n = int(n_images * probability)
    r = torch.linspace(ratio[0], ratio[1], n + 1)
    return sorted([int(n_tokens * r[i + 1]) for i in range(n)] + [0] * (n_images - n))


@pytest.mark.parametrize("n_images,grid,ratio,probability", [
    (128, (14, 14), (0.1, 0.5), 0.5),   # ViT-L/16 at 224 px, batch 64
    (6, (7, 7), (0.1, 0.5), 0.3),       # int(6 * 0.3) = int(1.7999...) = 1
    (10, (4, 4), (0.0, 0.3), 1.0),      # every crop masked
])
def test_collate_masks_are_dinov3s(n_images, grid, ratio, probability):
    hw = grid[0] * grid[1]
    gen = MaskingGenerator(grid, max_num_patches=0.5 * hw, rng=random.Random(0))
    masks = sample_masks(n_images, grid, ratio, probability, gen)
    assert masks.shape == (n_images, hw) and masks.dtype == torch.bool
    assert sorted(masks.sum(-1).tolist()) == _dinov3_counts(n_images, hw, ratio, probability)
    idx, weight, n = mask_metadata(masks)
    assert torch.equal(idx, masks.flatten().nonzero().flatten())
    assert torch.equal(weight, (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks])
    assert n.dtype == torch.long and n.shape == (1,) and n.item() == idx.numel()


@pytest.mark.parametrize("crop,patch,want", [(224, 16, 98.0), (256, 16, 128.0), (32, 8, 8.0),
                                             (112, 16, 21.0), (48, 16, 3.0), (80, 16, 10.0)])
def test_mask_generator_max_patches_is_dinov3s(crop, patch, want):
    """DINOv3's train.py builds the generator with max_num_patches = `0.5 * img_size // patch_size *
    img_size // patch_size`, which Python evaluates left to right: ((0.5 * S) // p * S) // p. That is
    half the grid when the grid side is even, and less when it is odd (112 / 16: 21, not 24.5)."""
    assert dinov3_max_num_patches(crop, patch) == want


def test_trainer_masks_with_dinov3s_max_patches(tmp_path):
    """The trainer's generator takes that value: at 40 px crops of 8 px patches (a 5 x 5 grid) 10,
    where half the grid, which it used before, is 12.5."""
    from dinov3_fast.train.config import apply_overrides, get_preset
    from dinov3_fast.train.loop import build_state

    cfg = apply_overrides(get_preset("debug"), [f"train.output_dir={tmp_path}", "crops.global_crops_size=40"])
    assert build_state(cfg).masker.max_num_patches == 10.0
