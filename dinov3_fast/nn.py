"""Drop-in nn.Modules with DINOv3's constructors and forward signatures, backed by dinov3_fast.ops.

Each module is a thin wrapper: its state is DINOv3's (same parameter and buffer names), its
numbers are the op's. `backend=` (default: fastest available) is forwarded to the op.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dinov3_fast.ops import gram_loss
from dinov3_fast.ops._dispatch import (
    check_positive_int, check_rank, check_same_shape, check_shape, single_rank_as_none,
)
from dinov3_fast.ops.koleo import koleo_loss
from dinov3_fast.ops.koleo.reference import koleo_neighbors_ref
from dinov3_fast.ops.linear_soft_ce import linear_soft_cross_entropy
from dinov3_fast.ops.sinkhorn import sinkhorn_knopp
from dinov3_fast.ops.soft_ce import soft_cross_entropy
from dinov3_fast.ops.attention import apply_rope, rope_attention, rope_attention_packed


class GramLoss(nn.Module):
    """DINOv3's GramLoss (dinov3/loss/gram_loss.py) on the fused op.

    forward(output_feats, target_feats, img_level=True):
        output_feats: (B, P, D) student patch features ((N, D) allowed with img_level=False)
        target_feats: same shape, Gram-teacher patch features
        returns a 0-dim fp32 loss.
    """

    def __init__(self, apply_norm: bool = True, img_level: bool = True, remove_neg: bool = True,
                 remove_only_teacher_neg: bool = False, backend: str | None = None):
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("remove_neg and remove_only_teacher_neg are mutually exclusive; set at most one")
        self.apply_norm = apply_norm
        self.img_level = img_level  # kept for parity with DINOv3; forward's argument decides
        self.remove_neg = remove_neg
        self.remove_only_teacher_neg = remove_only_teacher_neg
        self.backend = backend

    def forward(self, output_feats: torch.Tensor, target_feats: torch.Tensor, img_level: bool = True) -> torch.Tensor:
        return gram_loss(output_feats, target_feats, normalize=self.apply_norm, img_level=img_level,
                         remove_neg=self.remove_neg, remove_only_teacher_neg=self.remove_only_teacher_neg,
                         backend=self.backend)


class LinearKMaskedBias(nn.Linear):
    """DINOv3's qkv Linear with `mask_k_bias=True`: the bias is multiplied by the buffer `bias_mask`
    [3C] (persistent, so checkpoints carry it), which zeroes the K third.

    DINOv3 fills `bias_mask` with NaN at construction and sets it to (1, 0, 1) thirds in its weight
    init; we set (1, 0, 1) at construction, so a freshly built module is usable before any init. A
    loaded checkpoint overwrites it either way.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        o = self.out_features
        if o % 3:
            raise ValueError(f"LinearKMaskedBias needs out_features divisible by 3, got {o}")
        if self.bias is not None:
            mask = torch.ones_like(self.bias)
            mask[o // 3: 2 * o // 3] = 0
            self.register_buffer("bias_mask", mask)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.bias_mask.to(self.bias.dtype) if self.bias is not None else None
        return nn.functional.linear(input, self.weight, bias)


class SelfAttention(nn.Module):
    """DINOv3's SelfAttention (dinov3/layers/attention.py) on the fused RoPE attention op.

    Same constructor and parameter names (`qkv`, `proj`, and `qkv.bias_mask` with mask_k_bias), so
    DINOv3 checkpoints load unchanged. As in DINOv3, attention dropout is not applied (DINOv3's SDPA
    call passes no dropout) and forward_list skips proj_drop.

    forward(x, attn_bias=None, rope=None):
        x: [B, N, dim]; rope: (sin, cos) each [HW, dim // num_heads] for the last HW tokens, or None.
        returns [B, N, dim].
    forward_list(x_list, attn_bias=None, rope_list=None):
        x_list: crops [B_i, N_i, dim]; rope_list: one rope (or None) per crop.
        returns [B_i, N_i, dim] per crop. On a GPU every crop's attention runs in one kernel
        launch, except that, with a gradient to compute, crops of SDPA_ROUTE_MIN_TOKENS or more go
        through the fused rotation + SDPA; on the CPU the reference runs per crop (ops/attention).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, mask_k_bias: bool = False, device=None,
                 *, backend: str | None = None) -> None:
        super().__init__()
        check_positive_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        linear_class = LinearKMaskedBias if mask_k_bias else nn.Linear
        self.qkv = linear_class(dim, dim * 3, bias=qkv_bias, device=device)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = backend

    def apply_rope(self, q: torch.Tensor, k: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(q, k, rope, backend=self.backend)

    def compute_attention(self, qkv: torch.Tensor, attn_bias=None, rope=None) -> torch.Tensor:
        if attn_bias is not None:
            raise ValueError("SelfAttention does not support attn_bias (DINOv3 asserts it is None)")
        return rope_attention(qkv, rope, num_heads=self.num_heads, backend=self.backend)

    def forward(self, x: torch.Tensor, attn_bias=None, rope=None) -> torch.Tensor:
        check_rank("x", x, 3, f"[B, N, dim={self.qkv.in_features}]")
        x = self.proj(self.compute_attention(self.qkv(x), attn_bias=attn_bias, rope=rope))
        return self.proj_drop(x)

    def forward_list(self, x_list: list[torch.Tensor], attn_bias=None, rope_list=None) -> list[torch.Tensor]:
        if attn_bias is not None:
            raise ValueError("SelfAttention does not support attn_bias (DINOv3 asserts it is None)")
        if rope_list is not None and len(rope_list) != len(x_list):
            raise ValueError(f"rope_list must have one entry per crop ({len(x_list)}), got {len(rope_list)}")
        for i, x in enumerate(x_list):
            check_rank(f"x_list[{i}]", x, 3, f"[B, N, dim={self.qkv.in_features}]")
        crops = [(x.shape[0], x.shape[1]) for x in x_list]
        x_flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in x_list])
        attn = rope_attention_packed(self.qkv(x_flat), crops, rope_list, num_heads=self.num_heads,
                                     backend=self.backend)
        out = self.proj(attn)
        return [o.view(b, n, -1) for o, (b, n) in zip(out.split([b * n for b, n in crops]), crops)]


# ----------------------------------------------------------------------------- DINO / iBOT losses
# DINOv3's dinov3/loss/dino_clstoken_loss.py and ibot_patch_loss.py, on sinkhorn_knopp and
# soft_cross_entropy. Centre EMA and softmax centring stay in PyTorch (one softmax pass each).
# Distributed: DINOv3 reduces over its process subgroup whenever torch.distributed is initialised;
# these modules use `group` (default: the world group when initialised; a group of one rank, as
# one GPU's FSDP2 group, counts as none: nothing to reduce, and the single-process kernels run).


def _loss_group(group):
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    return single_rank_as_none(group)


class _CenterEMA(nn.Module):
    """The asynchronous centre EMA shared by DINOLoss and iBOTPatchLoss (state names as DINOv3's)."""

    def _init_center(self, shape, center_momentum, group, backend):
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.full(shape, math.nan))
        self.updated = True
        self.reduce_handle = None
        self.async_batch_center = None
        self.group = group
        self.backend = backend

    def init_weights(self) -> None:
        self.center.zero_()

    @torch.no_grad()
    def _softmax_centered(self, teacher_logits, teacher_temp, update_centers):
        """softmax((teacher_logits - center) / teacher_temp), applying a pending centre update first
        if update_centers. Each loss's `softmax_center_teacher` calls it with DINOv3's argument name."""
        if update_centers:
            self.apply_center_update()
        return F.softmax((teacher_logits - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def _start_center_reduce(self, batch_center: torch.Tensor, count: int) -> None:
        self.updated = False
        self._center_count = count
        self.async_batch_center = batch_center
        group = _loss_group(self.group)
        if group is not None:
            self.reduce_handle = dist.all_reduce(self.async_batch_center, async_op=True, group=group)

    @torch.no_grad()
    def apply_center_update(self):
        if self.updated is False:
            group = _loss_group(self.group)
            world_size = dist.get_world_size(group) if group is not None else 1
            if self.reduce_handle is not None:
                self.reduce_handle.wait()
            _t = self.async_batch_center / (self._center_count * world_size)
            self.center = self.center * self.center_momentum + _t * (1 - self.center_momentum)
            self.updated = True


class SinkhornKnoppTeacher(nn.Module):
    """DINOv3's SinkhornKnoppTeacher (ibot_patch_loss.py) on the fused op.

    forward(teacher_output (B, K), teacher_temp, n_masked_patches_tensor, n_iterations=3) -> (B, K)
    fp32. As in DINOv3, `n_masked_patches_tensor` is all-reduced in place when a process group is
    active; the assignment itself does not depend on it (see `sinkhorn_knopp`). B may be 0: the
    rank still joins every all-reduce and gets a (0, K) result.
    """

    def __init__(self, backend: str | None = None, group=None):
        super().__init__()
        self.backend = backend
        self.group = group

    @torch.no_grad()
    def forward(self, teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3):
        group = _loss_group(self.group)
        if group is not None and isinstance(n_masked_patches_tensor, torch.Tensor):
            dist.all_reduce(n_masked_patches_tensor, group=group)
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=n_iterations,
                              n_samples=n_masked_patches_tensor, group=group, backend=self.backend)


class DINOLoss(_CenterEMA):
    """DINOv3's DINOLoss (dino_clstoken_loss.py) on the fused ops.

    forward(student_logits (S, B, K), teacher_probs (T, B, K), ignore_diagonal=False) -> 0-dim fp32.
    Lists of (B, K) crops are stacked. forward_linear(student_features (S, B, d), last_layer_weight
    (K, d), teacher_probs, ignore_diagonal=False): the same loss with the head's last layer fused in.
    sinkhorn_knopp_teacher(teacher_output (B, K), teacher_temp, n_iterations=3) -> (B, K);
    softmax_center_teacher(teacher_output, teacher_temp, update_centers=True) / update_center as in DINOv3.
    """

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9, backend: str | None = None, group=None):
        super().__init__()
        self.student_temp = student_temp
        self._init_center((1, out_dim), center_momentum, group, backend)
        self.len_teacher_output = None

    def softmax_center_teacher(self, teacher_output, teacher_temp, update_centers=True):
        return self._softmax_centered(teacher_output, teacher_temp, update_centers)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_iterations=3):
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=n_iterations,
                              group=_loss_group(self.group), backend=self.backend)

    def forward(self, student_logits, teacher_probs, ignore_diagonal=False):
        if isinstance(student_logits, (list, tuple)):
            student_logits = torch.stack(list(student_logits))
        if isinstance(teacher_probs, (list, tuple)):
            teacher_probs = torch.stack(list(teacher_probs))
        return soft_cross_entropy(student_logits, teacher_probs, student_temp=self.student_temp,
                                  ignore_diagonal=ignore_diagonal, backend=self.backend)

    def forward_linear(self, student_features, last_layer_weight, teacher_probs, ignore_diagonal=False):
        """forward(F.linear(student_features, last_layer_weight), ...) without forming the logits:
        student_features (S, B, d) the normalised head bottlenecks, last_layer_weight (K, d) (see
        `DINOHead.forward(last_layer_loss=...)`). Same value and gradients."""
        return linear_soft_cross_entropy(student_features, last_layer_weight, teacher_probs,
                                         student_temp=self.student_temp, ignore_diagonal=ignore_diagonal,
                                         backend=self.backend)

    @torch.no_grad()
    def update_center(self, teacher_output):
        self.reduce_center_update(teacher_output)

    @torch.no_grad()
    def reduce_center_update(self, teacher_output):
        self.len_teacher_output = len(teacher_output)
        self._start_center_reduce(torch.sum(teacher_output, dim=0, keepdim=True), self.len_teacher_output)


class iBOTPatchLoss(_CenterEMA):  # noqa: N801  (DINOv3's name)
    """DINOv3's iBOTPatchLoss (ibot_patch_loss.py) on the fused ops.

    forward(student_patch_tokens (B, N, K), teacher_patch_tokens (B, N, K), student_masks_flat (B, N))
    forward_masked(student (M, K), teacher (M, K), student_masks_flat (B, N), n_masked_patches=None,
                   masks_weight=None (M,)) -> 0-dim fp32. M = 0 (no masked patch on this rank) gives
                   DINOv3's empty sum, 0, still computed from the student tokens: the iBOT head
                   gets zero gradients, so its backward (and FSDP's collectives) run as on other ranks.
    forward_masked_linear(student_features (M, d), last_layer_weight (K, d), teacher (M, K), ...):
                   the same loss with the head's last layer fused in.
    softmax_center_teacher(teacher_patch_tokens, teacher_temp, update_centers=True) / update_center as in DINOv3.
    `sinkhorn_knopp_teacher` is a SinkhornKnoppTeacher module, as in DINOv3 (which compiles it;
    the fused op needs no compilation).
    """

    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9, backend: str | None = None, group=None):
        super().__init__()
        self.student_temp = student_temp
        self._init_center((1, 1, patch_out_dim), center_momentum, group, backend)
        self.len_teacher_patch_tokens = None
        self.sinkhorn_knopp_teacher = SinkhornKnoppTeacher(backend=backend, group=group)

    def softmax_center_teacher(self, teacher_patch_tokens, teacher_temp, update_centers=True):
        return self._softmax_centered(teacher_patch_tokens, teacher_temp, update_centers)

    def forward(self, student_patch_tokens, teacher_patch_tokens, student_masks_flat):
        check_rank("student_patch_tokens", student_patch_tokens, 3, "(B, N, K)")
        check_same_shape("student_patch_tokens", student_patch_tokens, "teacher_patch_tokens", teacher_patch_tokens)
        check_shape("student_masks_flat", student_masks_flat, student_patch_tokens.shape[:2], "(B, N)")
        batch, n_tokens, k = student_patch_tokens.shape
        masks = student_masks_flat.float()
        weights = (masks / masks.sum(-1, keepdim=True).clamp(min=1.0)).flatten() / batch
        return soft_cross_entropy(student_patch_tokens.reshape(batch * n_tokens, k),
                                  teacher_patch_tokens.reshape(batch * n_tokens, k),
                                  student_temp=self.student_temp, weights=weights, backend=self.backend)

    def forward_masked(self, student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat,
                       n_masked_patches=None, masks_weight=None):
        check_same_shape("student_patch_tokens_masked", student_patch_tokens_masked, "teacher_patch_tokens_masked",
                         teacher_patch_tokens_masked)
        s, t, weights = self._masked_terms("student_patch_tokens_masked", student_patch_tokens_masked,
                                           teacher_patch_tokens_masked, student_masks_flat, n_masked_patches,
                                           masks_weight)
        if s.shape[0] == 0:
            return s.sum(dtype=torch.float64 if s.dtype == torch.float64 else torch.float32)
        return soft_cross_entropy(s, t, student_temp=self.student_temp, weights=weights, backend=self.backend)

    def forward_masked_linear(self, student_features_masked, last_layer_weight, teacher_patch_tokens_masked,
                              student_masks_flat, n_masked_patches=None, masks_weight=None):
        """forward_masked(F.linear(student_features_masked, last_layer_weight), ...) without forming
        the logits: student_features_masked (M, d) the masked tokens' normalised head bottlenecks,
        last_layer_weight (K, d) (see `DINOHead.forward(last_layer_loss=...)`). Same value and
        gradients; with M = 0 the last layer still gets its zero gradient."""
        s, t, weights = self._masked_terms("student_features_masked", student_features_masked,
                                           teacher_patch_tokens_masked, student_masks_flat, n_masked_patches,
                                           masks_weight)
        if s.shape[0] == 0:
            return F.linear(s, last_layer_weight).sum(dtype=torch.float64 if s.dtype == torch.float64 else torch.float32)
        return linear_soft_cross_entropy(s, last_layer_weight, t, student_temp=self.student_temp, weights=weights,
                                         backend=self.backend)

    @staticmethod
    def _masked_terms(student_name, student, teacher, student_masks_flat, n_masked_patches, masks_weight):
        """(student rows, teacher rows, per-row weights) of the masked-token loss, as DINOv3 forms them.

        student: (M, K) logits or (M, d) features, named `student_name` in errors; teacher (M, K);
        student_masks_flat: (B, N) bool; masks_weight: None or one weight per row kept by
        n_masked_patches (the mask's masked patches when None)."""
        check_rank(student_name, student, 2, "(M, K) or (M, d)")
        check_rank("teacher_patch_tokens_masked", teacher, 2, "(M, K)")
        if teacher.shape[0] != student.shape[0]:
            raise ValueError(f"{student_name} {tuple(student.shape)} and teacher_patch_tokens_masked "
                             f"{tuple(teacher.shape)} must have the same number of rows M")
        if student_masks_flat.dtype != torch.bool:  # an integer mask would index, not select
            raise TypeError(f"student_masks_flat must be a bool (B, N) mask, got {student_masks_flat.dtype}")
        check_rank("student_masks_flat", student_masks_flat, 2, "(B, N)")
        derived = masks_weight is None
        if derived:
            masks_weight = (
                (1 / student_masks_flat.sum(-1).clamp(min=1.0))
                .unsqueeze(-1)
                .expand_as(student_masks_flat)[student_masks_flat]
            )
        if n_masked_patches is not None:  # DINOv3 slices the per-token losses; slicing first is equal
            n = int(n_masked_patches)
            student, teacher = student[:n], teacher[:n]
        rows = student.shape[0]
        if derived and torch.compiler.is_compiling():  # the mask's count is data-dependent: assert at run time
            torch._check(masks_weight.shape[0] == rows)
        elif derived and masks_weight.shape[0] != rows:
            raise ValueError(f"student_masks_flat marks {masks_weight.shape[0]} patches but {student_name} has "
                             f"{rows} rows (after n_masked_patches); they must agree")
        check_shape("masks_weight", masks_weight, (rows,), "(M,)")
        return student, teacher, masks_weight / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens):
        self.reduce_center_update(teacher_patch_tokens)

    @torch.no_grad()
    def reduce_center_update(self, teacher_patch_tokens):
        self.len_teacher_patch_tokens = len(teacher_patch_tokens)
        self._start_center_reduce(torch.sum(teacher_patch_tokens.mean(1), dim=0, keepdim=True),
                                  self.len_teacher_patch_tokens)


class KoLeoLoss(nn.Module):
    """DINOv3's KoLeoLoss (dinov3/loss/koleo_loss.py) on the fused op: no n x n matrix.

    forward(student_output, eps=1e-8):
        student_output: (n, D) features, n >= 2 (normalised inside in fp32, autocast off)
        returns a 0-dim fp32 loss, -mean log(||y_i - y_nn(i) + 1e-8|| + eps).
    pairwise_NNs_inner(x): DINOv3's neighbour search alone (forward does not call it).
    """

    def __init__(self, backend: str | None = None):
        super().__init__()
        self.backend = backend

    @torch.no_grad()
    def pairwise_NNs_inner(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802  (DINOv3's name)
        """x: (n, D) L2-normalised rows -> (n,) index of each row's nearest other row (largest dot;
        ties to the lowest index). Forms the n x n dots, as DINOv3 does."""
        return koleo_neighbors_ref(x, x, 0, 1)[:, 0]

    def forward(self, student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        return koleo_loss(student_output, eps=eps, backend=self.backend)


class KoLeoLossDistributed(nn.Module):
    """DINOv3's KoLeoLossDistributed on the fused op: features are all-gathered (autograd-aware)
    within each loss group of `loss_group_size` samples when torch.distributed is initialised.

    forward(student_output, eps=1e-8):
        student_output: (n, D) this rank's features (the same n on every rank)
        returns a 0-dim fp32 loss: the mean over this rank's n * topk (row, neighbour) pairs.
    pairwise_NNs_inner(x, all_x, rank): DINOv3's neighbour search alone (forward does not call it).
    """

    def __init__(self, topk: int = 1, loss_group_size: int | None = None, backend: str | None = None):
        super().__init__()
        self.topk = topk
        self.loss_group_size = loss_group_size
        self.backend = backend

    @torch.no_grad()
    def pairwise_NNs_inner(self, x: torch.Tensor, all_x: torch.Tensor, rank: int) -> torch.Tensor:  # noqa: N802
        """x: (n, D) this rank's L2-normalised rows, all_x: (M, D) its loss group's, in which x starts
        at row rank * n (`rank`: the rank's place in the group) -> (n, topk) indices into all_x, best
        first (own entry scored -1; ties to the lowest index). Forms the n x M dots, as DINOv3 does."""
        return koleo_neighbors_ref(x, all_x, rank * x.shape[0], self.topk)

    def forward(self, student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
        return koleo_loss(student_output, eps=eps, topk=self.topk, group=group,
                          loss_group_size=self.loss_group_size, backend=self.backend)
