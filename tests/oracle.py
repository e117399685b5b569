"""Comparisons against the float64 oracles, shared by the op tests."""
import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64 (an all-zero ref counts as 1e-30)."""
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def loss_scale(ref_grad: torch.Tensor) -> float:
    """The power of two that brings the largest |ref_grad| entry to [1, 2): what fp16 training's
    loss scaling does, so that fp16 gradients of a mean over many entries stay above fp16's
    smallest subnormal."""
    return 2.0 ** -torch.floor(torch.log2(ref_grad.abs().max())).item()
