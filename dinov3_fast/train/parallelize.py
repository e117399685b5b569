"""Activation checkpointing, compile and FSDP2, applied in one place and in one order.

    parallelize(arch, ac="selective", compile=True, mesh=mesh, param_dtype=torch.bfloat16)

Model code stays single-device; this module changes it in place:
1. **AC per block** (`apply_ac`): "none"; "full" (each block recomputes its forward in the
   backward); "selective" (recompute everything except the ops in `SAC_SAVE_LIST`: matmuls --
   `aten.mm` and `aten.addmm`, which a biased Linear on 3-D input lowers to -- and the attention
   ops, ours and SDPA's, so the backward recomputes only norms, activations and elementwise
   work). The block's `forward` is wrapped on the instance, so no wrapper module appears and the
   state-dict keys keep their names.
2. **compile per block** (optional): the in-place `module.compile()`, same reason.
3. **FSDP2**: `fully_shard` on every block, then on each sub-model's root (student backbone,
   heads; teacher and Gram teacher the same way), with `MixedPrecisionPolicy(param_dtype,
   reduce_dtype)`, and explicit prefetch: each block's forward issues the next block's all-gather
   (the root's, the first block's) as soon as its own has landed, and each block's backward the
   previous block's. One module ahead, as FSDP2's implicit schedule, so the same two units are
   gathered at once (the planner's count); explicit, the forward all-gather is issued from the
   CPU before the block's compute is queued, not after, which keeps it ahead when the CPU is not.
   `reshard_after_forward` is left at FSDP2's default: every block reshards after its forward,
   but a root keeps its parameters gathered, expecting the backward to need them at once. The
   teacher and Gram teacher run no backward, so `meta_arch.reshard` frees their roots right after
   their forward (docs/architecture.md, "Teachers are resharded explicitly").
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dinov3_fast.train.config import AC_MODES, Config


def _sac_save_list() -> set:
    ops = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten._scaled_dot_product_flash_attention.default,
           torch.ops.aten._scaled_dot_product_efficient_attention.default,
           torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}
    for name in ("_scaled_dot_product_cudnn_attention",):
        if hasattr(torch.ops.aten, name):
            ops.add(getattr(torch.ops.aten, name).default)
    import dinov3_fast.ops.attention  # noqa: F401  (registers the custom ops)
    ops.add(torch.ops.dinov3_fast.rope_attention_fwd.default)
    if hasattr(torch.ops, "_c10d_functional"):
        ops.add(torch.ops._c10d_functional.reduce_scatter_tensor.default)
    return ops


SAC_SAVE_LIST = _sac_save_list()


def _sac_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAC_SAVE_LIST else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed_forward(forward, selective: bool, *args, **kwargs):
    context_fn = (functools.partial(create_selective_checkpoint_contexts, _sac_policy) if selective
                  else None)
    extra = {"context_fn": context_fn} if context_fn is not None else {}
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **extra, **kwargs)


def apply_ac(blocks: nn.ModuleList, mode: str) -> None:
    """Wrap every block's forward with activation checkpointing ("none", "full", "selective")."""
    if mode not in AC_MODES:
        raise ValueError(f"ac must be one of {AC_MODES}, got {mode!r}")
    if mode == "none":
        return
    for block in blocks:
        if getattr(block, "_ac_mode", None) is not None:
            raise RuntimeError("activation checkpointing is already applied to this block")
        block.forward = functools.partial(_checkpointed_forward, block.forward, mode == "selective")
        block._ac_mode = mode


# FSDP2 warns when a sharded module returns a view, because an in-place op on that view would drop
# its pre-backward hook. Ours do by design (a block splits its concatenated crops back into one
# view per crop; the backbone returns slices of its normed tokens, as DINOv3's do), and nothing
# writes into them in place: the next block concatenates (a copy) and drop path uses the
# out-of-place index_add. Gradients under FSDP2 match an unsharded process (tests/test_train_fsdp.py).
# Silenced for these two modules only; a user's own sharded modules still warn.
_VIEW_WARNING = r"FSDP2-wrapped module \(FSDP(SelfAttentionBlock|DinoVisionTransformer)\) returned a view tensor"


def _shard_backbone(backbone: nn.Module, **kw) -> None:
    from torch.distributed.fsdp import fully_shard
    warnings.filterwarnings("ignore", message=_VIEW_WARNING, category=UserWarning)
    blocks = list(backbone.blocks)
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(backbone, **kw)
    if blocks:
        backbone.set_modules_to_forward_prefetch([blocks[0]])
    for prev, nxt in zip(blocks, blocks[1:]):
        prev.set_modules_to_forward_prefetch([nxt])
        nxt.set_modules_to_backward_prefetch([prev])


def shards_single_process(cfg: Config, device_type: str) -> bool:
    """Whether one process of `cfg` on `device_type` trains under FSDP2 on a 1-rank group (see
    ComputePrecisionConfig.single_rank_fsdp): on CUDA, with a low-precision param_dtype, so the
    modules run in that dtype as on many ranks."""
    cp = cfg.compute_precision
    return device_type == "cuda" and cp.single_rank_fsdp and cp.param_dtype != "fp32"


def parallelize(arch: nn.Module, *, ac: str = "none", compile: bool = False, mesh=None,
                param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = torch.float32,
                shard: bool | None = None) -> nn.Module:
    """Apply AC, compile and FSDP2 to an `SSLMetaArch` in place (see the module docstring).

    Args:
        arch: the SSLMetaArch (student, teacher, optional gram_teacher ModuleDicts).
        ac: "none" | "full" | "selective", student backbone blocks (the teachers need no AC).
        compile: compile every block of every backbone in place.
        mesh: a 1-D DeviceMesh (default: the world, when torch.distributed is initialised).
        param_dtype / reduce_dtype: FSDP2 MixedPrecisionPolicy (None: keep fp32).
        shard: apply FSDP2 (default: when torch.distributed is initialised).
    """
    apply_ac(arch.student.backbone.blocks, ac)
    backbones = [arch.student.backbone, arch.teacher.backbone]
    if getattr(arch, "gram_teacher", None) is not None:
        backbones.append(arch.gram_teacher.backbone)
    if compile:
        for bb in backbones:
            for block in bb.blocks:
                block.compile()
    if shard is None:
        shard = dist.is_available() and dist.is_initialized()
    if not shard:
        return arch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if mesh is None:
        device_type = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    kw = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)}
    for models in (arch.student, arch.teacher, getattr(arch, "gram_teacher", None)):
        if models is None:
            continue
        for name, module in models.items():
            if name == "backbone":
                _shard_backbone(module, **kw)
            else:
                fully_shard(module, **kw)
    return arch
