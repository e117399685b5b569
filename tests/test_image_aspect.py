"""Image folders keep each image's aspect ratio: DINOv3's RandomResizedCrop draws its boxes on the
whole decoded image (area a fraction `scale` of the image's own area, pixel aspect ratio
log-uniform in [3/4, 4/3]), where the loader used to centre-crop every image to a square first
(a 4:3 photo lost its left and right eighths). The images of a batch travel as one padded
canvas with each image's extent; nothing may read the padding."""
import math

import numpy as np
import pytest
import torch

from dinov3_fast.train import augment
from dinov3_fast.train.augment import MultiCropAugmentation, crop_boxes, render
from dinov3_fast.train.config import get_preset
from dinov3_fast.train.data import ImageFolder

Image = pytest.importorskip("PIL.Image")

S = 16
# (width, height) in pixels -> the extent (height, width) at short side S, long side <= 2 S
SIZES = {"a.png": ((40, 30), (16, 21)), "b.png": ((30, 40), (21, 16)), "c.png": ((96, 24), (16, 32)),
         "d.png": ((20, 20), (16, 16))}


def _folder(tmp_path):
    rng = np.random.default_rng(0)
    for name, ((w, h), _) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    return ImageFolder(tmp_path, S)


def _theta(boxes, extents, flips):
    """Affine maps for pixel boxes (left, top, right, bottom) of images of extents (h, w)."""
    theta = torch.zeros(len(boxes), 2, 3)
    for i, ((l, t, r, b), (h, w), f) in enumerate(zip(boxes, extents, flips)):
        theta[i, 0, 0] = -(r - l) / w if f else (r - l) / w
        theta[i, 0, 2] = (l + r) / w - 1
        theta[i, 1, 1] = (b - t) / h
        theta[i, 1, 2] = (t + b) / h - 1
    return theta


def test_folder_batch_is_a_padded_canvas_of_whole_images(tmp_path):
    """Short side resized to S (bicubic, as before), the long side kept up to 2 S (96 x 24 is
    resized to 64 x 16, then centre-cropped to 32 x 16); the canvas is the batch's largest
    height x width, each image top-left, zeros beyond."""
    folder = _folder(tmp_path)
    images, labels, extents = folder.batch_with_extents(torch.arange(4))
    assert extents.tolist() == [list(e) for _, e in SIZES.values()] and extents.dtype == torch.int64
    assert images.shape == (4, 3, 21, 32) and labels.tolist() == [0, 0, 0, 0]
    for i, (name, ((w, h), (eh, ew))) in enumerate(SIZES.items()):
        with Image.open(tmp_path / name) as im:
            scale = S / min(w, h)
            im = im.convert("RGB").resize((round(w * scale), round(h * scale)), Image.BICUBIC)
            left = (im.size[0] - ew) // 2
            want = torch.from_numpy(np.array(im.crop((left, 0, left + ew, eh)))).permute(2, 0, 1).float() / 255
        assert torch.equal(images[i, :, :eh, :ew], want), name
        assert not images[i, :, eh:].any() and not images[i, :, :, ew:].any()


def test_padding_is_never_read(tmp_path):
    """The whole augmentation on a canvas whose padding is +-1e6 gives bitwise the crops it gives
    with zero padding (only an exactly zero weight hides 1e6), all finite; each crop is the one
    render gives on its image alone, unpadded; and the augmentation draws each image's boxes with
    that image's aspect ratio and renders them in its extent."""
    folder = _folder(tmp_path)
    images, _, extents = folder.batch_with_extents(torch.arange(4).repeat(4))  # 16 images, 4 sizes
    pad = torch.ones_like(images, dtype=torch.bool)
    for i, (h, w) in enumerate(extents.tolist()):
        pad[i, :, :h, :w] = False
    aug = MultiCropAugmentation(get_preset("debug").crops)
    ref = aug(images, torch.Generator().manual_seed(3), extents)
    for fill in (1e6, -1e6):
        got = aug(images.masked_fill(pad, fill), torch.Generator().manual_seed(3), extents)
        for a, b in ((ref.global_crops, got.global_crops), (ref.local_crops, got.local_crops)):
            assert torch.isfinite(b).all() and torch.equal(a, b)
    theta = crop_boxes(16, (0.05, 1.0), True, torch.Generator().manual_seed(4), "cpu",
                       extents[:, 1] / extents[:, 0])
    crops = render(images.masked_fill(pad, 1e6), theta, 24, extents)
    assert crops.min() >= 0 and crops.max() <= 1
    for i, (h, w) in enumerate(extents.tolist()):
        alone = render(images[i:i + 1, :, :h, :w].contiguous(), theta[i:i + 1], 24)
        torch.testing.assert_close(crops[i:i + 1], alone, rtol=0, atol=1e-6)


def test_augmentation_passes_each_images_extent(tmp_path, monkeypatch):
    """Every crop's boxes are drawn with its images' width / height and rendered in their extents."""
    folder = _folder(tmp_path)
    images, _, extents = folder.batch_with_extents(torch.arange(4))
    seen = {"boxes": [], "render": []}
    real_boxes, real_render = augment.crop_boxes, augment.render

    def boxes(*args):
        seen["boxes"].append(args[5])
        return real_boxes(*args)

    def rendered(images, theta, size, ext=None):
        seen["render"].append(ext)
        return real_render(images, theta, size, ext)

    monkeypatch.setattr(augment, "crop_boxes", boxes)
    monkeypatch.setattr(augment, "render", rendered)
    MultiCropAugmentation(get_preset("debug").crops)(images, torch.Generator().manual_seed(0), extents)
    assert len(seen["boxes"]) == len(seen["render"]) == 4  # 2 global, 2 local crops
    for aspect, ext in zip(seen["boxes"], seen["render"]):
        torch.testing.assert_close(aspect, torch.tensor([21 / 16, 16 / 21, 2, 1]))
        assert ext is extents


@pytest.mark.parametrize("aspect", [4 / 3, 3 / 4, 2.0, 0.5, 1.0])
def test_crop_boxes_follow_random_resized_crop_on_the_images_own_extent(aspect):
    """v2.RandomResizedCrop on a w x h image: area s w h pixels for s uniform in `scale`, pixel
    ratio r log-uniform in [3/4, 4/3], position uniform over where the box fits. Where the box
    fits (local crops' scale: always on these images) that is exactly the draw; a global box
    drawn too tall for a 2 : 1 image spans its height (our clamp, augment.py's docstring): less
    than the drawn area, a ratio between the drawn one and the image's."""
    n = 20000
    theta = crop_boxes(n, (0.05, 0.32), False, torch.Generator().manual_seed(0), "cpu", torch.full((n,), aspect))
    fw, fh = theta[:, 0, 0], theta[:, 1, 1]  # fractions of the image's width and height
    area, ratio = fw * fh, fw * aspect / fh  # of the image's area; pixel width / pixel height
    assert area.min() >= 0.05 - 1e-6 and area.max() <= 0.32 + 1e-6
    assert abs(area.mean().item() - (0.05 + 0.32) / 2) < 0.005
    assert ratio.min() >= 3 / 4 - 1e-5 and ratio.max() <= 4 / 3 + 1e-5
    assert abs(ratio.log().mean().item()) < 0.005  # log-uniform: symmetric in log
    for k, f in ((0, fw), (1, fh)):
        lo = (theta[:, k, 2] + 1) / 2 - f / 2
        assert lo.min() >= -1e-6 and (lo + f).max() <= 1 + 1e-6
        # uniform over where it fits: the start's fraction of the free span is uniform in [0, 1)
        assert abs((lo / (1 - f)).mean().item() - 0.5) < 0.01
    big = crop_boxes(n, (0.32, 1.0), False, torch.Generator().manual_seed(1), "cpu", torch.full((n,), aspect))
    fw, fh = big[:, 0, 0], big[:, 1, 1]
    ratio = fw * aspect / fh
    fits = (fw < 1) & (fh < 1)
    assert (fw * fh)[fits].min() >= 0.32 - 1e-6
    assert ratio[fits].min() >= 3 / 4 - 1e-5 and ratio[fits].max() <= 4 / 3 + 1e-5
    lo, hi = min(aspect, 3 / 4), max(aspect, 4 / 3)
    assert ratio.min() >= lo - 1e-5 and ratio.max() <= hi + 1e-5
    if aspect == 2.0:  # too tall for the image: full height, at most sqrt(2 x 4/3) wide per unit of height
        assert (fh[~fits] == 1).all() and 0.2 < (~fits).float().mean() < 0.8
        assert ratio.max() <= math.sqrt(2 * 4 / 3) + 1e-5


def test_render_of_a_non_square_image_is_pillows_resize_of_the_box(tmp_path):
    """A crop of a non-square image in a padded canvas, rendered by `render`, is Pillow's
    bicubic resize of that box cut from the image alone (v2.RandomResizedCrop on a PIL image:
    crop, then resize), within 8-bit rounding on the 8-bit images, and within 2e-5 on float ('F'
    mode) ones, where Pillow neither rounds nor clips. The padding holds 1e6, so any weight on
    it would show. (Pillow's `resize(size, box=...)` is not the reference: its taps reach past
    the box into the rest of the image.)"""
    folder = _folder(tmp_path)
    images, _, extents = folder.batch_with_extents(torch.arange(3))  # 16 x 21, 21 x 16, 16 x 32
    pad = torch.ones_like(images, dtype=torch.bool)
    for i, (h, w) in enumerate(extents.tolist()):
        pad[i, :, :h, :w] = False
    boxes = [(0, 0, 21, 16), (2, 5, 15, 21), (7, 1, 32, 16)]
    flips = [False, True, True]
    theta = _theta(boxes, extents.tolist(), flips)
    for size in (12, 24):
        got = render(images.masked_fill(pad, 1e6), theta, size, extents)
        for i, ((h, w), box, flip) in enumerate(zip(extents.tolist(), boxes, flips)):
            pixels = (images[i, :, :h, :w].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            im = Image.fromarray(pixels).crop(box).resize((size, size), Image.BICUBIC)
            im = im.transpose(Image.FLIP_LEFT_RIGHT) if flip else im
            want = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255
            torch.testing.assert_close(got[i], want, rtol=0, atol=1 / 255 + 1e-6, msg=lambda m: f"{box} {size}: {m}")
            chans = []
            for c in images[i, :, :h, :w].numpy():
                im = Image.fromarray(c.astype(np.float32)).crop(box).resize((size, size), Image.BICUBIC)
                chans.append(np.array(im.transpose(Image.FLIP_LEFT_RIGHT) if flip else im))
            want = torch.from_numpy(np.stack(chans)).clamp(0, 1)
            torch.testing.assert_close(got[i], want, rtol=0, atol=2e-5, msg=lambda m: f"{box} {size}: {m}")
