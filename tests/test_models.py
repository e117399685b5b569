"""Tests of dinov3_fast.models: DINOv3's ViT family, RoPE module, heads, counts.

The oracle `dinov3_forward_list_oracle` is written here from DINOv3's documented semantics, straight
from a DINOv3-named state dict, in float64: it shares no code with the model.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinov3_fast.models import (
    ARCHS, PRESETS, DINOHead, DinoVisionTransformer, RopePositionEmbedding, block_keep_fraction, build_model,
    count_params, flops_per_image, meta_model,
)
from dinov3_fast.models.ffn import swiglu_hidden_size
import oracle

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: on the shared 2-core CI box, a 2-thread OpenMP pool waiting on a descheduled
    thread turns every ~20 us matmul into ~20 ms. One thread keeps this file fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


NORM_EPS = {"layernorm": 1e-6, "layernormbf16": 1e-5, "rmsnorm": 1e-5}
SWIGLU_ALIGN = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in output"
    return oracle.rel_err(out, ref)


# A DINOv3-like tiny configuration: 4 storage tokens, LayerScale, masked k bias, as published.
TINY = dict(embed_dim=64, depth=2, num_heads=2, patch_size=16, n_storage_tokens=4, layerscale_init=1e-1,
            norm_layer="layernormbf16", ffn_layer="mlp", ffn_ratio=4, qkv_bias=True, mask_k_bias=True,
            pos_embed_rope_dtype="fp32")
TINY_7B_LIKE = dict(TINY, ffn_layer="swiglu64", ffn_ratio=3, qkv_bias=False, norm_layer="rmsnorm",
                    untie_global_and_local_cls_norm=True, untie_cls_and_patch_norms=True)


def tiny_model(backend="reference", dtype=torch.float32, **overrides):
    model = DinoVisionTransformer(**{**TINY, **overrides}, backend=backend)
    model.init_weights()
    with torch.no_grad():  # non-trivial values everywhere (DINOv3 inits biases / mask token to 0)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "mask_token" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype)


# ----------------------------------------------------------------------------- DINOv3 names

def dinov3_state_dict_spec(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry DINOv3's DinoVisionTransformer has for `cfg`, with its shape."""
    d, p, c = cfg["embed_dim"], cfg.get("patch_size", 16), cfg.get("in_chans", 3)
    dh = d // cfg["num_heads"]
    norm_shapes = {"weight": (d,)} if cfg.get("norm_layer") == "rmsnorm" else {"weight": (d,), "bias": (d,)}
    spec = {"cls_token": (1, 1, d), "mask_token": (1, d), "patch_embed.proj.weight": (d, c, p, p),
            "patch_embed.proj.bias": (d,), "rope_embed.periods": (dh // 4,)}
    if cfg.get("n_storage_tokens", 0):
        spec["storage_tokens"] = (1, cfg["n_storage_tokens"], d)
    norms = ["norm"] + (["cls_norm"] if cfg.get("untie_cls_and_patch_norms") else []) \
        + (["local_cls_norm"] if cfg.get("untie_global_and_local_cls_norm") else [])
    for n in norms:
        spec.update({f"{n}.{k}": s for k, s in norm_shapes.items()})
    hidden = int(d * cfg.get("ffn_ratio", 4.0))
    ffn = cfg.get("ffn_layer", "mlp")
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            spec.update({f"{b}{n}.{k}": s for k, s in norm_shapes.items()})
        spec[f"{b}attn.qkv.weight"] = (3 * d, d)
        if cfg.get("qkv_bias", True):
            spec[f"{b}attn.qkv.bias"] = (3 * d,)
            if cfg.get("mask_k_bias"):
                spec[f"{b}attn.qkv.bias_mask"] = (3 * d,)
        spec[f"{b}attn.proj.weight"] = (d, d)
        if cfg.get("proj_bias", True):
            spec[f"{b}attn.proj.bias"] = (d,)
        if cfg.get("layerscale_init"):
            spec[f"{b}ls1.gamma"] = (d,)
            spec[f"{b}ls2.gamma"] = (d,)
        fb = cfg.get("ffn_bias", True)
        if ffn == "mlp":
            layers = {"fc1": (hidden, d), "fc2": (d, hidden)}
        else:
            h = swiglu_hidden_size(hidden, SWIGLU_ALIGN[ffn])
            layers = {"w1": (h, d), "w2": (h, d), "w3": (d, h)}
        for n, s in layers.items():
            spec[f"{b}mlp.{n}.weight"] = s
            if fb:
                spec[f"{b}mlp.{n}.bias"] = (s[0],)
    return spec


def random_dinov3_checkpoint(cfg: dict) -> dict[str, torch.Tensor]:
    """A DINOv3-named checkpoint with random values (bias_mask and periods as DINOv3 fills them)."""
    sd = {}
    for name, shape in dinov3_state_dict_spec(cfg).items():
        if name.endswith("bias_mask"):
            o = shape[0]
            sd[name] = torch.ones(shape)
            sd[name][o // 3: 2 * o // 3] = 0
        elif name == "rope_embed.periods":
            dh = cfg["embed_dim"] // cfg["num_heads"]
            sd[name] = 100.0 ** (2 * torch.arange(shape[0], dtype=torch.float32) / (dh // 2))
        elif name.endswith("gamma") or (("norm" in name) and name.endswith("weight")):
            sd[name] = 1 + 0.2 * torch.randn(shape)
        else:
            sd[name] = 0.1 * torch.randn(shape)
    return sd


def dinov3_forward_list_oracle(sd: dict, cfg: dict, xs: list[torch.Tensor], masks_list=None, training=False):
    """DINOv3's forward_features_list in float64, from a state dict (the semantics of
    dinov3/models/vision_transformer.py + layers/, written out). Returns one output dict per crop.

    training=True runs DINOv3's training path: before each block, every crop's RoPE coordinate
    augmentations (shift: 2 values, jitter: 2, rescale: 1, drawn in fp32, the tables' dtype, so
    cfg must use fp32 tables); then, with drop_path_rate, the block's branches on sample subsets
    (layers/block.py `_forward_list`: every crop's randperm for attention, then every crop's for
    the FFN, added back with index_add and alpha B / subset); and local_cls_norm for the second crop.
    """
    if training:
        assert cfg.get("pos_embed_rope_dtype") == "fp32", "the oracle draws the augmentations in fp32"
    sd = {k: v.double() for k, v in sd.items()}
    masks_list = masks_list or [None] * len(xs)
    d, nh = cfg["embed_dim"], cfg["num_heads"]
    dh, p, s = d // nh, cfg.get("patch_size", 16), cfg.get("n_storage_tokens", 0)
    r = 1 + s
    eps = NORM_EPS[cfg.get("norm_layer", "layernorm")]
    rate = cfg.get("drop_path_rate", 0.0) if training else 0.0

    def norm(t, pre):
        if cfg.get("norm_layer") == "rmsnorm":
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * sd[pre + ".weight"]
        return F.layer_norm(t, (d,), sd[pre + ".weight"], sd[pre + ".bias"], eps)

    def linear(t, pre):
        bias = sd.get(pre + ".bias")
        if bias is not None and pre + ".bias_mask" in sd:
            bias = bias * sd[pre + ".bias_mask"]
        return t @ sd[pre + ".weight"].T + (0 if bias is None else bias)

    def tokens(x, masks):  # [B, r + HW, D]
        B = x.shape[0]
        tok = F.conv2d(x.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
        tok = tok.flatten(2).transpose(1, 2)
        if masks is not None:
            tok = torch.where(masks.reshape(B, -1, 1), sd["mask_token"][None], tok)
        prefix = [sd["cls_token"].expand(B, 1, d)] + ([sd["storage_tokens"].expand(B, s, d)] if s else [])
        return torch.cat(prefix + [tok], dim=1)

    def rope(gh, gw):  # patch centres in [-1, 1] per axis, angle 2 pi c / period, [y | x] tiled twice
        ys = (torch.arange(gh, dtype=torch.float64) + 0.5) / gh * 2 - 1
        xs_ = (torch.arange(gw, dtype=torch.float64) + 0.5) / gw * 2 - 1
        c = torch.stack([t.reshape(-1) for t in torch.meshgrid(ys, xs_, indexing="ij")], dim=1)  # [HW, 2]
        if training and cfg.get("pos_embed_rope_shift_coords") is not None:
            shift = cfg["pos_embed_rope_shift_coords"]
            c = c + torch.empty(2).uniform_(-shift, shift).double()
        if training and cfg.get("pos_embed_rope_jitter_coords") is not None:
            j = math.log(cfg["pos_embed_rope_jitter_coords"])
            c = c * torch.empty(2).uniform_(-j, j).exp().double()
        if training and cfg.get("pos_embed_rope_rescale_coords") is not None:
            j = math.log(cfg["pos_embed_rope_rescale_coords"])
            c = c * torch.empty(1).uniform_(-j, j).exp().double()
        ang = 2 * math.pi * c[:, :, None] / sd["rope_embed.periods"]  # [HW, 2, dh/4]
        ang = torch.cat([ang.flatten(1), ang.flatten(1)], dim=1)
        return ang.sin(), ang.cos()

    def attn(h, b, sin_cos):  # ls1(attn(norm1(h)))
        sin, cos = sin_cos
        B, n, _ = h.shape

        def rot(t):  # t [B, nh, N, dh]; patches only
            pt = t[:, :, r:]
            half = torch.cat([-pt[..., dh // 2:], pt[..., : dh // 2]], dim=-1)
            return torch.cat([t[:, :, :r], pt * cos + half * sin], dim=2)

        qkv = linear(norm(h, b + "norm1"), b + "attn.qkv").reshape(B, n, 3, nh, dh).permute(2, 0, 3, 1, 4)
        q, k, v = rot(qkv[0]), rot(qkv[1]), qkv[2]
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1) @ v
        return linear(a.transpose(1, 2).reshape(B, n, d), b + "attn.proj") * sd.get(b + "ls1.gamma", 1.0)

    def ffn(h, b):  # ls2(mlp(norm2(h)))
        m = norm(h, b + "norm2")
        if cfg.get("ffn_layer", "mlp") == "mlp":
            m = linear(F.gelu(linear(m, b + "mlp.fc1")), b + "mlp.fc2")
        else:
            m = linear(F.silu(linear(m, b + "mlp.w1")) * linear(m, b + "mlp.w2"), b + "mlp.w3")
        return m * sd.get(b + "ls2.gamma", 1.0)

    hs = [tokens(x, m) for x, m in zip(xs, masks_list)]
    grids = [(x.shape[-2] // p, x.shape[-1] // p) for x in xs]
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        ropes = [rope(gh, gw) for gh, gw in grids]
        if rate > 0:
            keep = [max(int(h.shape[0] * (1 - rate)), 1) for h in hs]
            idx = [torch.randperm(h.shape[0])[:k] for h, k in zip(hs, keep)]
            hs = [h.index_add(0, j, attn(h[j], b, sc), alpha=h.shape[0] / k)
                  for h, j, sc, k in zip(hs, idx, ropes, keep)]
            idx = [torch.randperm(h.shape[0])[:k] for h, k in zip(hs, keep)]
            hs = [h.index_add(0, j, ffn(h[j], b), alpha=h.shape[0] / k) for h, j, k in zip(hs, idx, keep)]
        else:
            hs = [h + attn(h, b, sc) for h, sc in zip(hs, ropes)]
            hs = [h + ffn(h, b) for h in hs]
    out = []
    for i, h in enumerate(hs):
        if training and i == 1 and cfg.get("untie_global_and_local_cls_norm"):
            cls_reg = norm(h[:, :r], "local_cls_norm")
        elif cfg.get("untie_cls_and_patch_norms"):
            cls_reg = norm(h[:, :r], "cls_norm")
        else:
            cls_reg = norm(h[:, :r], "norm")
        out.append({"x_norm_clstoken": cls_reg[:, 0], "x_storage_tokens": cls_reg[:, 1:],
                    "x_norm_patchtokens": norm(h[:, r:], "norm"), "x_prenorm": h})
    return out


def dinov3_forward_oracle(sd: dict, cfg: dict, x: torch.Tensor, masks=None):
    """DINOv3's eval forward_features of one crop (`dinov3_forward_list_oracle`)."""
    return dinov3_forward_list_oracle(sd, cfg, [x], [masks])[0]


# ----------------------------------------------------------------------------- sizes

# The published sizes (DINOv3 README / paper) are those of the released backbones: 4 storage
# tokens, LayerScale, mask token, masked-k qkv bias (none for 7B), H+ = vit_huge2 with SwiGLU x6.
PUBLISHED_M = {"dinov3_vits16": 21.6, "dinov3_vitb16": 85.7, "dinov3_vitl16": 303.2,
               "dinov3_vith16plus": 840.6, "dinov3_vit7b16": 6716.0}
EXACT = {"dinov3_vits16": 21_601_152, "dinov3_vitb16": 85_669_632, "dinov3_vitl16": 303_154_176,
         "dinov3_vith16plus": 840_633_600, "dinov3_vit7b16": 6_716_043_264}


def analytic_params(cfg: dict) -> int:
    return sum(math.prod(s) for n, s in dinov3_state_dict_spec(cfg).items()
               if not n.endswith(("bias_mask", "periods")))


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_param_count_matches_published(name):
    n = count_params(name)  # built on the meta device
    assert n == EXACT[name]
    assert round(n / 1e6, 1) == PUBLISHED_M[name]
    cfg = {**ARCHS[PRESETS[name]["arch"]], **PRESETS[name]}
    assert n == analytic_params(cfg)


def test_7b_is_about_6_7b_and_arch_counts():
    assert 6.70e9 < count_params("dinov3_vit7b16") < 6.73e9
    for arch in ARCHS:  # DINOv3's bare defaults: no storage tokens, no LayerScale, mlp
        assert count_params(arch) == analytic_params({**ARCHS[arch], "qkv_bias": True}), arch
    # ViT-7B SwiGLU: int(2 * int(4096 * 3) / 3) = 8192, already a multiple of 64; its 3 matrices
    # hold as many weights as the x3 MLP's 2, and 4096 more biases per block.
    seven = meta_model("vit_7b", ffn_layer="swiglu64")
    assert seven.blocks[0].mlp.w1.weight.shape == (8192, 4096)
    assert count_params(seven) == count_params("vit_7b") + 40 * 4096


def test_meta_build_then_materialise_matches_eager():
    model = build_model("dinov3_vits16", depth=2, device="meta")
    assert all(t.is_meta for t in model.state_dict().values())
    big = meta_model("dinov3_vit7b16")
    assert all(p.is_meta for p in big.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    eager = build_model("dinov3_vits16", depth=2)
    torch.testing.assert_close(model.rope_embed.periods, eager.rope_embed.periods, rtol=0, atol=0)
    mask = model.blocks[0].attn.qkv.bias_mask
    assert mask[:384].eq(1).all() and mask[384:768].eq(0).all() and mask[768:].eq(1).all()
    assert model.blocks[1].ls1.gamma.eq(1e-5).all()
    out = model.eval().forward_features(torch.randn(1, 3, 32, 32))
    assert torch.isfinite(out["x_prenorm"]).all()


def test_flops_per_image():
    cfg = {**ARCHS["vit_large"], "n_storage_tokens": 4}
    d, depth = cfg["embed_dim"], cfg["depth"]
    n, hw = 261, 256
    per_block = 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * 4 * d
    want = 2 * hw * 3 * 256 * d + depth * per_block
    assert flops_per_image("vit_large", [256], n_storage_tokens=4) == want
    model = build_model("dinov3_vitl16", device="meta")
    assert flops_per_image(model, [256, (256, 256)]) == 2 * want
    # 7B: SwiGLU has 3 matrices of width 8192; ~6 * params * tokens rule of thumb within 15%.
    f7 = flops_per_image("dinov3_vit7b16", [256])
    assert abs(f7 / (2 * 6.716e9 * 261) - 1) < 0.15
    with pytest.raises(ValueError, match="not divisible"):
        flops_per_image("vit_small", [100])
    # stochastic depth: the branches run on the kept images only, the patch embedding on all
    assert flops_per_image("vit_large", [256], 0.5, n_storage_tokens=4) == 2 * hw * 3 * 256 * d + depth * per_block / 2
    assert block_keep_fraction(256, 0.3) == 179 / 256 and block_keep_fraction(3, 0.9) == 1 / 3
    assert block_keep_fraction(7, 0.0) == 1.0


def test_training_flops_count_what_stochastic_depth_runs():
    """MFU's numerator: at vitl16_h100's drop-path rate 0.3 and batch 128 the student's blocks run
    on 179 of 256 global and 716 of 1024 local crops; the teacher runs every block on every image."""
    from dinov3_fast.train.config import apply_overrides, get_preset
    from dinov3_fast.train.loop import train_flops_per_image
    from dinov3_fast.train.meta_arch import SSLMetaArch
    cfg = apply_overrides(get_preset("vitl16_h100"), ["train.batch_size_per_gpu=128"])
    arch = SSLMetaArch(cfg, device="meta")
    model = arch.student.backbone
    glob, loc = flops_per_image(model, [224] * 2, 179 / 256), flops_per_image(model, [96] * 8, 716 / 1024)
    assert train_flops_per_image(arch, cfg) == pytest.approx(3 * (glob + loc) + flops_per_image(model, [224] * 2))
    full = train_flops_per_image(arch, apply_overrides(cfg, ["student.drop_path_rate=0"]))
    assert 0.74 < train_flops_per_image(arch, cfg) / full < 0.75


def test_mfu_peak_is_the_cards_own():
    """MFU's denominator by device name: the PCIe and NVL H100s were divided by the SXM card's 989."""
    from dinov3_fast.train.loop import peak_flops_of
    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12 and peak_flops_of("NVIDIA H100 NVL") == 835e12
    assert peak_flops_of("NVIDIA GH200 480GB") == peak_flops_of("NVIDIA H200") == 989e12
    assert peak_flops_of("NVIDIA H200 NVL") == 835e12
    assert peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12 and peak_flops_of("Tesla T4") is None


# ----------------------------------------------------------------------------- checkpoint

@pytest.mark.parametrize("cfg", [TINY, TINY_7B_LIKE, dict(TINY, n_storage_tokens=0, layerscale_init=None,
                                                           norm_layer="layernorm", mask_k_bias=False)],
                         ids=["vits_like", "vit7b_like", "bare"])
def test_dinov3_checkpoint_roundtrip(cfg):
    ckpt = random_dinov3_checkpoint(cfg)
    model = DinoVisionTransformer(**cfg, backend="reference")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == dinov3_state_dict_spec(cfg)
    model.load_state_dict(ckpt, strict=True)
    model.eval()
    x = torch.randn(2, 3, 48, 32)
    masks = torch.rand(2, 6) < 0.4
    out = model.forward_features(x, masks)
    ref = dinov3_forward_oracle(ckpt, cfg, x, masks)
    for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
        assert out[key].shape == ref[key].shape
        assert rel_err(out[key], ref[key]) < 1e-5, key
    assert out["masks"] is masks
    saved = model.state_dict()
    again = DinoVisionTransformer(**cfg, backend="reference")
    again.load_state_dict(saved, strict=True)
    torch.testing.assert_close(again.eval().forward_features(x, masks)["x_prenorm"], out["x_prenorm"])


@pytest.mark.parametrize("name", sorted(ARCHS) + sorted(PRESETS))
def test_every_arch_and_preset_has_dinov3s_state_dict(name):
    """Names and shapes of each factory (DINOv3's defaults) and published backbone, on the meta device:
    what DINOv3 builds for the same options, so its checkpoints load with strict=True."""
    cfg = {**ARCHS[PRESETS[name]["arch"]], **PRESETS[name]} if name in PRESETS else dict(ARCHS[name])
    model = meta_model(name)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == dinov3_state_dict_spec(cfg)


def test_sat493m_vitl_has_the_untied_local_cls_norm():
    """dinov3/hub/backbones.py builds ViT-L for its SAT-493M weights (hash eadcf0ff) with
    untie_global_and_local_cls_norm=True, so that checkpoint holds local_cls_norm.{weight,bias}
    and the LVD-1689M one does not; the 7B has it for both weights."""
    sat = meta_model("dinov3_vitl16_sat493m").state_dict()
    lvd = meta_model("dinov3_vitl16").state_dict()
    assert set(sat) - set(lvd) == {"local_cls_norm.weight", "local_cls_norm.bias"}
    assert "local_cls_norm.weight" in meta_model("dinov3_vit7b16").state_dict()


def test_untied_local_cls_norm_in_training_only():
    cfg = dict(TINY_7B_LIKE)
    ckpt = random_dinov3_checkpoint(cfg)
    model = DinoVisionTransformer(**cfg, backend="reference")
    model.load_state_dict(ckpt, strict=True)
    g, loc = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 16, 16)
    model.train()  # no drop path, no rope augmentation in this config: deterministic
    out = model.forward_features([g, loc], [None, None])
    torch.testing.assert_close(out[1]["x_norm_clstoken"],
                               dinov3_forward_list_oracle(ckpt, cfg, [g, loc], training=True)[1]["x_norm_clstoken"]
                               .float(), rtol=1e-5, atol=1e-5)
    model.eval()
    out = model.forward_features([g, loc], [None, None])
    torch.testing.assert_close(out[1]["x_norm_clstoken"],
                               dinov3_forward_oracle(ckpt, cfg, loc)["x_norm_clstoken"].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [TINY, TINY_7B_LIKE], ids=["vits_like", "vit7b_like"])
def test_training_forward_draws_dinov3s_numbers(cfg):
    """The seeded training forward (drop path, all three RoPE augmentations, a mask, a global and a
    local crop group) against DINOv3's training path: the same draws in the same order, the same
    numbers (a draw out of order moves whole images and fails by O(1))."""
    cfg = dict(cfg, drop_path_rate=0.4, pos_embed_rope_shift_coords=0.1, pos_embed_rope_jitter_coords=1.3,
               pos_embed_rope_rescale_coords=2.0)
    ckpt = random_dinov3_checkpoint(cfg)
    model = DinoVisionTransformer(**cfg, backend="reference")
    model.load_state_dict(ckpt, strict=True)
    model.train()
    xs, masks = [torch.randn(4, 3, 32, 48), torch.randn(6, 3, 16, 16)], [torch.rand(4, 6) < 0.4, None]
    torch.manual_seed(5)
    out = model.forward_features(xs, masks)
    torch.manual_seed(5)
    ref = dinov3_forward_list_oracle(ckpt, cfg, xs, masks, training=True)
    for crop, want in zip(out, ref):
        for key in want:
            assert rel_err(crop[key], want[key]) < 1e-5, key


def test_init_weights_draws_dinov3s_numbers():
    """After the same seed, init_weights() gives DINOv3's values: its init_weights draws cls and
    storage tokens N(0, 0.02), then named_apply(init_weights_vit) (children before parents, leaves in
    module order): patch embed U(+-1/sqrt(C p^2)) weight then bias, every Linear's weight
    trunc_normal(std 0.02); biases and the mask token 0, LayerScale to its init, norms reset."""
    model = tiny_model()  # perturbed: init must overwrite everything
    torch.manual_seed(11)
    model.init_weights()
    sd = model.state_dict()
    torch.manual_seed(11)
    d, bound = TINY["embed_dim"], 1 / math.sqrt(3 * 16 * 16)
    draws = {"cls_token": torch.empty(1, 1, d).normal_(0, 0.02),
             "storage_tokens": torch.empty(1, 4, d).normal_(0, 0.02),
             "patch_embed.proj.weight": torch.empty(d, 3, 16, 16).uniform_(-bound, bound),
             "patch_embed.proj.bias": torch.empty(d).uniform_(-bound, bound)}
    for i in range(TINY["depth"]):
        for name, shape in (("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)), ("mlp.fc1", (4 * d, d)),
                            ("mlp.fc2", (d, 4 * d))):
            draws[f"blocks.{i}.{name}.weight"] = torch.nn.init.trunc_normal_(torch.empty(shape), std=0.02)
    for name, want in draws.items():
        assert torch.equal(sd[name], want), name
    for name, value in sd.items():
        if name in draws or name.endswith(("bias_mask", "periods")):
            continue
        if name.endswith("gamma"):
            fill = TINY["layerscale_init"]
        else:
            fill = 1.0 if "norm" in name and name.endswith("weight") else 0.0
        assert value.eq(fill).all(), name


# ----------------------------------------------------------------------------- backends

@pytest.mark.parametrize("cfg", [TINY, TINY_7B_LIKE], ids=["vits_like", "vit7b_like"])
def test_fused_matches_reference_forward_backward(cfg):
    torch.manual_seed(0)
    ref_model = tiny_model("reference", **cfg)
    fused = DinoVisionTransformer(**{**TINY, **cfg}, backend="triton")
    fused.load_state_dict(ref_model.state_dict(), strict=True)
    x = [torch.randn(2, 3, 48, 32), torch.randn(3, 3, 16, 32)]
    masks = [torch.rand(2, 6) < 0.3, None]
    outs = {}
    for name, model in (("ref", ref_model), ("fused", fused)):
        model.eval()
        res = model.forward_features(x, masks)
        loss = sum((r["x_norm_patchtokens"] ** 2).mean() + r["x_norm_clstoken"].sum() for r in res)
        loss.backward()
        outs[name] = ([r["x_prenorm"] for r in res], {n: p.grad for n, p in model.named_parameters()})
    for a, b in zip(outs["fused"][0], outs["ref"][0]):
        assert rel_err(a, b) < 1e-5
    for n, g in outs["ref"][1].items():
        if g is None:  # local_cls_norm: used in training only
            assert outs["fused"][1][n] is None and "local_cls_norm" in n
            continue
        assert rel_err(outs["fused"][1][n], g) < 1e-5, n


def test_set_backend_routes_every_block():
    model = tiny_model("reference")
    model.set_backend("triton")
    assert all(blk.attn.backend == "triton" for blk in model.blocks)


# ----------------------------------------------------------------------------- multi-crop

def test_list_forward_matches_separate_forwards():
    model = tiny_model().eval()
    g, loc = torch.randn(2, 3, 32, 48), torch.randn(4, 3, 16, 16)
    mg = torch.rand(2, 6) < 0.5
    both = model.forward_features([g, loc], [mg, None])
    one = [model.forward_features(g, mg), model.forward_features(loc)]
    for a, b in zip(both, one):
        for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert model(g).shape == (2, 64)  # forward: CLS through the (Identity) head
    assert isinstance(model([g, loc], [None, None], is_training=True), list)


def test_get_intermediate_layers():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 32, 48)
    last = model.get_intermediate_layers(x, n=1, return_class_token=True, return_extra_tokens=True)
    feats = model.forward_features(x)
    (patch, cls, extra), = last
    torch.testing.assert_close(patch, feats["x_norm_patchtokens"])
    torch.testing.assert_close(cls, feats["x_norm_clstoken"])
    torch.testing.assert_close(extra, feats["x_storage_tokens"])
    both = model.get_intermediate_layers(x, n=[0, 1], reshape=True, norm=False)
    assert len(both) == 2 and both[0].shape == (2, 64, 2, 3)
    torch.testing.assert_close(both[1].flatten(2).transpose(1, 2), feats["x_prenorm"][:, 5:])
    with pytest.raises(ValueError, match="blocks"):
        model.get_intermediate_layers(x, n=[5])


# ----------------------------------------------------------------------------- RoPE

def test_rope_tables_match_formula():
    rope = RopePositionEmbedding(96, num_heads=2, base=100.0, dtype=torch.float64)
    sin, cos = rope(H=3, W=5)
    assert sin.shape == cos.shape == (15, 48)
    dh = 48
    periods = 100.0 ** (torch.arange(dh // 4, dtype=torch.float64) * 4 / dh)
    torch.testing.assert_close(rope.periods, periods)
    i, j = 2, 3  # patch (row 2, col 3)
    y, x = (i + 0.5) / 3 * 2 - 1, (j + 0.5) / 5 * 2 - 1
    ang = torch.cat([2 * math.pi * y / periods, 2 * math.pi * x / periods])
    torch.testing.assert_close(sin[i * 5 + j], torch.cat([ang, ang]).sin())
    torch.testing.assert_close(cos[i * 5 + j], torch.cat([ang, ang]).cos())
    mm = RopePositionEmbedding(96, num_heads=2, base=None, min_period=0.5, max_period=50.0, dtype=torch.float64)
    torch.testing.assert_close(mm.periods[[0, -1]], torch.tensor([0.5, 50.0], dtype=torch.float64))
    assert torch.all(mm.periods[1:] > mm.periods[:-1])
    c = RopePositionEmbedding(96, num_heads=2, normalize_coords="max", dtype=torch.float64).coords(2, 4)
    torch.testing.assert_close(c[:, 0].unique(), torch.tensor([-0.75, -0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="min_period"):
        RopePositionEmbedding(96, num_heads=2, base=100.0, min_period=1.0, max_period=10.0)
    with pytest.raises(ValueError, match="multiple of 4"):
        RopePositionEmbedding(90, num_heads=2)


def test_rope_bf16_tables_are_dinov3s():
    """DINOv3's default pos_embed_rope_dtype is bf16: coordinates, periods and angles are bf16 tensors
    and every step rounds (layers/rope_position_encoding.py), which is not fp32 tables cast to bf16."""
    bf16 = torch.bfloat16
    model = DinoVisionTransformer(embed_dim=64, depth=1, num_heads=2)
    sin, cos = model.rope_embed(H=5, W=7)
    assert model.rope_embed.periods.dtype == sin.dtype == cos.dtype == bf16
    periods = 100.0 ** (2 * torch.arange(8, dtype=bf16) / 16)
    ys, xs = torch.arange(0.5, 5, dtype=bf16) / 5, torch.arange(0.5, 7, dtype=bf16) / 7
    coords = 2.0 * torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1) - 1.0
    angles = (2 * math.pi * coords[:, :, None] / periods).flatten(1, 2).tile(2)
    assert torch.equal(model.rope_embed.periods, periods)
    assert torch.equal(sin, angles.sin()) and torch.equal(cos, angles.cos())
    fp32 = RopePositionEmbedding(64, num_heads=2, dtype=torch.float32)(H=5, W=7)
    assert not torch.equal(fp32[0].to(bf16), sin)


def test_rope_augmentations_train_only_and_seeded():
    rope = RopePositionEmbedding(64, num_heads=2, shift_coords=0.1, jitter_coords=1.2, rescale_coords=2.0,
                                 dtype=torch.float64)
    base = rope.eval()(H=4, W=4)
    torch.testing.assert_close(rope(H=4, W=4)[0], base[0], rtol=0, atol=0)  # eval: fixed
    rope.train()
    torch.manual_seed(3)
    a = rope(H=4, W=4)
    b = rope(H=4, W=4)
    torch.manual_seed(3)
    a2 = rope(H=4, W=4)
    assert not torch.allclose(a[0], base[0]) and not torch.allclose(a[0], b[0])
    torch.testing.assert_close(a2[0], a[0], rtol=0, atol=0)
    # rescale only: coords * s with log s ~ U(-log 2, log 2), one s for both axes
    only = RopePositionEmbedding(64, num_heads=2, rescale_coords=2.0, dtype=torch.float64).train()
    only.eval()
    plain = only.coords(4, 2)
    only.train()
    for _ in range(20):
        ratio = only.coords(4, 2) / plain
        assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio))
        assert 0.5 <= ratio[0, 0].item() <= 2.0


def test_model_rope_drawn_per_block_in_training():
    model = tiny_model(pos_embed_rope_rescale_coords=2.0).train()
    calls = []
    model.rope_embed.register_forward_hook(lambda m, i, o: calls.append(o[0].clone()))
    x = [torch.randn(1, 3, 32, 32), torch.randn(1, 3, 16, 16)]
    model.forward_features(x, [None, None])
    assert len(calls) == model.n_blocks * 2  # per block, per crop
    assert not torch.allclose(calls[0], calls[2])  # block 0 vs block 1, global crop
    model.eval()
    a = model.forward_features(x, [None, None])[0]["x_prenorm"]
    b = model.forward_features(x, [None, None])[0]["x_prenorm"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- drop path

def test_drop_path_eval_deterministic_and_subset_structure():
    model = tiny_model(drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model.forward_features(x)["x_prenorm"], model.forward_features(x)["x_prenorm"],
                               rtol=0, atol=0)
    blk = model.blocks[0]
    tokens, grid = model.prepare_tokens_with_masks(x)
    rope = model.rope_embed(H=grid[0], W=grid[1])
    full = blk(tokens, rope)
    blk.train()
    torch.manual_seed(0)
    out = blk(tokens, rope)
    assert not torch.allclose(out, full)  # drop path is active in training only


def test_drop_path_expectation_matches_no_drop_path():
    """One residual branch at a time (the other's LayerScale zeroed): out_i = x_i + (B/k) r_i 1[i in S],
    so E[out] = x + r exactly; the Monte-Carlo mean over seeds must approach the no-drop output."""
    torch.manual_seed(1)
    model = tiny_model(drop_path_rate=0.5, depth=1)
    blk = model.blocks[0]
    x = torch.randn(4, 3, 16, 32)
    tokens, grid = model.prepare_tokens_with_masks(x)
    tokens = tokens.detach()
    rope = model.rope_embed(H=grid[0], W=grid[1])
    for zero in ("ls2", "ls1"):
        with torch.no_grad():
            blk.ls1.gamma.fill_(0.3)
            blk.ls2.gamma.fill_(0.3)
            getattr(blk, zero).gamma.zero_()
            blk.eval()
            expect = blk(tokens, rope)
            blk.train()
            runs = 400
            total = torch.zeros_like(tokens)
            for seed in range(runs):
                torch.manual_seed(seed)
                out = blk(tokens, rope)
                moved = (out - tokens).flatten(1).norm(dim=1) > 0
                assert moved.sum() == 2  # int(4 * 0.5) images per branch
                torch.testing.assert_close(out[moved], (tokens + 2 * (expect - tokens))[moved])
                total += out
        mean = total / runs
        # each row is hit with probability 1/2: the mean's relative std is about 1 / sqrt(runs)
        assert rel_err(mean - tokens, expect - tokens) < 0.15


# ----------------------------------------------------------------------------- errors

def test_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model.forward_features(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="3 channels"):
        model.forward_features(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"4-D \[B, C, H, W\]"):
        model.forward_features(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"patch grid, got \(1, 5\)"):
        model.forward_features(torch.randn(1, 3, 32, 32), torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        model.forward_features(torch.randn(1, 3, 32, 32), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="one entry per crop"):
        model.forward_features([torch.randn(1, 3, 32, 32)] * 2, [None])
    with pytest.raises(ValueError, match="norm_layer"):
        DinoVisionTransformer(embed_dim=64, depth=1, num_heads=2, norm_layer="batchnorm")
    with pytest.raises(ValueError, match="ffn_layer"):
        DinoVisionTransformer(embed_dim=64, depth=1, num_heads=2, ffn_layer="moe")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vit_tiny")


# ----------------------------------------------------------------------------- head

@pytest.mark.parametrize("nlayers,use_bn", [(3, False), (1, False), (2, True)])
def test_dino_head(nlayers, use_bn):
    head = DINOHead(32, 50, use_bn=use_bn, nlayers=nlayers, hidden_dim=24, bottleneck_dim=16)
    head.init_weights()
    head.eval()
    names = {k: tuple(v.shape) for k, v in head.state_dict().items() if "running" not in k and "batches" not in k}
    if nlayers == 3 and not use_bn:
        assert names == {"mlp.0.weight": (24, 32), "mlp.0.bias": (24,), "mlp.2.weight": (24, 24),
                         "mlp.2.bias": (24,), "mlp.4.weight": (16, 24), "mlp.4.bias": (16,),
                         "last_layer.weight": (50, 16)}
    x = torch.randn(5, 32)
    logits, bottleneck = head(x, return_bottleneck=True)
    z = F.normalize(bottleneck, dim=-1)
    torch.testing.assert_close(logits, z @ head.last_layer.weight.T)
    torch.testing.assert_close(head(x, no_last_layer=True), z)
    torch.testing.assert_close(head(z, only_last_layer=True), logits)
    # a fused linear + loss gets the normalised bottleneck and the last layer's weight instead
    seen = head(x, last_layer_loss=lambda feats, weight: (feats, weight))
    torch.testing.assert_close(seen[0], z)
    assert seen[1] is head.last_layer.weight
    assert head.last_layer.bias is None
    meta = DINOHead(4096, 262144, hidden_dim=8192, bottleneck_dim=512, device="meta")
    assert count_params(meta) == 4096 * 8192 + 8192 * 8192 + 8192 * 512 + 8192 * 2 + 512 + 512 * 262144


def test_dino_head_oracle_3_layers():
    head = DINOHead(32, 40, hidden_dim=24, bottleneck_dim=16).double()
    sd = head.state_dict()
    x = torch.randn(6, 32, dtype=torch.float64)
    h = F.gelu(x @ sd["mlp.0.weight"].T + sd["mlp.0.bias"])
    h = F.gelu(h @ sd["mlp.2.weight"].T + sd["mlp.2.bias"])
    h = h @ sd["mlp.4.weight"].T + sd["mlp.4.bias"]
    ref = (h / h.norm(dim=-1, keepdim=True)) @ sd["last_layer.weight"].T
    assert rel_err(head(x), ref) < 1e-12


# ----------------------------------------------------------------------------- compile

def test_model_compiles_fullgraph_in_training():
    """The whole multi-crop training forward (drop path, RoPE rescale, masks, fused attention op)
    traces without a graph break and draws the same random numbers as eager."""
    model = tiny_model(None, drop_path_rate=0.3, pos_embed_rope_rescale_coords=2.0).train()
    x = [torch.randn(2, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    masks = [torch.rand(2, 4) < 0.5, None]
    torch.manual_seed(7)
    eager = model.forward_features(x, masks)
    compiled = torch.compile(model.forward_features, fullgraph=True, backend="eager")
    torch.manual_seed(7)
    out = compiled(x, masks)
    for a, b in zip(out, eager):
        torch.testing.assert_close(a["x_prenorm"], b["x_prenorm"])
