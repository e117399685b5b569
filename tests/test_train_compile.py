"""`parallelize` with compile on: selective AC, then the in-place `compile()` of every block of the
student, teacher and Gram-teacher backbones (inductor on the CPU), two training steps of the debug
model against the same steps uncompiled, with stochastic depth on (rate 0.3, as vitl16_h100: the
blocks' randperm subsets inside the compiled, checkpointed blocks). ~50 s on 2 busy cores with a
cold inductor cache (Dynamo, AOTAutograd and inductor for the student block's fwd+bwd under SAC and
the teachers' block forwards), ~12 s with a warm one (/tmp/torchinductor_$USER); the debug model (2
blocks, dim 64, batch 4) keeps it there."""
import warnings

import torch
from torch._dynamo.utils import counters

from dinov3_fast.train.config import apply_overrides, get_preset
from dinov3_fast.train.loop import build_state, train_step


def _two_steps(compile: bool):
    cfg = apply_overrides(get_preset("debug"), [
        "train.batch_size_per_gpu=4", "train.device=cpu", "train.ac=selective", f"train.compile={compile}",
        "student.layerscale=0.1", "student.drop_path_rate=0.3", "gram.use_loss=true", "gram.it_load_ema_teacher=0",
        "crops.gram_teacher_crops_size=64", "train.image_size=null"])
    state = build_state(cfg)
    logs = [train_step(state) for _ in range(2)]
    grads = {n: p.grad.clone() for n, p in state.arch.student.named_parameters() if p.grad is not None}
    return state, logs, grads


def test_parallelize_compile_one_step_matches_eager():
    torch._dynamo.reset()
    counters.clear()
    _, eager_logs, eager_grads = _two_steps(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SAC's context_fn under compile: a reminder, not a problem here
        state, logs, grads = _two_steps(True)
    arch = state.arch
    for bb in (arch.student.backbone, arch.teacher.backbone, arch.gram_teacher.backbone):
        assert all(getattr(b, "_compiled_call_impl", None) is not None for b in bb.blocks)
    assert counters["stats"]["unique_graphs"] >= 3, dict(counters["stats"])  # student, teacher, Gram teacher
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert set(logs[0]) == set(eager_logs[0]) and "gram_loss" in logs[0]
    for step, (a, b) in enumerate(zip(eager_logs, logs)):
        for k in a:
            if k.endswith("loss"):
                torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"step {step} {k}")
    assert set(grads) == set(eager_grads)
    for k, g in eager_grads.items():  # the second step's gradients (compiled backward, after one update)
        err = ((grads[k] - g).norm() / g.norm().clamp(min=1e-12)).item()
        assert err < 1e-4, (k, err)
