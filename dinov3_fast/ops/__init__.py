"""Functional forms of every fused op. Each sub-package holds one op: reference, kernels, dispatch."""
from dinov3_fast.ops.gram import gram_loss

__all__ = ["gram_loss"]
