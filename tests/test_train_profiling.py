"""Profiled training steps (train.profile_steps): where they run, what the summary holds, and that
throughput figures leave them out."""
import pytest
from tools_loader import load_tool

from dinov3_fast.train.config import apply_overrides, get_preset, validate
from dinov3_fast.train.loop import train
from dinov3_fast.train.profiling import _busy_seconds, category, format_summary


def test_profiled_steps_are_their_own_interval_and_left_out_of_the_rate(tmp_path):
    cfg = apply_overrides(get_preset("debug"), [
        f"train.output_dir={tmp_path}", "train.batch_size_per_gpu=4", "train.steps=7", "train.log_every=2",
        "train.profile_steps=2", "checkpointing.period=-1", "evaluation.knn_val_samples=0"])
    hist = train(cfg, progress=False, log_fn=None)
    logged = [s for s in hist["steps"] if "step_time" in s]
    # warm-up interval 1-2, profiled 3-4, then the log period resumes: 5-6 and the last step
    assert [(s["step"], s.get("profiled", False)) for s in logged] == [(2, False), (4, True), (6, False), (7, False)]
    prof = hist["profile"]
    assert (prof["steps"], prof["first_step"]) == (2, 3)
    assert prof["wall_s"] > 0 and prof["top"] and set(prof["categories"]) <= {
        "dinov3_fast", "matmul", "attention", "inductor", "communication", "copies", "other"}
    # the fused ops and the model's matmuls are both seen on the CPU
    assert prof["categories"]["dinov3_fast"] > 0 and prof["categories"]["matmul"] > 0
    assert "busy_s" not in prof and "host_syncs" not in prof  # CUDA-only figures

    tr = load_tool("train_results")
    data = {"config": cfg.to_dict(), "steps": hist["steps"], "profile": prof}
    run = tr.summarise_train(data)
    steady = [s for s in logged[1:] if not s.get("profiled")]
    seconds = sum(s["step_time"] * n for s, n in zip(steady, (2, 1)))
    assert run["img_per_s"] == pytest.approx(4 * 3 / seconds)
    assert run["profile"] is prof and run["intervals"][1]["profiled"] is True


def test_profile_steps_must_not_be_negative():
    cfg = apply_overrides(get_preset("debug"), ["train.profile_steps=-1"])
    with pytest.raises(ValueError, match="train.profile_steps must be >= 0"):
        validate(cfg)


@pytest.mark.parametrize("name,kind", [
    ("_gram_tiled_kernel", "dinov3_fast"), ("_rope_attn_fwd_kernel", "dinov3_fast"),
    ("dinov3_fast::soft_ce_fwd", "dinov3_fast"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"), ("nvjet_hsh_256x128_64x4_2x1_v", "matmul"),
    ("aten::addmm", "matmul"), ("flash_fwd_kernel", "attention"), ("cudnn_generated_fort_native_sdpa", "attention"),
    ("triton_poi_fused_add_mul_0", "inductor"), ("ncclDevKernel_AllGather_RING_LL", "communication"),
    ("Memcpy HtoD (Pageable -> Device)", "copies"), ("void at::native::vectorized_elementwise_kernel<4>", "other"),
])
def test_kernel_categories(name, kind):
    assert category(name) == kind


def test_busy_time_is_the_union_of_kernel_intervals():
    assert _busy_seconds([(20.0, 30.0), (0.0, 10.0), (5.0, 15.0), (12.0, 14.0)]) == pytest.approx(25e-6)
    assert _busy_seconds([]) == 0.0


def test_summary_lines_per_step():
    summary = {"wall_s": 0.4, "busy_s": 0.3, "categories": {"matmul": 0.2, "other": 0.1},
               "host_syncs": {"total": 6, "by_line": {"augment.py:90": 6}}}
    text = format_summary(summary, steps=2)
    assert "200.0 ms/step wall, device busy 150.0 ms/step (75%)" in text
    assert "matmul 100.0, other 50.0" in text and "3.0/step augment.py:90 x6" in text
