"""DINOv3's DinoVisionTransformer (dinov3/models/vision_transformer.py) on the fused ops.

Legend: B images, C channels, H x W patch grid (HW = H*W), R = 1 + n_storage_tokens prefix
tokens, N = R + HW tokens, D embed dim, Dh head dim.

Tokens are [cls, storage_1..storage_S, patches]; there is no absolute position embedding, the
blocks get RoPE tables from `rope_embed` (recomputed per block, so training-time coordinate
augmentations are drawn per block and per crop, as DINOv3 does; without augmentations to draw,
e.g. in eval mode, one set of tables serves every block).

State-dict compatibility with DINOv3 (a DINOv3 checkpoint loads with strict=True):
  patch_embed.proj.{weight,bias}, cls_token [1,1,D], storage_tokens [1,S,D] (S > 0 only),
  mask_token [1,D], rope_embed.periods [Dh/4] (a *persistent buffer*),
  blocks.i.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.*,ls2.gamma}, norm, cls_norm
  (untie_cls_and_patch_norms), local_cls_norm (untie_global_and_local_cls_norm), and with
  mask_k_bias and a qkv bias the buffer blocks.i.attn.qkv.bias_mask [3D], which DINOv3 creates
  full of NaN and only fills (1 for q and v, 0 for k) in init_weights(). Checkpoints carry the
  filled mask. Here `dinov3_fast.nn.LinearKMaskedBias` fills it at construction and init_weights()
  fills it again (after `to_empty` it holds garbage), so a model that is built and used without
  loading or init_weights() still computes finite numbers.

Meta device: build with device="meta" (or under `with torch.device("meta")`), shard, then
`to_empty(device=...)` and `init_weights()`, which also recomputes both buffers.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from dinov3_fast.models.block import LayerScale, SelfAttentionBlock
from dinov3_fast.models.ffn import ffn_layer as get_ffn_layer
from dinov3_fast.models.norms import RMSNorm
from dinov3_fast.models.norms import norm_layer as get_norm_layer
from dinov3_fast.models.patch_embed import PatchEmbed
from dinov3_fast.models.rope import RopePositionEmbedding

ROPE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def fill_bias_mask(linear: nn.Module) -> None:
    """Set a masked-k-bias qkv Linear's `bias_mask` [3D] to 1 (q, v) and 0 (k), as DINOv3 does."""
    mask = getattr(linear, "bias_mask", None)
    if mask is None:
        return
    o = mask.shape[0]
    with torch.no_grad():
        mask.fill_(1)
        mask[o // 3: 2 * o // 3].fill_(0)


def init_weights_vit(module: nn.Module) -> None:
    """DINOv3's per-module init: trunc_normal(0.02) Linear weights, zero biases, reset norms,
    LayerScale and the patch embedding, and fill the k-bias mask."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
        fill_bias_mask(module)
    if isinstance(module, (nn.LayerNorm, LayerScale, PatchEmbed, RMSNorm)):
        module.reset_parameters()


class DinoVisionTransformer(nn.Module):
    """DINOv3's ViT. Constructor arguments are DINOv3's (same names and defaults), plus
    `backend`: the attention op's backend (None = fastest available, "reference" = plain
    PyTorch, "triton", ...); change it later with `set_backend`.

    forward(x, masks=None, is_training=False): the CLS feature [B, D] through `head` (Identity),
    or with is_training=True the dict(s) of `forward_features`.
    """

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 pos_embed_rope_base: float | None = 100.0, pos_embed_rope_min_period: float | None = None,
                 pos_embed_rope_max_period: float | None = None,
                 pos_embed_rope_normalize_coords: Literal["min", "max", "separate"] = "separate",
                 pos_embed_rope_shift_coords: float | None = None, pos_embed_rope_jitter_coords: float | None = None,
                 pos_embed_rope_rescale_coords: float | None = None, pos_embed_rope_dtype: str = "bf16",
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, ffn_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0, layerscale_init: float | None = None,
                 norm_layer: str = "layernorm", ffn_layer: str = "mlp", ffn_bias: bool = True,
                 proj_bias: bool = True, n_storage_tokens: int = 0, mask_k_bias: bool = False,
                 untie_cls_and_patch_norms: bool = False, untie_global_and_local_cls_norm: bool = False,
                 backend: str | None = None, device: Any | None = None, **ignored_kwargs: Any) -> None:
        super().__init__()
        if ignored_kwargs:  # DINOv3 logs and ignores unknown options (its configs carry extra keys)
            warnings.warn(f"DinoVisionTransformer: ignored arguments {sorted(ignored_kwargs)}", stacklevel=2)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if pos_embed_rope_dtype not in ROPE_DTYPES:
            raise ValueError(f"pos_embed_rope_dtype must be one of {tuple(ROPE_DTYPES)}, got {pos_embed_rope_dtype!r}")
        norm_cls = get_norm_layer(norm_layer)
        ffn_cls = get_ffn_layer(ffn_layer)
        self.num_features = self.embed_dim = embed_dim
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.ffn_layer_name = ffn_layer
        self.ffn_ratio = ffn_ratio
        self.backend = backend

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, flatten_embedding=False,
                                      device=device)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, device=device))
        self.n_storage_tokens = n_storage_tokens
        if n_storage_tokens > 0:
            self.storage_tokens = nn.Parameter(torch.zeros(1, n_storage_tokens, embed_dim, device=device))
        self.rope_embed = RopePositionEmbedding(
            embed_dim, num_heads=num_heads, base=pos_embed_rope_base, min_period=pos_embed_rope_min_period,
            max_period=pos_embed_rope_max_period, normalize_coords=pos_embed_rope_normalize_coords,
            shift_coords=pos_embed_rope_shift_coords, jitter_coords=pos_embed_rope_jitter_coords,
            rescale_coords=pos_embed_rope_rescale_coords, dtype=ROPE_DTYPES[pos_embed_rope_dtype], device=device)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(embed_dim, num_heads, ffn_ratio=ffn_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias,
                               ffn_bias=ffn_bias, drop_path=drop_path_rate, norm_layer=norm_cls,
                               act_layer=nn.GELU, ffn_layer=ffn_cls, init_values=layerscale_init,
                               mask_k_bias=mask_k_bias, backend=backend, device=device)
            for _ in range(depth))
        self.chunked_blocks = False
        self.norm = norm_cls(embed_dim, device=device)  # all tokens, or patch tokens when untied
        self.untie_cls_and_patch_norms = untie_cls_and_patch_norms
        self.cls_norm = norm_cls(embed_dim, device=device) if untie_cls_and_patch_norms else None
        self.untie_global_and_local_cls_norm = untie_global_and_local_cls_norm
        # Local-crop CLS/storage norm: training only, for the second entry of a crop list.
        self.local_cls_norm = norm_cls(embed_dim, device=device) if untie_global_and_local_cls_norm else None
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim, device=device))

    # ------------------------------------------------------------------ setup

    def init_weights(self) -> None:
        """DINOv3's init (also what a meta-device model needs after to_empty): periods, tokens
        N(0, 0.02), mask token 0, then `init_weights_vit` on every module."""
        self.rope_embed.reset_parameters()
        nn.init.normal_(self.cls_token, std=0.02)
        if self.n_storage_tokens > 0:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            init_weights_vit(m)

    def set_backend(self, backend: str | None) -> None:
        """Route every block's attention to `backend` (None: fastest available)."""
        self.backend = backend
        for blk in self.blocks:
            blk.attn.backend = backend

    # ------------------------------------------------------------------ tokens

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None,
                                  name: str = "x") -> tuple[torch.Tensor, tuple[int, int]]:
        """Images [B, C, H*p, W*p] (+ bool masks [B, HW]) -> tokens [B, N, D] and (H, W).
        Masked patches are replaced by `mask_token`."""
        gh, gw = self.patch_embed.check_input(x, name)
        if masks is not None:
            _check_masks(masks, x.shape[0], gh, gw, f"masks for {name}")
            masks = masks.reshape(x.shape[0], gh * gw)
        x = self.patch_embed(x).flatten(1, 2)  # [B, HW, D]
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
            cls_token = self.cls_token
        else:
            cls_token = self.cls_token + 0 * self.mask_token  # keeps mask_token in the graph, as DINOv3
        prefix = [cls_token.expand(x.shape[0], -1, -1)]
        if self.n_storage_tokens > 0:
            prefix.append(self.storage_tokens.expand(x.shape[0], -1, -1))
        return torch.cat([*prefix, x], dim=1), (gh, gw)

    def _ropes(self, grids: Sequence[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.rope_embed(H=h, W=w) for h, w in grids]

    def _ropes_per_block(self, grids: Sequence[tuple[int, int]]):
        """The tables of each block in turn (one (sin, cos) per grid): drawn afresh per block and
        crop when the embedding draws augmentations (DINOv3's calls); otherwise one set serves every
        block (the teachers: ~10 small kernels per block and crop size saved)."""
        shared = None if self.rope_embed.draws_per_call else self._ropes(grids)
        for _ in self.blocks:
            yield self._ropes(grids) if shared is None else shared

    # ------------------------------------------------------------------ features

    def forward_features_list(self, x_list: list[torch.Tensor],
                              masks_list: list[torch.Tensor | None] | None = None) -> list[dict[str, torch.Tensor]]:
        """Several crops (e.g. [global [2B, C, 256, 256], local [8B, C, 112, 112]]) in one pass.

        Returns one dict per crop: x_norm_clstoken [B_i, D], x_storage_tokens [B_i, S, D],
        x_norm_patchtokens [B_i, HW_i, D], x_prenorm [B_i, N_i, D], masks (as given).
        """
        if masks_list is None:
            masks_list = [None] * len(x_list)
        if len(masks_list) != len(x_list):
            raise ValueError(f"masks list must have one entry per crop: {len(x_list)} crops, got {len(masks_list)}")
        xs, grids = [], []
        for i, (x, m) in enumerate(zip(x_list, masks_list)):
            tokens, grid = self.prepare_tokens_with_masks(x, m, name=f"x[{i}]")
            xs.append(tokens)
            grids.append(grid)
        for blk, ropes in zip(self.blocks, self._ropes_per_block(grids)):
            xs = blk(xs, ropes)
        r = self.n_storage_tokens + 1
        output = []
        for idx, (x, masks) in enumerate(zip(xs, masks_list)):
            if self.untie_cls_and_patch_norms or self.untie_global_and_local_cls_norm:
                if self.untie_global_and_local_cls_norm and self.training and idx == 1:
                    x_cls_reg = self.local_cls_norm(x[:, :r])  # the second crop group is the local crops
                elif self.untie_cls_and_patch_norms:
                    x_cls_reg = self.cls_norm(x[:, :r])
                else:
                    x_cls_reg = self.norm(x[:, :r])
                x_patch = self.norm(x[:, r:])
            else:
                x_norm = self.norm(x)
                x_cls_reg, x_patch = x_norm[:, :r], x_norm[:, r:]
            output.append({"x_norm_clstoken": x_cls_reg[:, 0], "x_storage_tokens": x_cls_reg[:, 1:],
                           "x_norm_patchtokens": x_patch, "x_prenorm": x, "masks": masks})
        return output

    def forward_features(self, x: torch.Tensor | list[torch.Tensor], masks=None):
        """One crop [B, C, H, W] (masks [B, HW] or None) -> one dict; a list of crops -> a list."""
        if isinstance(x, torch.Tensor):
            return self.forward_features_list([x], [masks])[0]
        return self.forward_features_list(list(x), masks)

    def _get_intermediate_layers_not_chunked(self, x: torch.Tensor, n: int | Sequence[int] = 1) -> list[torch.Tensor]:
        x, grid = self.prepare_tokens_with_masks(x)
        total = len(self.blocks)
        take = range(total - n, total) if isinstance(n, int) else n
        output = []
        for i, (blk, (rope,)) in enumerate(zip(self.blocks, self._ropes_per_block([grid]))):
            x = blk(x, rope)
            if i in take:
                output.append(x)
        if len(output) != len(take):
            raise ValueError(f"n={n}: only {len(output)} of {len(take)} requested blocks exist (depth {total})")
        return output

    def get_intermediate_layers(self, x: torch.Tensor, *, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, return_extra_tokens: bool = False,
                                norm: bool = True):
        """Outputs of the last `n` blocks (or of the blocks listed in `n`), DINOv3's semantics.

        Each output: patch tokens [B, HW, D] (or [B, D, H, W] with reshape), optionally paired with
        the CLS token [B, D] and/or the storage tokens [B, S, D].
        """
        outputs = self._get_intermediate_layers_not_chunked(x, n)
        r = self.n_storage_tokens + 1
        if norm:
            if self.untie_cls_and_patch_norms:
                outputs = [torch.cat((self.cls_norm(o[:, :r]), self.norm(o[:, r:])), dim=1) for o in outputs]
            else:
                outputs = [self.norm(o) for o in outputs]
        class_tokens = [o[:, 0] for o in outputs]
        extra_tokens = [o[:, 1:r] for o in outputs]
        outputs = [o[:, r:] for o in outputs]
        if reshape:
            b, _, h, w = x.shape
            gh, gw = h // self.patch_embed.patch_size[0], w // self.patch_embed.patch_size[1]
            outputs = [o.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for o in outputs]
        if return_class_token and return_extra_tokens:
            return tuple(zip(outputs, class_tokens, extra_tokens))
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        if return_extra_tokens:
            return tuple(zip(outputs, extra_tokens))
        return tuple(outputs)

    def forward(self, *args, is_training: bool = False, **kwargs):
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        return self.head(ret["x_norm_clstoken"])


def _check_masks(masks: torch.Tensor, batch: int, gh: int, gw: int, name: str) -> None:
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor, got {type(masks).__name__}")
    if masks.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {masks.dtype}")
    if tuple(masks.shape) not in ((batch, gh * gw), (batch, gh, gw)):
        raise ValueError(f"{name} must have shape [B, H*W] = {(batch, gh * gw)} (or [B, H, W] = "
                         f"{(batch, gh, gw)}) for the {gh}x{gw} patch grid, got {tuple(masks.shape)}")


# ---------------------------------------------------------------------------- architectures
# DINOv3's factories: they fix the trunk's shape and take every other option as a keyword, with
# DinoVisionTransformer's defaults (the options DINOv3 trains or publishes with are in PRESETS).

ARCHS: dict[str, dict[str, Any]] = {
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, ffn_ratio=4),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4),
    "vit_so400m": dict(embed_dim=1152, depth=27, num_heads=18, ffn_ratio=3.777777778),
    "vit_huge2": dict(embed_dim=1280, depth=32, num_heads=20, ffn_ratio=4),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, ffn_ratio=4),
    "vit_7b": dict(embed_dim=4096, depth=40, num_heads=32, ffn_ratio=3),
}


def _factory(arch: str):
    def build(patch_size: int = 16, **kwargs: Any) -> DinoVisionTransformer:
        return DinoVisionTransformer(patch_size=patch_size, **{**ARCHS[arch], **kwargs})
    build.__name__ = arch
    build.__doc__ = f"DINOv3's {arch}: {ARCHS[arch]}; other options as keywords (DinoVisionTransformer)."
    return build


vit_small = _factory("vit_small")
vit_base = _factory("vit_base")
vit_large = _factory("vit_large")
vit_so400m = _factory("vit_so400m")
vit_huge2 = _factory("vit_huge2")
vit_giant2 = _factory("vit_giant2")
vit_7b = _factory("vit_7b")

# The published backbones (dinov3/hub/backbones.py): common options, then per model. Their
# checkpoints load into these with strict=True. The weights are LVD-1689M's, except the SAT-493M
# ViT-L (dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth), which DINOv3 builds with an untied local CLS
# norm; the SAT-493M ViT-7B has dinov3_vit7b16's options.
_PUBLISHED = dict(patch_size=16, img_size=224, in_chans=3, pos_embed_rope_base=100,
                  pos_embed_rope_normalize_coords="separate", pos_embed_rope_rescale_coords=2,
                  pos_embed_rope_dtype="fp32", qkv_bias=True, drop_path_rate=0.0, layerscale_init=1e-5,
                  norm_layer="layernormbf16", ffn_layer="mlp", ffn_bias=True, proj_bias=True,
                  n_storage_tokens=4, mask_k_bias=True)
PRESETS: dict[str, dict[str, Any]] = {
    "dinov3_vits16": {**_PUBLISHED, "arch": "vit_small"},
    "dinov3_vits16plus": {**_PUBLISHED, "arch": "vit_small", "ffn_ratio": 6, "ffn_layer": "swiglu"},
    "dinov3_vitb16": {**_PUBLISHED, "arch": "vit_base"},
    "dinov3_vitl16": {**_PUBLISHED, "arch": "vit_large"},
    "dinov3_vitl16_sat493m": {**_PUBLISHED, "arch": "vit_large", "untie_global_and_local_cls_norm": True},
    "dinov3_vitl16plus": {**_PUBLISHED, "arch": "vit_large", "ffn_ratio": 6.0, "ffn_layer": "swiglu"},
    "dinov3_vith16plus": {**_PUBLISHED, "arch": "vit_huge2", "ffn_ratio": 6.0, "ffn_layer": "swiglu"},
    "dinov3_vit7b16": {**_PUBLISHED, "arch": "vit_7b", "qkv_bias": False, "ffn_layer": "swiglu64",
                       "untie_global_and_local_cls_norm": True},
}


def build_model(name: str, **overrides: Any) -> DinoVisionTransformer:
    """A model by arch name (`ARCHS`, DINOv3's defaults) or published preset (`PRESETS`).

    `overrides` replace any option, e.g. build_model("dinov3_vit7b16", device="meta",
    drop_path_rate=0.4) for the 7B pretraining student.
    """
    if name in PRESETS:
        cfg = {**PRESETS[name], **overrides}
        arch = cfg.pop("arch")
    elif name in ARCHS:
        cfg, arch = dict(overrides), name
    else:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(ARCHS) + sorted(PRESETS)}")
    return DinoVisionTransformer(**{**ARCHS[arch], **cfg})
