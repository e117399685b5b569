"""Functional forms of every fused op. Each sub-package holds one op: reference, kernels, dispatch."""
from dinov3_fast.ops.attention import apply_rope, rope_attention, rope_attention_list
from dinov3_fast.ops.gram import gram_loss
from dinov3_fast.ops.koleo import koleo_loss
from dinov3_fast.ops.linear_soft_ce import linear_soft_cross_entropy
from dinov3_fast.ops.sinkhorn import sinkhorn_knopp
from dinov3_fast.ops.soft_ce import soft_cross_entropy

__all__ = ["apply_rope", "gram_loss", "koleo_loss", "linear_soft_cross_entropy", "rope_attention", "rope_attention_list", "sinkhorn_knopp", "soft_cross_entropy"]
