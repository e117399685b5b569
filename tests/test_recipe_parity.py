"""The trainer's recipe against DINOv3's code (dinov3/data/augmentations.py and transforms.py,
dinov3/train/train.py and cosine_lr_scheduler.py, dinov3/train/param_groups.py), for what
tests/test_train_step.py does not already pin. Each rule is restated here from DINOv3's
behaviour, not from our implementation."""
import math

import numpy as np
import pytest
import torch

from dinov3_fast.train.augment import (BLUR_PROB, BlurParams, ColorParams, MultiCropAugmentation, blur, crop_boxes,
                                       render, solarize)
from dinov3_fast.train.config import apply_overrides, get_preset
from dinov3_fast.train.data import SyntheticShapes
from dinov3_fast.train.meta_arch import SSLMetaArch
from dinov3_fast.train.optim import param_groups
from dinov3_fast.train.schedules import Schedules

# --------------------------------------------------------------------------- augmentation


def _theta(boxes, side, flips):
    """Affine maps for pixel boxes (left, top, right, bottom) of a side x side image."""
    theta = torch.zeros(len(boxes), 2, 3)
    for i, ((l, t, r, b), f) in enumerate(zip(boxes, flips)):
        w, h = (r - l) / side, (b - t) / side
        theta[i, 0, 0] = -w if f else w
        theta[i, 0, 2] = (l + r) / side - 1
        theta[i, 1, 1] = h
        theta[i, 1, 2] = (t + b) / side - 1
    return theta


def test_random_resized_crop_is_pillows_bicubic_resize_of_the_crop():
    """DINOv3 decodes images with Pillow and runs v2.RandomResizedCrop(bicubic) on them: the box is
    cut out, then resized with Pillow's bicubic filter (Keys' cubic with a = -0.5, stretched by the
    shrink factor when the crop is larger than its output: antialiased), then flipped. Held here on
    float ('F' mode) images, so Pillow neither rounds nor clips, for shrinking and enlarging boxes.
    grid_sample's bicubic (a = -0.75, no antialiasing) missed it by ~1.4% of the range on average
    and up to 26% on single pixels."""
    image_mod = pytest.importorskip("PIL.Image")
    side = 64
    images, _ = SyntheticShapes(side).batch(torch.arange(6))
    images = images.float()
    boxes = [(0, 0, 64, 64), (3, 5, 59, 52), (10, 20, 30, 36), (0, 17, 41, 64), (22, 0, 64, 50), (7, 9, 25, 30)]
    flips = [False, True, False, True, False, True]
    for size in (32, 48):
        got = render(images, _theta(boxes, side, flips), size)
        for i, (box, flip) in enumerate(zip(boxes, flips)):
            chans = []
            for c in images[i].numpy():
                im = image_mod.fromarray(c.astype(np.float32)).crop(box)
                im = im.resize((size, size), image_mod.BICUBIC)
                if flip:
                    im = im.transpose(image_mod.FLIP_LEFT_RIGHT)
                chans.append(np.asarray(im))
            want = torch.from_numpy(np.stack(chans)).clamp(0, 1)
            torch.testing.assert_close(got[i], want, rtol=0, atol=2e-5, msg=lambda m: f"box {box} size {size}: {m}")


def test_crop_boxes_follow_random_resized_crop():
    """v2.RandomResizedCrop: area fraction uniform in `scale`, aspect ratio log-uniform in
    [3/4, 4/3], a position uniform over where the box fits, and v2.RandomHorizontalFlip(0.5);
    one draw per image and crop. (Our one documented difference: the box is clamped to the image
    instead of redrawn.)"""
    n = 20000
    theta = crop_boxes(n, (0.05, 0.32), True, torch.Generator().manual_seed(0), "cpu")
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1]
    area, ratio = w * h, w / h
    assert area.min() >= 0.05 - 1e-6 and area.max() <= 0.32 + 1e-6
    assert abs(area.mean().item() - (0.05 + 0.32) / 2) < 0.005
    assert ratio.min() >= 3 / 4 - 1e-5 and ratio.max() <= 4 / 3 + 1e-5
    assert abs(ratio.log().mean().item()) < 0.005  # log-uniform: symmetric in log
    assert abs((theta[:, 0, 0] < 0).float().mean().item() - 0.5) < 0.02
    left = (theta[:, 0, 2] + 1) / 2 - w / 2
    assert left.min() >= -1e-6 and (left + w).max() <= 1 + 1e-6
    unflipped = crop_boxes(100, (0.32, 1.0), False, torch.Generator().manual_seed(0), "cpu")
    assert (unflipped[:, 0, 0] > 0).all()  # crops.horizontal_flips=false: v2.RandomHorizontalFlip(p=0)


def test_colour_and_blur_draws_are_dinov3s():
    """v2.RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), v2.RandomGrayscale(0.2),
    v2.GaussianBlur(9, sigma=(0.1, 2.0)); blur applied with probability 1 - p for
    GaussianBlur(p=1.0 / 0.1 / 0.5) (its RandomApply gets keep_p = 1 - p): 0 / 0.9 / 0.5."""
    n = 40000
    gen = torch.Generator().manual_seed(0)
    c = ColorParams.draw(n, gen, "cpu")
    assert abs(c.jitter.float().mean().item() - 0.8) < 0.01 and abs(c.gray.float().mean().item() - 0.2) < 0.01
    ranges = ((c.brightness, 0.6, 1.4), (c.contrast, 0.6, 1.4), (c.saturation, 0.8, 1.2), (c.hue, -0.1, 0.1))
    for vals, lo, hi in ranges:
        assert vals.min() >= lo and vals.max() <= hi
        assert abs(vals.mean().item() - (lo + hi) / 2) < 0.01 * (hi - lo)
    assert BLUR_PROB == (0.0, 0.9, 0.5)
    b = BlurParams.draw(n, 0.9, gen, "cpu")
    assert abs(b.apply.float().mean().item() - 0.9) < 0.01
    assert b.sigma.min() >= 0.1 and b.sigma.max() <= 2.0


def test_blur_is_torchvisions_gaussian_blur():
    """v2.GaussianBlur(kernel_size=9): separable kernel exp(-x^2 / (2 sigma^2)) at x = -4..4,
    normalised, one sigma for both axes, reflect padding."""
    x = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 1.0, 2.0])
    got = blur(x, BlurParams(torch.tensor([True, True, False]), sigma))
    taps = torch.arange(-4, 5, dtype=torch.float32)
    for i in range(2):
        k = torch.exp(-0.5 * (taps / sigma[i]) ** 2)
        k = k / k.sum()
        pad = torch.nn.functional.pad(x[i:i + 1], (4, 4, 4, 4), mode="reflect")
        want = torch.nn.functional.conv2d(pad, (k[:, None] * k[None, :]).expand(3, 1, 9, 9), groups=3)
        torch.testing.assert_close(got[i:i + 1], want, rtol=0, atol=1e-6)
    assert torch.equal(got[2], x[2])


def test_solarize_threshold_is_128_of_255():
    """v2.RandomSolarize(threshold=128) on DINOv3's 8-bit images inverts values >= 128 (255 - v).
    Our float pixels hold what 8-bit values round from, so the boundary is 127.5 / 255 = 0.5."""
    x = torch.tensor([127, 128, 200, 0, 255], dtype=torch.float32).view(1, 1, 1, 5) / 255
    got = solarize(x.expand(2, 3, 1, 5), torch.tensor([True, False]))
    torch.testing.assert_close(got[0, 0, 0] * 255, torch.tensor([127.0, 127, 55, 0, 0]))
    assert torch.equal(got[1], x[0].expand(3, 1, 5))


def test_every_image_draws_its_own_crops_and_distortions():
    """DataAugmentationDINO runs once per image: nothing is shared across a batch. The same
    image repeated in a batch gets different crops; only the second global crop is solarised
    (held by a crop of one flat bright colour, which only solarisation can darken)."""
    cfg = get_preset("debug")
    images, _ = SyntheticShapes(48).batch(torch.zeros(8, dtype=torch.long))
    crops = MultiCropAugmentation(cfg.crops)(images, torch.Generator().manual_seed(1))
    for stack in (crops.global_crops, crops.local_crops):
        for view in stack:
            assert all(not torch.equal(view[0], view[i]) for i in range(1, 8))
    bright = torch.full((256, 3, 48, 48), 0.9)
    crops = MultiCropAugmentation(cfg.crops)(bright, torch.Generator().manual_seed(2))
    std = torch.tensor(cfg.crops.rgb_std).view(1, 1, 3, 1, 1)
    mean = torch.tensor(cfg.crops.rgb_mean).view(1, 1, 3, 1, 1)
    raw = (crops.global_crops * std + mean).amax((2, 3, 4))  # [2, 256]: brightest value per crop
    dark = raw < 0.5  # jitter keeps the value >= 0.54 (brightness 0.6 x 0.9); solarised: <= 0.46
    assert not dark[0].any() and 0.13 < dark[1].float().mean() < 0.27  # p 0.2, second crop only
    assert not ((crops.local_crops * std[0] + mean[0]).amax((2, 3, 4)) < 0.5).any()


# --------------------------------------------------------------------------- schedules


def test_v2_schedules_warm_up_without_their_endpoint():
    """The 7B recipe's v2 `schedules:` (`build_schedulers_v2`, `linear_warmup_cosine_decay`):
    warmup = linspace(start, peak, W, endpoint=False), so iteration i < W is at start + (peak -
    start) * i / W and the peak is first reached at W (v1's CosineScheduler includes the
    endpoint: the peak at W - 1). The same for the teacher temperature; the last layer's lr is
    the lr schedule with its first freeze iterations at 0."""
    cfg = apply_overrides(get_preset("debug"), ["optim.schedule=constant", "optim.lr=0.01", "optim.min_lr=0.01",
                                                "optim.warmup_epochs=0.2", "optim.freeze_last_layer_epochs=0.1",
                                                "train.OFFICIAL_EPOCH_LENGTH=100", "optim.epochs=1",
                                                "teacher.warmup_teacher_temp_epochs=0.3"])
    s = Schedules(cfg)
    lr = np.concatenate([np.linspace(0.0, 0.01, 20, endpoint=False), np.full(80, 0.01)])
    temp = np.concatenate([np.linspace(0.04, 0.07, 30, endpoint=False), np.full(70, 0.07)])
    for it in range(100):
        assert s.lr(it) == pytest.approx(lr[it], rel=1e-12, abs=1e-15), it
        assert s.last_layer_lr(it) == pytest.approx(0.0 if it < 10 else lr[it], rel=1e-12, abs=1e-15), it
        assert s.teacher_temp(it) == pytest.approx(temp[it], rel=1e-12), it
    assert s.lr(19) < 0.01 == s.lr(20)
    sevenb = Schedules(get_preset("vit7b16"), world_size=256)  # peak 5e-5 * 4 * sqrt(4096 / 1024) = 4e-4
    assert sevenb.lr(99_999) == pytest.approx(4e-4 * 99_999 / 100_000, rel=1e-12) and sevenb.lr(100_000) == 4e-4
    assert sevenb.teacher_temp(50_000) == pytest.approx(0.055, rel=1e-12)


def test_v1_schedule_indexing_at_the_edges():
    """DINOv3's CosineScheduler (v1): index 0 is start_warmup_value (0 for the lr), the last warmup
    iteration is the peak; with no warmup, index 0 is base_value; past total_iters, final_value.
    The teacher temperature is a schedule of warmup_teacher_temp_epochs iterations only."""
    cfg = apply_overrides(get_preset("debug"), ["optim.lr=0.01", "optim.min_lr=0.001", "optim.warmup_epochs=0",
                                                "train.OFFICIAL_EPOCH_LENGTH=100", "optim.epochs=1",
                                                "optim.weight_decay=0.04", "optim.weight_decay_end=0.4",
                                                "teacher.warmup_teacher_temp_epochs=0"])
    s = Schedules(cfg)
    assert s.lr(0) == pytest.approx(0.01, rel=1e-12) and s.lr(1) < s.lr(0)
    assert s.lr(100) == s.lr(10**6) == 0.001
    assert s.lr(99) == pytest.approx(0.001 + 0.5 * 0.009 * (1 + math.cos(math.pi * 99 / 100)), rel=1e-12)
    assert s.weight_decay(0) == pytest.approx(0.04, rel=1e-12) and s.weight_decay(100) == 0.4
    assert s.teacher_temp(0) == s.teacher_temp(5) == 0.07  # no warmup: CosineScheduler of 0 iterations -> final


# --------------------------------------------------------------------------- parameter groups


def test_param_groups_follow_dinov3_names_rule():
    """get_params_groups_with_decay_fsdp on each student sub-model: layer 0 for every name that
    contains patch_embed / cls_token / storage_tokens / mask_token, block i is i + 1, anything else
    in the backbone (final norms, the untied local CLS norm) depth + 1; lr multiplier
    decay ** (depth + 1 - layer), x patch_embed_lr_mult for patch_embed; heads 1. No weight decay
    where the name ends in bias or contains norm or gamma (LayerScale); the learned tokens decay."""
    cfg = apply_overrides(get_preset("debug"), ["optim.layerwise_decay=0.5", "optim.patch_embed_lr_mult=0.2",
                                                "student.untie_global_and_local_cls_norm=true",
                                                "student.n_storage_tokens=2"])
    arch = SSLMetaArch(cfg)
    depth = cfg.student.depth
    by_name = {n: g for g in param_groups(cfg, arch.student) for n in g["names"]}
    for name, p in arch.student.named_parameters():
        sub, rest = name.split(".", 1)
        if sub == "backbone":
            if any(t in rest for t in ("patch_embed", "cls_token", "storage_tokens", "mask_token")):
                layer = 0
            elif rest.startswith("blocks."):
                layer = int(rest.split(".")[1]) + 1
            else:
                layer = depth + 1
            lr = 0.5 ** (depth + 1 - layer) * (0.2 if "patch_embed" in rest else 1.0)
        else:
            lr = 1.0
        wd = 0.0 if (rest.endswith("bias") or "norm" in rest or "gamma" in rest) else 1.0
        g = by_name[name]
        assert g["lr_multiplier"] == pytest.approx(lr, rel=1e-12), name
        assert g["wd_multiplier"] == wd, name
        assert g["is_last_layer"] == ("last_layer" in rest), name
    assert by_name["backbone.local_cls_norm.weight"]["wd_multiplier"] == 0.0
    assert by_name["backbone.storage_tokens"]["wd_multiplier"] == 1.0
