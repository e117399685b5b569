"""One DINOv3 SSL step (dinov3/train/ssl_meta_arch.py) on dinov3-fast's models and fused losses.

Legend: B images per rank, n local crops, HW global-crop patches, M masked patches (over the 2B
global crops), D embed dim, K / Ki DINO / iBOT prototypes.

    arch = SSLMetaArch(cfg)            # student, EMA teacher, optional Gram teacher, losses
    arch.init_weights()                # DINOv3's init; teacher <- student
    loss, logs = arch.forward_backward(batch, teacher_temp=0.04, iteration=it)   # calls backward
    arch.update_ema(momentum)          # foreach on the local shards

The step is DINOv3's: the teacher sees the 2 global crops and centres its DINO (CLS) and iBOT
(masked patches) outputs with Sinkhorn-Knopp; the student sees global (iBOT-masked) and local
crops in one backbone call; the losses are the DINO local term (local crops vs teacher globals),
the DINO global term (ignore_diagonal), KoLeo on the student's pre-head global CLS tokens, iBOT
on masked patches and, optionally, Gram anchoring against the Gram teacher's (bicubically resized)
patch features, with DINOv3's weights and term scales. `cfg.train.ops` picks the fused ops
("fused": every op's fastest backend) or their plain-PyTorch references ("reference"), model
attention included.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dinov3_fast.models import DINOHead, build_model
from dinov3_fast.nn import DINOLoss, GramLoss, KoLeoLoss, KoLeoLossDistributed, iBOTPatchLoss
from dinov3_fast.train.config import Config, ConfigError
from dinov3_fast.train.data import Batch
from dinov3_fast.train.masking import mask_metadata
from dinov3_fast.train.schedules import loss_weight_schedules


def ops_backend(cfg: Config) -> str | None:
    """The `backend=` every op and the model get: None (fastest available) or "reference"."""
    return None if cfg.train.ops == "fused" else "reference"


def build_backbone(cfg: Config, *, drop_path_rate: float, device=None) -> nn.Module:
    """The student's DinoVisionTransformer from cfg.student (DINOv3's build_model_from_cfg)."""
    s = cfg.student
    trunk = {k: v for k, v in dict(embed_dim=s.embed_dim, depth=s.depth, num_heads=s.num_heads,
                                   ffn_ratio=s.ffn_ratio).items() if v is not None}
    return build_model(
        s.arch, img_size=cfg.crops.global_crops_size, patch_size=s.patch_size, in_chans=s.in_chans,
        pos_embed_rope_base=s.pos_embed_rope_base, pos_embed_rope_rescale_coords=s.pos_embed_rope_rescale_coords,
        pos_embed_rope_dtype=s.pos_embed_rope_dtype, qkv_bias=s.qkv_bias, proj_bias=s.proj_bias,
        ffn_bias=s.ffn_bias, ffn_layer=s.ffn_layer, norm_layer=s.norm_layer, layerscale_init=s.layerscale,
        n_storage_tokens=s.n_storage_tokens, mask_k_bias=s.mask_k_bias,
        untie_cls_and_patch_norms=s.untie_cls_and_patch_norms,
        untie_global_and_local_cls_norm=s.untie_global_and_local_cls_norm, drop_path_rate=drop_path_rate,
        backend=ops_backend(cfg), device=device, **trunk)


def _heads(cfg: Config, embed_dim: int, device) -> dict[str, nn.Module]:
    d, i = cfg.dino, cfg.ibot
    return {"dino_head": DINOHead(embed_dim, d.head_n_prototypes, nlayers=d.head_nlayers, hidden_dim=d.head_hidden_dim,
                                  bottleneck_dim=d.head_bottleneck_dim, device=device),
            "ibot_head": DINOHead(embed_dim, i.head_n_prototypes, nlayers=i.head_nlayers, hidden_dim=i.head_hidden_dim,
                                  bottleneck_dim=i.head_bottleneck_dim, device=device)}


def reshard(models: nn.Module | None) -> None:
    """Free the gathered parameters of every FSDP2 unit in `models` (FSDP2 keeps a root's
    parameters gathered after forward, expecting a backward; the teachers have none)."""
    if models is not None:
        for m in models.modules():
            if hasattr(m, "reshard") and hasattr(m, "unshard"):
                m.reshard()


def local_tensors(params) -> list[torch.Tensor]:
    """Each parameter's local shard (a DTensor's `_local_tensor`; a plain tensor itself)."""
    return [p.to_local() if hasattr(p, "to_local") else p for p in params]


def dino_terms(head: DINOHead, loss: DINOLoss, g_cls: torch.Tensor, l_cls: torch.Tensor, teacher_cls: torch.Tensor,
               ignore_diagonal: bool, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(local, global) DINO loss terms: `head` on every crop's CLS token (g_cls [2, B, D], l_cls
    [n, B, D], one call on [(2+n)B, D]) against the teacher's centred global targets [2, B, K].
    `fused`: the head's last layer runs inside the loss (`DINOLoss.forward_linear`), so no
    [(2+n)B, K] logits are kept."""
    (n_global, b), n_local = g_cls.shape[:2], l_cls.shape[0]

    def terms(rows: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [(2+n)B, .]: logits, or (with `weight`, the last layer's) normalised bottlenecks."""
        g, loc = (x.unflatten(0, (n, b)) for x, n in zip(rows.split([n_global * b, n_local * b]), (n_global, n_local)))
        if weight is None:
            return loss(loc, teacher_cls), loss(g, teacher_cls, ignore_diagonal=ignore_diagonal)
        return (loss.forward_linear(loc, weight, teacher_cls),
                loss.forward_linear(g, weight, teacher_cls, ignore_diagonal=ignore_diagonal))

    cls = torch.cat([g_cls.flatten(0, 1), l_cls.flatten(0, 1)])
    return head(cls, last_layer_loss=terms) if fused else terms(head(cls))


def ibot_term(head: DINOHead, loss: iBOTPatchLoss, tokens: torch.Tensor, teacher_masked: torch.Tensor,
              masks: torch.Tensor, n_masked: int, masks_weight: torch.Tensor, fused: bool) -> torch.Tensor:
    """The iBOT loss: `head` on the masked patch tokens [M, D] against the teacher's centred
    targets [M, Ki]; `fused`: the head's last layer runs inside the loss
    (`iBOTPatchLoss.forward_masked_linear`), so no [M, Ki] logits are kept."""
    kwargs = dict(student_masks_flat=masks, n_masked_patches=n_masked, masks_weight=masks_weight)
    if fused:
        return head(tokens, last_layer_loss=lambda x, weight: loss.forward_masked_linear(x, weight, teacher_masked,
                                                                                          **kwargs))
    return loss.forward_masked(head(tokens), teacher_masked, **kwargs)


class SSLMetaArch(nn.Module):
    """Student, EMA teacher, Gram teacher and losses of one DINOv3 run; see the module docstring."""

    def __init__(self, cfg: Config, device=None) -> None:
        super().__init__()
        self.cfg = cfg
        backend = ops_backend(cfg)
        student_backbone = build_backbone(cfg, drop_path_rate=cfg.student.drop_path_rate, device=device)
        dim = student_backbone.embed_dim
        self.student = nn.ModuleDict({"backbone": student_backbone, **_heads(cfg, dim, device)})
        self.teacher = nn.ModuleDict({"backbone": build_backbone(cfg, drop_path_rate=0.0, device=device),
                                      **_heads(cfg, dim, device)})
        self.teacher.requires_grad_(False)
        g = cfg.gram
        self.gram_use_loss = g.use_loss
        self.has_gram_teacher = g.use_loss and not g.ema_teacher
        self.gram_teacher_initialized = False
        self.gram_teacher = (nn.ModuleDict({"backbone": build_backbone(cfg, drop_path_rate=0.0, device=device)})
                             if self.has_gram_teacher else None)
        if self.gram_teacher is not None:
            self.gram_teacher.requires_grad_(False)
        # fused ops: the heads' last layers run inside the DINO / iBOT losses (linear_soft_cross_entropy)
        self.fused_head_losses = backend is None
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes, backend=backend)
        self.ibot_patch_loss = iBOTPatchLoss(cfg.ibot.head_n_prototypes, backend=backend)
        if cfg.dino.koleo_loss_distributed:
            self.koleo_loss = KoLeoLossDistributed(topk=cfg.dino.koleo_topk,
                                                   loss_group_size=cfg.dino.koleo_distributed_loss_group_size,
                                                   backend=backend)
        else:
            if cfg.dino.koleo_topk != 1:
                raise ConfigError("dino.koleo_topk must be 1 unless dino.koleo_loss_distributed (as in DINOv3)")
            self.koleo_loss = KoLeoLoss(backend=backend)
        self.dino_local_loss_schedule, self.gram_loss_schedule = loss_weight_schedules(cfg)
        self.gram_loss = (GramLoss(apply_norm=g.normalized, remove_neg=g.remove_neg,
                                   remove_only_teacher_neg=g.remove_only_teacher_neg, backend=backend)
                          if g.use_loss else None)

    # ------------------------------------------------------------------ setup

    def init_weights(self) -> None:
        """DINOv3's init: student backbone and heads, loss centres; the teacher copies the student."""
        self.student.backbone.init_weights()
        self.student.dino_head.init_weights()
        self.student.ibot_head.init_weights()
        self.dino_loss.init_weights()
        self.ibot_patch_loss.init_weights()
        self.teacher.load_state_dict(self.student.state_dict())
        if self.gram_teacher is not None:
            # Every Gram-teacher tensor gets a defined value (on meta-built runs to_empty leaves garbage,
            # NaN included, in its parameters and buffers: rope periods, qkv bias_mask); it is still
            # "uninitialised" until it loads the EMA teacher at gram.it_load_ema_teacher.
            self._copy_teacher_to_gram()

    def train(self, mode: bool = True) -> SSLMetaArch:
        super().train(mode)
        self.teacher.eval()
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    # ------------------------------------------------------------------ the step

    def forward_backward(self, batch: Batch, *, teacher_temp: float, iteration: int = 0,
                         autocast: contextlib.AbstractContextManager | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Forward every model, compute the weighted loss, backward it. Returns (loss, loss dict).
        `autocast` (a torch.autocast context) covers the forward only: torch advises running the
        backward outside it (its ops then take the dtypes the forward's ops had)."""
        with autocast or contextlib.nullcontext():
            loss, loss_dict = self._forward(batch, teacher_temp, iteration)
        loss.backward()
        return loss.detach(), loss_dict

    def _forward(self, batch: Batch, teacher_temp: float, iteration: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The weighted loss and its loss dict (see forward_backward)."""
        masks = batch.masks.flatten(0, 1)                                  # [2B, HW]
        if batch.mask_indices is not None:  # made with the masks, on the CPU
            mask_indices, masks_weight, n_masked = batch.mask_indices, batch.masks_weight, batch.n_masked
        else:
            mask_indices, masks_weight, n_masked = mask_metadata(masks)
        teacher_global = self.get_teacher_output(batch.global_crops, teacher_temp=teacher_temp,
                                                 mask_indices=mask_indices, n_masked_patches=n_masked)
        student_global, student_local = self.get_student_output(batch.global_crops, batch.local_crops, masks,
                                                                mask_indices)
        gram_global = (self.get_gram_teacher_output(batch.gram_crops, masks=masks, mask_indices=mask_indices,
                                                    teacher_global=teacher_global, student_global=student_global,
                                                    student_crop_size=batch.global_crops.shape[-1])
                       if self.gram_use_loss else {})
        # Only the autograd graph needs the outputs once the losses are formed: what it does not keep
        # (the teacher's targets, once the fused head losses have consumed them) is freed on return,
        # before the backward.
        return self.compute_losses(teacher_global, student_global, student_local, gram_global,
                                   masks, mask_indices, masks_weight, iteration=iteration)

    @torch.no_grad()
    def get_teacher_output(self, images: torch.Tensor, *, teacher_temp: float, mask_indices: torch.Tensor,
                           n_masked_patches: torch.Tensor) -> dict[str, torch.Tensor]:
        """images [2, B, 3, G, G] -> CLS / patch features and Sinkhorn-Knopp-centred targets."""
        n_crops, b = images.shape[:2]
        out = self.teacher.backbone(images.flatten(0, 1), is_training=True)
        cls, patch = out["x_norm_clstoken"], out["x_norm_patchtokens"]    # [2B, D], [2B, HW, D]
        masked_after_head = self.teacher.ibot_head(patch.flatten(0, 1).index_select(0, mask_indices))  # [M, Ki]
        cls_after_head = self.teacher.dino_head(cls)                                                  # [2B, K]
        cls_centered = self.dino_loss.sinkhorn_knopp_teacher(cls_after_head, teacher_temp=teacher_temp)
        masked_centered = self.ibot_patch_loss.sinkhorn_knopp_teacher(masked_after_head, teacher_temp=teacher_temp,
                                                                      n_masked_patches_tensor=n_masked_patches)
        reshard(self.teacher)
        return {"cls_pre_head": cls.unflatten(0, (n_crops, b)), "patch_pre_head": patch.unflatten(0, (n_crops, b)),
                "cls_centered": cls_centered.unflatten(0, (n_crops, b)), "masked_patch_centered": masked_centered}

    def get_student_output(self, global_crops: torch.Tensor, local_crops: torch.Tensor, masks: torch.Tensor,
                           mask_indices: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Global [2, B, ...] (masked) and local [n, B, ...] crops through one backbone call: the
        pre-head CLS and patch tokens, and the masked patch tokens [M, D] (the heads run with the
        losses, `compute_losses`)."""
        n_global, b = global_crops.shape[:2]
        n_local = local_crops.shape[0]
        g_out, l_out = self.student.backbone([global_crops.flatten(0, 1), local_crops.flatten(0, 1)],
                                             masks=[masks, None], is_training=True)
        g_cls, g_patch, l_cls = g_out["x_norm_clstoken"], g_out["x_norm_patchtokens"], l_out["x_norm_clstoken"]
        return ({"cls_pre_head": g_cls.unflatten(0, (n_global, b)), "patch_pre_head": g_patch.unflatten(0, (n_global, b)),
                 "masked_patch_pre_head": g_patch.flatten(0, 1).index_select(0, mask_indices)},
                {"cls_pre_head": l_cls.unflatten(0, (n_local, b))})

    def get_gram_teacher_output(self, images: torch.Tensor | None, *, masks: torch.Tensor,
                                mask_indices: torch.Tensor, teacher_global, student_global,
                                student_crop_size: int) -> dict[str, torch.Tensor]:
        """Student and Gram-teacher patch features [2B, HW, D], or with gram.tokens_used the selected
        tokens [N, D]: the M masked ones (`mask_indices` into the flattened [2B*HW] tokens) or the
        2B*HW - M others, gathered by index (a boolean mask index would sync the host with the GPU,
        forward and backward, to learn N)."""
        student = student_global["patch_pre_head"].flatten(0, 1)
        if not self.has_gram_teacher:
            teacher = teacher_global["patch_pre_head"].flatten(0, 1)
        else:
            if not self.gram_teacher_initialized:
                raise RuntimeError("the Gram teacher is not initialised: it loads the EMA teacher at "
                                   f"gram.it_load_ema_teacher={self.cfg.gram.it_load_ema_teacher}")
            if images is None:
                raise ConfigError("the Gram loss needs Gram-teacher crops (crops.gram_teacher_crops_size)")
            with torch.no_grad():
                teacher = self.gram_teacher.backbone(images.flatten(0, 1), is_training=True)["x_norm_patchtokens"]
                reshard(self.gram_teacher)
                if teacher.shape[1] != student.shape[1]:
                    p = self.cfg.student.patch_size
                    n_t, n_s = images.shape[-1] // p, student_crop_size // p
                    hw = teacher.transpose(-2, -1).unflatten(-1, (n_t, n_t))           # [2B, D, Nt, Nt]
                    hw = F.interpolate(hw, size=(n_s, n_s), mode=self.cfg.gram.global_teacher_resize_method,
                                       align_corners=False, antialias=self.cfg.gram.global_teacher_resize_antialias)
                    teacher = hw.flatten(-2, -1).transpose(-2, -1)                     # [2B, HW, D]
        used = self.cfg.gram.tokens_used
        if used != "all":
            if used == "masked":
                index = mask_indices
            else:  # a stable sort puts the unmasked first, in order; their count is known on the host
                unmasked = masks.numel() - mask_indices.shape[0]
                index = torch.argsort(masks.flatten().to(torch.uint8), stable=True)[:unmasked]
            student, teacher = (x.flatten(0, 1).index_select(0, index) for x in (student, teacher))
        return {"student_patches": student, "teacher_patches": teacher}

    def compute_losses(self, teacher_global, student_global, student_local, gram_global, masks, mask_indices,
                       masks_weight, iteration: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
        n_global = student_global["cls_pre_head"].shape[0]
        n_local = student_local["cls_pre_head"].shape[0]
        d = self.cfg.dino
        global_terms = n_global * (n_global - 1) if d.global_ignore_diagonal else n_global**2
        local_terms = n_global * n_local
        loss_dict: dict[str, Any] = {}
        dino_local, dino_global = dino_terms(self.student.dino_head, self.dino_loss, student_global["cls_pre_head"],
                                             student_local["cls_pre_head"], teacher_global["cls_centered"],
                                             d.global_ignore_diagonal, fused=self.fused_head_losses)
        koleo = sum(self.koleo_loss(x) for x in student_global["cls_pre_head"]) / n_global
        ibot = ibot_term(self.student.ibot_head, self.ibot_patch_loss, student_global["masked_patch_pre_head"],
                         teacher_global["masked_patch_centered"], masks, mask_indices.shape[0], masks_weight,
                         fused=self.fused_head_losses)
        local_weight = 1.0 if self.dino_local_loss_schedule is None else self.dino_local_loss_schedule(iteration)
        loss = (d.loss_weight * local_terms / (global_terms + local_terms) * local_weight * dino_local
                + d.loss_weight * global_terms / (global_terms + local_terms) * dino_global
                + d.koleo_loss_weight * n_global * koleo
                + self.cfg.ibot.loss_weight * ibot)
        loss_dict.update(dino_local_crops_loss=dino_local, dino_global_crops_loss=dino_global, koleo_loss=koleo,
                         ibot_loss=ibot)
        if self.gram_use_loss:
            student_patches = gram_global["student_patches"]
            if student_patches.numel() == 0:  # tokens_used=masked on a batch without a masked patch
                gram = student_patches.float().sum()  # 0, and the student still joins the backward
            else:
                gram = self.gram_loss(student_patches, gram_global["teacher_patches"],
                                      img_level=self.cfg.gram.img_level)
            gram_weight = (self.cfg.gram.loss_weight if self.gram_loss_schedule is None
                           else self.gram_loss_schedule(iteration))
            loss = loss + gram_weight * gram
            loss_dict.update(gram_loss=gram, gram_loss_weight=torch.tensor(float(gram_weight)))
        loss_dict["dino_local_loss_weight"] = torch.tensor(float(local_weight))
        return loss, {k: v.detach() for k, v in loss_dict.items()}

    # ------------------------------------------------------------------ teacher updates

    @torch.no_grad()
    def update_ema(self, momentum: float) -> None:
        """teacher = m * teacher + (1 - m) * student, with foreach ops on the local shards."""
        reshard(self.teacher)
        for k in self.student:
            t = local_tensors(self.teacher[k].parameters())
            s = local_tensors(self.student[k].parameters())
            torch._foreach_mul_(t, momentum)
            torch._foreach_add_(t, s, alpha=1 - momentum)

    @torch.no_grad()
    def _copy_teacher_to_gram(self) -> None:
        """Gram teacher backbone <- EMA teacher backbone's state dict (parameters and buffers), plain copies."""
        reshard(self.teacher)
        reshard(self.gram_teacher)
        self.gram_teacher.backbone.load_state_dict(self.teacher.backbone.state_dict())

    @torch.no_grad()
    def gram_load_ema_teacher(self) -> None:
        """DINOv3's `gram_load_ema_teacher`: load the EMA teacher's backbone state dict (parameters and
        buffers) into the Gram teacher, and mark it initialised."""
        if self.gram_teacher is None:
            return
        self._copy_teacher_to_gram()
        self.gram_teacher_initialized = True
