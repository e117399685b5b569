"""DINOv3's ViT family and heads on dinov3-fast's fused ops, state-dict compatible with DINOv3.

    from dinov3_fast.models import vit_large, build_model, DINOHead, count_params, flops_per_image
    model = build_model("dinov3_vitl16")                 # the published ViT-L/16 architecture
    model.load_state_dict(torch.load("dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"), strict=True)
"""
from dinov3_fast.models.block import LayerScale, SelfAttentionBlock
from dinov3_fast.models.ffn import Mlp, SwiGLUFFN
from dinov3_fast.models.flops import block_keep_fraction, count_params, flops_per_image, meta_model
from dinov3_fast.models.head import DINOHead
from dinov3_fast.models.norms import RMSNorm
from dinov3_fast.models.patch_embed import PatchEmbed
from dinov3_fast.models.rope import RopePositionEmbedding
from dinov3_fast.models.vision_transformer import (
    ARCHS, PRESETS, DinoVisionTransformer, build_model, vit_7b, vit_base, vit_giant2, vit_huge2, vit_large,
    vit_small, vit_so400m,
)

__all__ = [
    "ARCHS", "PRESETS", "DINOHead", "DinoVisionTransformer", "LayerScale", "Mlp", "PatchEmbed", "RMSNorm",
    "RopePositionEmbedding", "SelfAttentionBlock", "SwiGLUFFN", "build_model", "count_params",
    "block_keep_fraction", "flops_per_image", "meta_model", "vit_7b", "vit_base", "vit_giant2", "vit_huge2", "vit_large",
    "vit_small", "vit_so400m",
]
