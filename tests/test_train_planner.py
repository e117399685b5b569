"""The ViT-7B sharding plan and the memory planner on the meta device with a fake process group."""
import pytest
import torch
import torch.distributed as dist

from dinov3_fast.cli import main as cli_main
from dinov3_fast.train.config import apply_overrides, get_preset
from dinov3_fast.train.planner import GIB, format_plan, plan_memory


@pytest.fixture(scope="module")
def plans():
    cfg = apply_overrides(get_preset("vit7b16"), ["train.ac=selective"])
    return {w: plan_memory(cfg, world_size=w) for w in (8, 256)}


def test_7b_sharding_plan_on_a_fake_process_group():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from dinov3_fast.train.meta_arch import SSLMetaArch
    from dinov3_fast.train.parallelize import parallelize

    dist.init_process_group("fake", store=FakeStore(), rank=3, world_size=256)
    try:
        with torch.device("meta"):
            arch = SSLMetaArch(get_preset("vit7b16"), device="meta")
        parallelize(arch, ac="selective", mesh=init_device_mesh("cpu", (256,)), param_dtype=torch.bfloat16)
        for models in (arch.student, arch.teacher):
            assert all(isinstance(b, FSDPModule) for b in models.backbone.blocks)
            assert isinstance(models.backbone, FSDPModule) and isinstance(models.dino_head, FSDPModule)
        w = arch.student.backbone.blocks[0].mlp.w1.weight  # 7B SwiGLU: [8192, 4096]
        assert w.placements == (Shard(0),) and w.device_mesh.size() == 256
        assert w.shape == (8192, 4096) and w.to_local().shape == (32, 4096)
        assert w.to_local().device.type == "meta"
        assert arch.student.backbone.blocks[0]._ac_mode == "selective"
        n = sum(p.numel() for p in arch.student.backbone.parameters())
        assert 6.7e9 < n < 6.8e9
        local = sum(p.to_local().numel() for p in arch.student.backbone.parameters())
        assert local == pytest.approx(n / 256, rel=1e-3)  # small dim-0 params leave some ranks an empty shard
    finally:
        dist.destroy_process_group()


def test_planner_figures_scale_with_world_size(plans):
    p8, p256 = plans[8], plans[256]
    assert p8.params_total == p256.params_total and 6.9e9 < p8.params_total < 7.1e9  # backbone + heads
    assert p8.params_per_rank == pytest.approx(p8.params_total / 8, rel=0.01)
    assert p256.params_per_rank == pytest.approx(p256.params_total / 256, rel=0.02)
    # fp32 params + grads + 2 Adam moments for the student, fp32 teacher: ~20 bytes per student parameter
    assert p8.sharded_state == pytest.approx(20 * p8.params_total / 8, rel=0.02)
    assert p256.sharded_state < p8.sharded_state / 30
    # activations and the transient buffers do not depend on the world size
    assert p8.activations == p256.activations and p8.transient_buffers == p256.transient_buffers
    # largest unit: the 7B DINO head (hidden 8192, 262k x 512 last layer), bf16 gather + fp32 grads, twice
    head = 4096 * 8192 + 8192 * 8192 + 8192 * 512 + 512 * 262144 + 2 * 8192 + 512
    assert p8.transient_buffers == 2 * head * (2 + 4)
    assert 20 * GIB < p8.activations < 200 * GIB and p8.heads_and_losses > 0
    text = format_plan(p256)
    assert "256 ranks" in text and "total per rank" in text


def test_planner_orders_ac_modes_and_ops():
    cfg = get_preset("debug")
    got = {ac: plan_memory(apply_overrides(cfg, [f"train.ac={ac}"]), world_size=2) for ac in ("none", "selective", "full")}
    assert got["full"].activations < got["selective"].activations < got["none"].activations
    ref = plan_memory(apply_overrides(cfg, ["train.ops=reference"]), world_size=2)
    assert ref.heads_and_losses > got["none"].heads_and_losses
    assert not dist.is_initialized()


def test_fused_plan_counts_the_teacher_targets_up_to_the_end_of_the_forward():
    """With fused ops the heads' last layers run inside the losses: the heads keep no logits, and the
    teacher targets (plus the largest loss call's chunk and weight-gradient accumulator) are alive
    only until the forward ends, so the peak takes the larger of them and the backward's working set."""
    from dinov3_fast.ops.linear_soft_ce.chunked import CHUNK_LOGITS, transient_bytes
    cfg = get_preset("debug")
    fused = plan_memory(cfg, world_size=2)
    ref = plan_memory(apply_overrides(cfg, ["train.ops=reference"]), world_size=2)
    b, k, ki = cfg.train.batch_size_per_gpu, cfg.dino.head_n_prototypes, cfg.ibot.head_n_prototypes
    hw = (cfg.crops.global_crops_size // cfg.student.patch_size) ** 2
    n_masked = int(2 * b * cfg.ibot.mask_sample_probability)  # DINOv3's collate: the top of each ratio band
    ratios = torch.linspace(*cfg.ibot.mask_ratio_min_max, n_masked + 1)
    masked = sum(int(hw * ratios[i + 1]) for i in range(n_masked))
    d, di = cfg.dino.head_bottleneck_dim, cfg.ibot.head_bottleneck_dim
    calls = ((cfg.crops.local_crops_number, b, k, d), (2, b, k, d), (1, masked, ki, di))
    loss_call = max(transient_bytes(*call, 4, CHUNK_LOGITS["cuda"]) for call in calls)  # fp32 modules here
    assert fused.loss_inputs == 4 * (2 * b * k + masked * ki) + loss_call
    assert ref.loss_inputs == 0 and ref.heads_and_losses > fused.heads_and_losses + fused.loss_inputs
    assert fused.total == (fused.sharded_state + fused.transient_buffers + fused.activations + fused.heads_and_losses
                           + max(fused.backward_working_set, fused.loss_inputs))
    assert "teacher targets + loss chunk" in format_plan(fused) and "teacher targets" not in format_plan(ref)


def test_plan_cli(capsys):
    assert cli_main(["plan", "--preset", "debug", "--gpus", "4", "--ac", "full"]) == 0
    assert "4 ranks" in capsys.readouterr().out


def test_planner_routes_meta_attention_to_a_fused_kernel():
    """On meta tensors SDPA takes its math path and keeps the N x N probabilities; the planner
    measures the fused kernel a GPU runs, which keeps only out and logsumexp."""
    import torch.nn.functional as F

    from dinov3_fast.train.planner import kernels_as_on_gpu, saved_activation_bytes

    B, H, N, Dh = 2, 4, 261, 64
    q, k, v = (torch.empty(B, H, N, Dh, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out_and_lse = B * H * N * Dh * 2 + B * H * N * 4
    assert saved_activation_bytes(lambda: F.scaled_dot_product_attention(q, k, v)) > B * H * N * N * 2
    with kernels_as_on_gpu():
        # plus flash's two RNG-state scalars
        assert saved_activation_bytes(lambda: F.scaled_dot_product_attention(q, k, v)) == pytest.approx(out_and_lse, abs=64)


def test_planner_sees_the_fused_attention():
    """Without AC the reference attention keeps its rotated q and k for the backward and the fused
    op does not (it keeps the packed qkv that the Linear's output already holds); with selective
    AC both keep only the attention op's output and logsumexp (the rest differs by RoPE tables)."""
    cfg = apply_overrides(get_preset("debug"), ["student.num_heads=2"])  # head dim 32: a Triton shape
    act = {(ac, ops): plan_memory(apply_overrides(cfg, [f"train.ac={ac}", f"train.ops={ops}"]), world_size=1).activations
           for ac in ("none", "selective") for ops in ("fused", "reference")}
    assert act["none", "fused"] < act["none", "reference"]
    assert act["selective", "fused"] == pytest.approx(act["selective", "reference"], rel=0.01)


@pytest.mark.parametrize("ac", ["none", "selective", "full"])
def test_planner_autocast_emulation_matches_a_real_autocast_forward(ac):
    """One process trains fp32 modules under autocast, which meta tensors do not see: the planner
    emulates its casts. Against a real CPU autocast forward of the same backbone (autocast's cache
    of the bf16 parameter copies left out of both), the saved bytes agree to a few hundred bytes
    (CPU autocast casts the matmuls as CUDA's does, but not the norms to fp32: that half of the
    emulation is not checked here); the residual stream AC keeps is fp32, so a bf16-module plan
    would be smaller."""
    import torch.nn as nn

    from dinov3_fast.train.meta_arch import build_backbone
    from dinov3_fast.train.parallelize import apply_ac
    from dinov3_fast.train.planner import _measure_student, saved_activation_bytes

    cfg = apply_overrides(get_preset("debug"), ["student.num_heads=2", f"train.ac={ac}", "train.batch_size_per_gpu=2",
                                                "train.ops=reference"])  # SDPA keeps out + lse on both devices
    planned = _measure_student(cfg, cfg.student.depth, torch.float32, autocast=torch.bfloat16).backbone
    torch.manual_seed(0)
    backbone = build_backbone(cfg, drop_path_rate=0.0, device="cpu")
    apply_ac(backbone.blocks, ac)
    c, b = cfg.crops, 2
    crops = [torch.randn(2 * b, 3, c.global_crops_size, c.global_crops_size),
             torch.randn(c.local_crops_number * b, 3, c.local_crops_size, c.local_crops_size)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = saved_activation_bytes(lambda: backbone(crops, is_training=True))
    cast_cache = sum(2 * p.numel() for m in backbone.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                     for p in m.parameters())
    assert planned == pytest.approx(measured - cast_cache, abs=256)
    assert _measure_student(cfg, cfg.student.depth, torch.bfloat16, autocast=None).backbone < planned


def test_planner_storage_rules_and_stochastic_depth():
    """Views of existing storage are not activations, a torch.tensor() literal is; stochastic
    depth runs each branch on a fixed-size subset of the batch, so it shrinks the plan."""
    from dinov3_fast.train.planner import saved_activation_bytes

    weight = torch.empty(64, 32)
    assert saved_activation_bytes(lambda: (weight.t(), weight[:8])) == 0
    assert saved_activation_bytes(lambda: torch.tensor([1.0, 2.0, 3.0])) == 12
    cfg = apply_overrides(get_preset("debug"), ["student.num_heads=2"])
    act = {r: plan_memory(apply_overrides(cfg, [f"student.drop_path_rate={r}"]), world_size=1).activations
           for r in (0.0, 0.5)}
    assert act[0.5] < act[0.0]


def _small_backbone(depth: int, ac: str):
    from dinov3_fast.train.meta_arch import build_backbone
    from dinov3_fast.train.parallelize import apply_ac
    cfg = apply_overrides(get_preset("debug"), [f"student.depth={depth}", "student.embed_dim=64", "student.num_heads=2"])
    torch.manual_seed(0)
    backbone = build_backbone(cfg, drop_path_rate=0.0)
    apply_ac(backbone.blocks, ac)
    return backbone


@pytest.mark.parametrize("ac", ["none", "selective", "full"])
def test_backward_peak_matches_the_profiler_on_a_real_run(ac):
    """The tracker's saved bytes + backward excess is the peak the CPU profiler measures for the same
    forward + backward (checkpoint recomputes included): the planner's backward term is a peak."""
    from dinov3_fast.bench.memory import peak_extra_bytes
    from dinov3_fast.train.planner import activation_bytes

    backbone = _small_backbone(2, ac)
    x = torch.randn(8, 3, 48, 48)
    weight = backbone.patch_embed.proj.weight  # as the planner: the backward runs through every block

    def forward():
        return backbone(x, is_training=True)["x_norm_patchtokens"]

    def forward_backward():
        out = forward()
        torch.autograd.grad(out, (weight,), torch.empty_like(out))

    saved, excess = activation_bytes(forward, (weight,))
    assert saved > 0 and excess > 0
    assert saved + excess == pytest.approx(peak_extra_bytes(forward_backward, torch.device("cpu")), rel=0.01)


def test_backward_peak_of_checkpointed_blocks_follows_from_the_plain_one():
    """What the planner assumes (it cannot replay GPU kernels in a recompute on meta): with AC, the
    backward's excess over the saved bytes is the plain (no AC) excess plus what a plain block keeps
    beyond a checkpointed one; and it does not grow with depth. Exact on a real CPU run."""
    from dinov3_fast.train.planner import activation_bytes

    x = torch.randn(8, 3, 48, 48, requires_grad=True)
    got = {}
    for depth in (1, 2, 3):
        for ac in ("none", "selective", "full"):
            backbone = _small_backbone(depth, ac)
            got[depth, ac] = activation_bytes(lambda: backbone(x, is_training=True)["x_norm_patchtokens"], (x,))

    def per_block(ac):
        return got[2, ac][0] - got[1, ac][0]

    for ac in ("selective", "full"):
        assert got[3, ac][1] == got[1, ac][1]
        assert got[3, ac][1] == pytest.approx(per_block("none") - per_block(ac) + got[1, "none"][1], rel=0.02)


@pytest.mark.parametrize("ops", ["fused", "reference"])
def test_plan_reports_the_backward_working_set(ops):
    """One unsharded process in bf16 (autocast emulated on meta, the losses backpropagated through
    their fused or reference backends); full AC rebuilds each block in its backward, so it needs more."""
    cfg = apply_overrides(get_preset("debug"), ["compute_precision.param_dtype=bf16", f"train.ops={ops}",
                                                "compute_precision.single_rank_fsdp=false"])
    plans = {ac: plan_memory(apply_overrides(cfg, [f"train.ac={ac}"]), world_size=1) for ac in ("none", "full")}
    assert plans["full"].backward_working_set > plans["none"].backward_working_set > 0
    assert "backward working set" in format_plan(plans["none"])


def test_one_gpu_plan_follows_the_trainer_onto_a_one_rank_group():
    """With a bf16 param dtype one GPU trains under FSDP2 on a 1-rank group (`shards_single_process`):
    modules in bf16 as on two ranks, so the same activations and transient buffers per rank, and
    fewer activations than fp32 modules under autocast (`single_rank_fsdp=false`), whose residual
    stream is fp32."""
    cfg = apply_overrides(get_preset("debug"), ["compute_precision.param_dtype=bf16", "student.num_heads=2"])
    one, two = plan_memory(cfg, world_size=1), plan_memory(cfg, world_size=2)
    autocast = plan_memory(apply_overrides(cfg, ["compute_precision.single_rank_fsdp=false"]), world_size=1)
    assert one.fsdp and two.fsdp and not autocast.fsdp
    assert one.activations == two.activations and one.transient_buffers == two.transient_buffers
    assert one.activations < autocast.activations
    assert one.sharded_state == autocast.sharded_state > two.sharded_state
    assert "all-gather" in format_plan(one) and "autocast" in format_plan(autocast)
