"""Per-rank memory plan of a training run, from the meta device and a fake process group.

    plan = plan_memory(get_preset("vit7b16"), world_size=256)
    print(format_plan(plan))

Nothing is allocated. The models are built on the meta device and sharded with the real
`parallelize` over a fake process group of `world_size` ranks (`init_process_group("fake")`),
so the sharded state is exactly what FSDP2 keeps on a rank (padding included). Terms:
- **sharded state**: fp32 parameter shards of student, teacher and Gram teacher; fp32 gradient
  shards and AdamW's two fp32 moments for the student.
- **transient buffers**: with FSDP (world_size > 1, or one GPU that `shards_single_process`),
  the largest FSDP unit unsharded in the param dtype, twice (the running unit and the prefetched
  one), plus its unsharded fp32 gradient for the reduce-scatter, twice. A single process that is
  not sharded keeps fp32 parameters and runs under autocast (see `loop.py`), whose cache holds a
  low-precision copy of every student Linear and Conv parameter through the forward and
  backward. (This plans an eager run: inside torch.compile'd blocks autocast does not cache, and
  the compiled graphs choose what to keep.)
- **activations**: measured, not modelled: the student backbone runs forward on meta tensors at
  the per-rank batch (2 global + n local crops) with the chosen AC mode, under a dispatch mode
  that records every storage created; what is still alive after the forward is what the backward
  will read. Two depths (1 and 2 blocks) give the per-block and the fixed part; stochastic depth
  at the configured rate (its branches run on a fixed-size subset of the batch). The kernels are
  the ones a GPU runs (`kernels_as_on_gpu`): our ops' Triton backends (their fake kernels), and
  SDPA's fused kernel (flash; cuDNN, which recent torch prefers on sm_90, keeps the same out and
  logsumexp) rather than the math path meta tensors would take, which keeps every crop's N x N
  attention probabilities (0.67 of ViT-L's 2.14 GiB per block in bf16 at batch 96). The dtypes
  are the trainer's: with FSDP the modules run in the param dtype (its MixedPrecisionPolicy); an
  unsharded process runs fp32 modules under autocast's casts, so the residual stream that AC keeps
  at each block's input is fp32.
- **heads and losses**: the same measurement for the student heads (DINO on every crop's CLS token,
  iBOT on the masked tokens, whose count DINOv3's collate fixes: `mask_counts`). With fused ops the
  heads' last layers run inside the losses (`linear_soft_cross_entropy`), which keep only their
  input gradients; the teacher's fp32 Sinkhorn targets are alive only up to the end of the forward,
  beside the largest loss call's own transient (a chunk of logits and their gradient, the
  weight-gradient accumulator) (`loss_inputs`): the total takes the larger of them and the
  backward's working set. With `--ops reference`, the heads' logits, the targets, and what the
  reference losses keep for backward: the fp32 log-softmax of every student row, and their einsum's
  copy of the targets (bf16 under autocast, which casts einsum; without autocast only iBOT's
  weighted targets are a new tensor, in fp32).
- **backward working set**: the most the backward holds beyond what the forward saved, at its
  peak: measured on meta by backpropagating a student without AC (the kernel routing cannot
  reach a checkpoint's recompute on meta), plus, with AC, what a plain block keeps beyond a
  checkpointed one (its backward rebuilds that); or the heads' backward, if larger.
The sum leaves out the CUDA context and the allocator's fragmentation (a few GiB on a GPU).
"""
from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

from dinov3_fast.ops._dispatch import simulate_cuda_dispatch
from dinov3_fast.ops.linear_soft_ce.chunked import CHUNK_LOGITS, transient_bytes
from dinov3_fast.train.config import Config, apply_overrides, validate
from dinov3_fast.train.masking import mask_counts

GIB = 2**30
_BYTES = {"fp32": 4, "bf16": 2}


def _storages(tree) -> list:
    return [t.untyped_storage() for t in tree_flatten(tree)[0]
            if isinstance(t, torch.Tensor) and not hasattr(t, "to_local")]


class StorageTracker(TorchDispatchMode):
    """Records every storage an op creates; `alive_bytes()` sums those still referenced. An output
    that aliases an input (a view, an in-place op) creates none: a view of a parameter is not an
    activation. `peak` is the most bytes alive after any op since `track_peak` was set."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.track_peak = False
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # torch.tensor(data) lifts a storage made outside the dispatcher: new all the same
        lifted = func in (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)
        inputs = set() if lifted else {StorageWeakRef(s).cdata for s in _storages((args, kwargs))}
        for s in _storages(out):
            ref = StorageWeakRef(s)
            if ref.cdata not in inputs:
                self.refs.setdefault(ref.cdata, (ref, s.nbytes()))
        if self.track_peak:  # after the op: its inputs and its outputs alive together
            self.peak = max(self.peak, self.alive_bytes())
        return out

    def alive_bytes(self) -> int:
        return sum(n for ref, n in self.refs.values() if not ref.expired())


class _FusedSDPAOnMeta(TorchFunctionMode):
    """Runs `F.scaled_dot_product_attention` on meta tensors as a GPU does: SDPA's flash kernel for
    bf16/fp16 and its memory-efficient kernel for fp32, whose backward keeps out and logsumexp.
    (On meta, SDPA falls back to its math path, which keeps the N x N probabilities.) Calls with
    a mask, dropout or causal masking are left alone."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        plain = len(args) == 3 and set(kwargs) <= {"scale"}
        if func is not F.scaled_dot_product_attention or not plain or args[0].device.type != "meta":
            return func(*args, **kwargs)
        q, k, v = args
        if q.dtype in (torch.bfloat16, torch.float16):
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, **kwargs)[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, **kwargs)[0]


_AUTOCAST_LOW = {F.linear, F.conv2d, torch.matmul, torch.mm, torch.bmm, torch.addmm, F.scaled_dot_product_attention}
_AUTOCAST_FP32 = {F.layer_norm, F.softmax, F.log_softmax, F.normalize}


class _AutocastOnMeta(TorchFunctionMode):
    """torch.autocast's casts for meta tensors, which autocast does not see: the matmul-like
    functions run in `dtype`, the normalisations and softmaxes in fp32, everything else in its
    inputs' dtypes. As with autocast, the casts happen above autograd (autograd keeps the cast
    copies), and the cast of a parameter that requires grad is made once and cached."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.cache: dict[torch.Tensor, torch.Tensor] = {}

    def cached_bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.cache.values())

    def _cast(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not (isinstance(t, torch.nn.Parameter) and t.requires_grad):
            return t.to(dtype)
        if t not in self.cache:
            self.cache[t] = t.to(dtype)
        return self.cache[t]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _AUTOCAST_LOW:
            src, dst = (torch.float32,), self.dtype
        elif func in _AUTOCAST_FP32:
            src, dst = (torch.bfloat16, torch.float16), torch.float32
        else:
            return func(*args, **kwargs)
        args, kwargs = tree_map_only(torch.Tensor, lambda t: self._cast(t, dst) if t.dtype in src else t,
                                     (args, kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def kernels_as_on_gpu(autocast: _AutocastOnMeta | None = None) -> Iterator[None]:
    """Meta-device forwards dispatch to the kernels a CUDA run uses, so that what autograd saves is
    what it saves on the GPU: our ops pick their Triton backend (run as their fake kernels), SDPA
    its fused kernel; with `autocast`, under that emulation of autocast's casts."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(simulate_cuda_dispatch())
        stack.enter_context(_FusedSDPAOnMeta())
        if autocast is not None:
            stack.enter_context(autocast)  # innermost: casts before SDPA is routed
        yield


def saved_activation_bytes(fn) -> int:
    """Bytes of the storages created by fn() that are still alive after it returns (its
    output included): what autograd keeps for the backward."""
    return activation_bytes(fn)[0]


def activation_bytes(fn, backward_inputs: tuple[torch.Tensor, ...] = ()) -> tuple[int, int]:
    """(saved, backward excess) of fn(): saved as `saved_activation_bytes`; with `backward_inputs`,
    also the most bytes alive during the backward of fn()'s outputs (to those inputs, seeded with
    output-shaped gradients) beyond `saved`: the backward's working set (the gradients flowing
    between ops, each op's backward temporaries, what a checkpointed region recomputes), else 0.
    Parameter gradients are not computed (they are sharded state, planned apart)."""
    tracker = StorageTracker()
    with tracker:
        out = fn()
        saved = tracker.alive_bytes()
        if backward_inputs:
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            tracker.peak, tracker.track_peak = saved, True
            torch.autograd.grad(outs, backward_inputs, [torch.empty_like(t) for t in outs])
    del out
    return saved, tracker.peak - saved if backward_inputs else 0


@dataclass
class MemoryPlan:
    arch: str
    world_size: int
    fsdp: bool                 # sharded by FSDP2 (else fp32 modules under autocast)
    batch_per_rank: int
    ac: str
    ops: str
    params_total: int          # student backbone + heads, elements
    params_per_rank: int       # student shard, elements
    sharded_state: int         # bytes
    transient_buffers: int
    activations: int
    heads_and_losses: int      # what the heads and losses keep for the backward
    backward_working_set: int
    loss_inputs: int = 0       # fused ops: the teacher targets and the loss's chunk, alive only up to the
                               # end of the forward (so they add to the peak only where they outweigh the
                               # backward's working set)

    @property
    def total(self) -> int:
        return (self.sharded_state + self.transient_buffers + self.activations + self.heads_and_losses
                + max(self.backward_working_set, self.loss_inputs))

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _local_numel(module: torch.nn.Module) -> int:
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in module.parameters())


@dataclass(frozen=True)
class _StudentMeasure:
    """What autograd keeps, on meta, for a student at the per-rank batch (bytes), and with
    `backward`, what its backward needs on top of that at its peak (0 otherwise)."""
    backbone: int
    heads: int
    masked_tokens: int
    backbone_backward: int = 0
    heads_backward: int = 0


def _measure_student(cfg: Config, depth: int, module_dtype: torch.dtype, autocast: torch.dtype | None,
                     ac: str | None = None, backward: bool = False) -> _StudentMeasure:
    """Measure a student of `depth` blocks with AC mode `ac` (default: the config's). Modules in
    `module_dtype`; with `autocast` (a dtype), under autocast's casts to it (the single-process
    trainer), not counting autocast's cache of the parameters' casts (a transient buffer in the
    plan). With `backward`, also the backward peaks, backpropagating as the trainer does: the
    backbone from the outputs the heads read, the heads from the DINO and iBOT losses."""
    from dinov3_fast.nn import DINOLoss, iBOTPatchLoss
    from dinov3_fast.train.meta_arch import _heads, build_backbone, dino_terms, ibot_term, ops_backend
    from dinov3_fast.train.parallelize import apply_ac
    c, b = cfg.crops, cfg.train.batch_size_per_gpu
    small = apply_overrides(cfg, [f"student.depth={depth}"])
    with torch.device("meta"):
        backbone = build_backbone(small, drop_path_rate=cfg.student.drop_path_rate, device="meta").to(module_dtype)
        heads = {k: v.to(module_dtype) for k, v in _heads(cfg, backbone.embed_dim, "meta").items()}
    apply_ac(backbone.blocks, cfg.train.ac if ac is None else ac)

    def measure(fn, backward_inputs: tuple[torch.Tensor, ...] = ()) -> tuple[int, int]:
        casts = _AutocastOnMeta(autocast) if autocast is not None else None
        with kernels_as_on_gpu(casts):
            saved, excess = activation_bytes(fn, backward_inputs)
        return saved - (casts.cached_bytes() if casts else 0), excess

    def meta(*shape, dtype=module_dtype, requires_grad=False) -> torch.Tensor:
        return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=requires_grad)

    n_crops = 2 + c.local_crops_number
    g = meta(2 * b, 3, c.global_crops_size, c.global_crops_size)
    loc = meta(c.local_crops_number * b, 3, c.local_crops_size, c.local_crops_size)

    def backbone_forward():  # what the heads read: global cls and patch tokens, local cls
        g_out, l_out = backbone([g, loc], is_training=True)
        return g_out["x_norm_clstoken"], g_out["x_norm_patchtokens"], l_out["x_norm_clstoken"]

    act, act_bwd = measure(backbone_forward, (backbone.patch_embed.proj.weight,) if backward else ())
    hw = (c.global_crops_size // cfg.student.patch_size) ** 2
    masked = sum(mask_counts(2 * b, hw, cfg.ibot.mask_ratio_min_max, cfg.ibot.mask_sample_probability))
    # the heads' inputs: the backbone's output tokens (fp32 under autocast: its last norm runs in fp32)
    g_cls = meta(2, b, backbone.embed_dim, requires_grad=True)
    l_cls = meta(n_crops - 2, b, backbone.embed_dim, requires_grad=True)
    tok = meta(max(masked, 1), backbone.embed_dim, requires_grad=True)
    k, ki = cfg.dino.head_n_prototypes, cfg.ibot.head_n_prototypes
    dino, ibot = DINOLoss(k, backend=ops_backend(cfg)), iBOTPatchLoss(ki, backend=ops_backend(cfg))
    # teacher targets (fp32) are made outside the measurement: the plan counts them apart
    dino_targets, ibot_targets = meta(2, b, k, dtype=torch.float32), meta(tok.shape[0], ki, dtype=torch.float32)
    mask_weights, masks = meta(tok.shape[0], dtype=torch.float32), meta(2 * b, hw, dtype=torch.bool)
    fused = ops_backend(cfg) is None

    def losses():  # the trainer's heads and losses
        return (*dino_terms(heads["dino_head"], dino, g_cls, l_cls, dino_targets, cfg.dino.global_ignore_diagonal,
                            fused),
                ibot_term(heads["ibot_head"], ibot, tok, ibot_targets, masks, tok.shape[0], mask_weights, fused))

    def heads_forward():  # unfused: what the heads keep (the losses' own saved tensors are modelled)
        return heads["dino_head"](torch.cat([g_cls.flatten(0, 1), l_cls.flatten(0, 1)])), heads["ibot_head"](tok)

    # fused: the heads' last layers run inside the losses, which keep only their input gradients
    head, _ = measure(losses if fused else heads_forward)
    head_bwd = measure(losses, (g_cls, l_cls, tok))[1] if backward else 0
    return _StudentMeasure(act, head, masked, act_bwd, head_bwd)


def plan_memory(cfg: Config, world_size: int) -> MemoryPlan:
    """The per-rank memory plan of `cfg` on `world_size` ranks (see the module docstring)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from dinov3_fast.train.meta_arch import SSLMetaArch
    from dinov3_fast.train.parallelize import parallelize, shards_single_process
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    validate(cfg, world_size)
    cfg = copy.deepcopy(cfg)
    own_pg = not dist.is_initialized()
    if own_pg:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        with torch.device("meta"):
            arch = SSLMetaArch(cfg, device="meta")
        p_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.compute_precision.param_dtype]
        parallelize(arch, ac="none", mesh=mesh, param_dtype=p_dtype, shard=True)
        student_local = _local_numel(arch.student)
        teacher_local = _local_numel(arch.teacher) + (_local_numel(arch.gram_teacher) if arch.gram_teacher else 0)
        total = sum(p.numel() for p in arch.student.parameters())
        cast = sum(p.numel() for m in arch.student.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                   for p in m.parameters(recurse=False))  # what autocast casts, and caches
        units = [*arch.student.backbone.blocks, arch.student.dino_head, arch.student.ibot_head]
        largest = max(sum(p.numel() for p in u.parameters(recurse=True)) for u in units)
    finally:
        if own_pg:
            dist.destroy_process_group()
    pb = _BYTES[cfg.compute_precision.param_dtype]
    sharded = 4 * student_local * 4 + 4 * teacher_local  # params + grads + 2 moments; teachers' params
    fsdp = world_size > 1 or shards_single_process(cfg, "cuda")  # else fp32 modules under autocast
    module_dtype = p_dtype if fsdp else torch.float32
    autocast = p_dtype if not fsdp and p_dtype != torch.float32 else None
    if fsdp:
        transient = 2 * largest * pb + 2 * largest * _BYTES[cfg.compute_precision.reduce_dtype]
    else:
        transient = cast * pb if autocast is not None else 0  # autocast's cache of the student's casts
    depth = arch.student.backbone.n_blocks
    measure = functools.partial(_measure_student, cfg, module_dtype=module_dtype, autocast=autocast)
    no_ac = cfg.train.ac == "none"
    one = measure(1, backward=no_ac)
    head, masked = one.heads, one.masked_tokens
    per_block = measure(2).backbone - one.backbone
    activations = one.backbone - per_block + depth * per_block
    # The backward's peak, from a student without AC: meta tensors cannot replay the GPU kernels
    # in a checkpoint's recompute (our kernel routing does not reach it), and a checkpointed block
    # rebuilds in its backward what the block keeps without AC, so its peak is the same plus the
    # difference (measured exactly so on the CPU, tests/test_train_planner.py).
    plain = one if no_ac else measure(1, ac="none", backward=True)
    per_block_plain = per_block if no_ac else measure(2, ac="none").backbone - plain.backbone
    backward = max(per_block_plain - per_block + plain.backbone_backward, plain.heads_backward)
    c, b = cfg.crops, cfg.train.batch_size_per_gpu
    k, ki = cfg.dino.head_n_prototypes, cfg.ibot.head_n_prototypes
    targets = 4 * (2 * b * k + masked * ki)  # teacher's Sinkhorn-Knopp outputs, fp32
    if cfg.train.ops == "fused":
        # Consumed by the fused head losses in the forward and freed before the backward: they
        # coexist with the largest loss call's chunk and weight-gradient accumulator (the DINO
        # local and global terms, iBOT), not with the backward.
        d, di = cfg.dino.head_bottleneck_dim, cfg.ibot.head_bottleneck_dim
        calls = ((c.local_crops_number, b, k, d), (2, b, k, d), (1, max(masked, 1), ki, di))
        loss_call = max(transient_bytes(*call, pb, CHUNK_LOGITS["cuda"]) for call in calls)  # the plan is a GPU's
        return MemoryPlan(cfg.student.arch, world_size, fsdp, b, cfg.train.ac, cfg.train.ops, total, student_local,
                          sharded, transient, activations, head, backward, targets + loss_call)
    targets += 4 * ((2 + c.local_crops_number) * b * k + masked * ki)  # fp32 log-softmax of every row
    if autocast is not None:  # autocast casts einsum: its bf16 copy of the targets
        targets += pb * (2 * b * k + masked * ki)
    else:  # iBOT's targets times the patch weights, a new fp32 tensor
        targets += 4 * masked * ki
    return MemoryPlan(cfg.student.arch, world_size, fsdp, b, cfg.train.ac, cfg.train.ops, total, student_local,
                      sharded, transient, activations, head + targets, backward)


def format_plan(plan: MemoryPlan) -> str:
    rows = [("sharded state (params, grads, AdamW; teachers)", plan.sharded_state),
            ("transient all-gather / reduce-scatter buffers" if plan.fsdp
             else "transient buffers (autocast's parameter casts)", plan.transient_buffers),
            (f"activations (AC {plan.ac})", plan.activations),
            (f"heads and losses (ops {plan.ops})", plan.heads_and_losses),
            *([("teacher targets + loss chunk (forward only)", plan.loss_inputs)] if plan.loss_inputs else []),
            ("backward working set (at its peak)", plan.backward_working_set),
            ("total per rank", plan.total)]
    head = (f"memory plan: {plan.arch}, {plan.world_size} ranks, batch {plan.batch_per_rank} per rank; "
            f"student {plan.params_total / 1e9:.3f}B params, {plan.params_per_rank / 1e6:.1f}M per rank")
    return "\n".join([head] + [f"  {name:<50} {n / GIB:9.2f} GiB" for name, n in rows])
