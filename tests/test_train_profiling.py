"""Profiled training steps (train.profile_steps): where they run, what the summary holds, and that
throughput figures leave them out."""
import os
import sys
import warnings

import pytest
import torch
from tools_loader import load_tool

from dinov3_fast.train.config import apply_overrides, get_preset, validate
from dinov3_fast.train.loop import train
from dinov3_fast.train.profiling import SyncCounter, _busy_seconds, category, format_summary


def _run(tmp_path, steps, log_every, profile_steps, period=-1):
    cfg = apply_overrides(get_preset("debug"), [
        f"train.output_dir={tmp_path}", "train.batch_size_per_gpu=4", f"train.steps={steps}",
        f"train.log_every={log_every}", f"train.profile_steps={profile_steps}", f"checkpointing.period={period}",
        "evaluation.knn_val_samples=0"])
    hist = train(cfg, progress=False, log_fn=None)
    return cfg, hist, [s for s in hist["steps"] if "step_time" in s]


def test_the_last_steps_are_profiled_as_their_own_interval_and_left_out_of_the_rate(tmp_path):
    cfg, hist, logged = _run(tmp_path, steps=7, log_every=2, profile_steps=2)
    # the log period (2, 4), a log closing the timed steps (5), the profiled steps 6-7
    assert [(s["step"], s.get("profiled", False)) for s in logged] == [(2, False), (4, False), (5, False), (7, True)]
    prof = hist["profile"]
    assert (prof["steps"], prof["first_step"]) == (2, 6)
    assert logged[-1]["step_time"] == pytest.approx(prof["wall_s"] / 2)  # not the summary's own work
    assert prof["wall_s"] > 0 and prof["top"] and set(prof["categories"]) <= {
        "dinov3_fast", "matmul", "attention", "inductor", "communication", "copies", "other"}
    # the fused ops and the model's matmuls are both seen on the CPU
    assert prof["categories"]["dinov3_fast"] > 0 and prof["categories"]["matmul"] > 0
    assert "busy_s" not in prof and "host_syncs" not in prof  # CUDA-only figures

    tr = load_tool("train_results")
    run = tr.summarise_train({"config": cfg.to_dict(), "steps": hist["steps"], "profile": prof})
    seconds = logged[1]["step_time"] * 2 + logged[2]["step_time"] * 1  # steps 3-4 and 5
    assert run["img_per_s"] == pytest.approx(4 * 3 / seconds)
    assert run["profile"] is prof and run["intervals"][3]["profiled"] is True


def test_no_log_or_periodic_save_inside_the_profiled_steps(tmp_path):
    """A log synchronises and would time profiled steps as normal ones: with a log period shorter
    than the profiled span, the span is still one interval. A periodic checkpoint there would save
    unchecked losses (they are read at the span's end) and time DCP as training: the end-of-run
    save follows instead."""
    from dinov3_fast.train.checkpoint import complete_checkpoints
    _, hist, logged = _run(tmp_path, steps=5, log_every=1, profile_steps=3, period=2)
    assert [(s["step"], s.get("profiled", False)) for s in logged] == [(1, False), (2, False), (5, True)]
    assert (hist["profile"]["steps"], hist["profile"]["first_step"]) == (3, 3)
    assert [p.name for p in complete_checkpoints(tmp_path / "ckpt")] == ["step_00000002", "step_00000005"]


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


def test_sync_counter_counts_sync_warnings_by_calling_line_and_shows_the_rest(monkeypatch):
    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args, **kwargs: shown.append(str(message)))
    with SyncCounter() as syncs:
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation")  # the same line twice
        warnings.warn("something else")
        # raised by code in torch's folder (as torch's Python wrappers do): counted at this caller
        in_torch = compile('warnings.warn("called a synchronizing CUDA operation")',
                           os.path.join(os.path.dirname(torch.__file__), "fake_wrapper.py"), "exec")
        exec(in_torch, {"warnings": warnings})
        line = sys._getframe().f_lineno - 1
    assert syncs.counts.pop(f"{__file__}:{line}") == 1
    ((where, count),) = syncs.counts.items()
    assert where.startswith(__file__) and count == 2
    assert shown == ["something else"]
    warnings.warn("after")  # the hook is gone after the block
    assert shown == ["something else", "after"]
