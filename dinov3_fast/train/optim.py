"""AdamW with DINOv3's parameter groups (dinov3/train/param_groups.py), schedules and clipping.

Per student sub-model (backbone, dino_head, ibot_head), each parameter gets:
- lr multiplier layerwise_decay ** (depth + 1 - layer_id): layer 0 for patch_embed, cls/storage/
  mask tokens; block i is layer i + 1; everything else (final norms, heads) depth + 1;
- x patch_embed_lr_mult for the patch embedding;
- weight-decay multiplier 0 for biases, norms and LayerScale (`gamma`), dino_head_wd_multiplier
  for the DINO head;
- `is_last_layer` for the heads' last layer, whose lr is 0 while it is frozen.
Groups with equal (lr mult, wd mult, is_last_layer) are fused, as DINOv3 does.
"""
from __future__ import annotations

import torch
from torch import nn

from dinov3_fast.train.config import Config
from dinov3_fast.train.schedules import StepValues

_TOKENS = ("pos_embed", "patch_embed", "mask_token", "cls_token", "storage_tokens")


def layer_id(name: str, depth: int) -> int:
    """DINOv3's layer index of a backbone parameter name (0 .. depth + 1)."""
    if any(name.startswith(t) or f".{t}" in name for t in _TOKENS):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(cfg: Config, student: nn.ModuleDict) -> list[dict]:
    """Fused parameter groups of the student's sub-models (see the module docstring)."""
    o = cfg.optim
    fused: dict[tuple, dict] = {}
    for sub_name, module in student.items():
        depth = len(module.blocks) if hasattr(module, "blocks") else 0
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            lr_mult = o.layerwise_decay ** (depth + 1 - layer_id(name, depth)) if depth else 1.0
            wd_mult = o.dino_head_wd_multiplier if sub_name == "dino_head" else 1.0
            if name.endswith("bias") or "norm" in name or "gamma" in name:
                wd_mult = 0.0
            if "patch_embed" in name:
                lr_mult *= o.patch_embed_lr_mult
            last = "last_layer" in name
            key = (lr_mult, wd_mult, last)
            group = fused.setdefault(key, {"params": [], "names": [], "lr_multiplier": lr_mult,
                                           "wd_multiplier": wd_mult, "is_last_layer": last})
            group["params"].append(p)
            group["names"].append(f"{sub_name}.{name}")
    return list(fused.values())


def build_optimizer(cfg: Config, student: nn.ModuleDict) -> torch.optim.Optimizer:
    groups = param_groups(cfg, student)
    cuda = any(p.device.type == "cuda" for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=0.0, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
                             fused=True if cuda else None, foreach=None if cuda else True)


def apply_schedule(optimizer: torch.optim.Optimizer, values: StepValues) -> None:
    """DINOv3's apply_optim_scheduler: lr (or last-layer lr) and weight decay, times each group's multipliers."""
    for g in optimizer.param_groups:
        g["weight_decay"] = values.weight_decay * g["wd_multiplier"]
        g["lr"] = (values.last_layer_lr if g["is_last_layer"] else values.lr) * g["lr_multiplier"]


def clip_gradients(student: nn.ModuleDict, max_norm: float) -> dict[str, torch.Tensor]:
    """Clip each sub-model's gradients to `max_norm` separately (DINOv3); returns the norms before clipping.
    FSDP2's DTensor gradients are reduced to their full norm first."""
    norms = {}
    for name, module in student.items():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            continue
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_([p for p in module.parameters() if p.grad is not None], max_norm, norm,
                                                 foreach=True)
        norms[name] = norm
    return norms
