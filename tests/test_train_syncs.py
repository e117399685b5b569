"""Host-device synchronisations inside one training step, counted on the CPU.

On a GPU, an operation that needs a device value on the host (`.item()`, `bool(t)`, `.tolist()`,
`nonzero`, a boolean-mask index, `unique`, `repeat_interleave` without `output_size`, a tensor used as
a shape) or a blocking copy from pageable host memory (`torch.tensor(data, device=...)`, `.to(device)`)
makes the host wait until every queued kernel has run: the host can no longer run ahead of the GPU,
and the next kernels start only after the host has caught up. Outside the logged steps (which
synchronise on purpose, loop.py), a training step should have none.

There is no GPU here, so the step runs on the CPU with the sync points instrumented: a dispatch mode
sees every aten op that synchronises on CUDA, and patches see the Python-level reads (`tolist`) and
the host-to-device copies (`torch.tensor` / `as_tensor` / `new_tensor` with a device, a blocking
`.to(device)` or `.cpu()` called from dinov3_fast). Each event is attributed to the innermost
dinov3_fast frame. What the CPU run meets but a GPU run does not (the CPU backends, the CPU
optimizer, CPU-only branches) and what is host data by design is in ALLOWED, with the reason;
anything else fails, printing where it happened.
"""
from __future__ import annotations

import collections
import os
import sys
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dinov3_fast
from dinov3_fast.train.config import apply_overrides, get_preset
from dinov3_fast.train.loop import build_state, train_step
from dinov3_fast.train.profiling import SyncCounter

PKG = os.path.dirname(dinov3_fast.__file__) + os.sep
TORCH_OPTIM = os.path.join(os.path.dirname(torch.__file__), "optim") + os.sep
aten = torch.ops.aten

# aten ops that read a device value on the host when their input lives on a GPU
SYNC_OPS = {aten._local_scalar_dense.default: "item", aten.is_nonzero.default: "item",
            aten.nonzero.default: "nonzero", aten.masked_select.default: "masked_select",
            aten.equal.default: "equal", aten.bincount.default: "bincount", aten._unique.default: "unique",
            aten._unique2.default: "unique", aten.unique_dim.default: "unique",
            aten.unique_consecutive.default: "unique"}
BOOL_INDEX_OPS = {aten.index.Tensor: "bool index", aten.index_put.default: "bool index_put",
                  aten.index_put_.default: "bool index_put", aten._index_put_impl_.default: "bool index_put"}
REPEAT_OPS = (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor)

# (file under dinov3_fast/, function, kind) -> (most events per step, why it is no GPU sync)
ALLOWED = {
    ("train/data.py", "SyntheticShapes.batch", "item"):
        (1, "the noise seed, read from the host's dataset indices before they move to the device"),
    ("train/data.py", "to_device_async", "blocking .to(device)"):
        (None, "the CPU branch; on CUDA the copy goes through pinned memory with non_blocking"),
    ("ops/sinkhorn/__init__.py", "_check_n_samples", "item"):
        (1, "n_samples is read only for a CPU tensor (a CUDA one is checked for its size alone)"),
    ("ops/gram/__init__.py", "_backward", "item"):
        (1, "the upstream gradient is read only off CUDA (`grad.is_cuda or ...`)"),
}
# Whole classes of events a GPU step does not have (see `_allowed_class`).
CLASS_REASONS = {
    "cpu backend": "ops/*/cpu.py: the CPU kernels; a GPU step runs the triton/cuda backends",
    "cpu optimizer": "torch.optim's foreach AdamW on the CPU reads its host step counters; CUDA runs the "
                     "fused AdamW (optim.build_optimizer), whose counters stay on the device",
    "host masks": "iBOT masks and their metadata are drawn on the host inside data.make_batch (CPU tensors, "
                  "as DINOv3's collate), then sent with to_device_async",
}


def _qualname(frame) -> str:
    return getattr(frame.f_code, "co_qualname", frame.f_code.co_name)


def _stack(frame, limit: int = 12) -> str:
    """The stack from the outermost dinov3_fast frame in, without torch's dispatch wrappers."""
    frames = traceback.extract_stack(frame)
    first = next((i for i, f in enumerate(frames) if f.filename.startswith(PKG)), 0)
    noise = ("torch/_dynamo/", "torch/_compile.py", "torch/utils/_python_dispatch.py")
    kept = [f for f in frames[first:] if not any(n in f.filename for n in noise)]
    return "".join(traceback.format_list(kept[-limit:]))


class SyncRecorder:
    """Events (kind, site) of the code run while `on`; a site is (file under dinov3_fast/, function,
    line, via, host_masks, stack) of the innermost dinov3_fast frame, via = "torch.optim" when the
    event came from inside torch's optimizers, host_masks when data.make_batch is on the stack."""

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple]] = []
        self.on = False

    def add(self, kind: str, skip: int = 2) -> None:
        if not self.on:
            return
        frame, via, host_masks = sys._getframe(skip), None, False
        site = None
        while frame is not None:
            name = frame.f_code.co_filename
            if name.startswith(PKG):
                rel = name[len(PKG):].replace(os.sep, "/")
                if site is None:
                    site = (rel, _qualname(frame), frame.f_lineno, via)
                if rel == "train/data.py" and frame.f_code.co_name == "make_batch":
                    host_masks = True
            elif site is None and name.startswith(TORCH_OPTIM):
                via = "torch.optim"
            frame = frame.f_back
        if site is not None:
            self.events.append((kind, (*site, host_masks, _stack(sys._getframe(skip)))))


class _SyncOps(TorchDispatchMode):
    def __init__(self, recorder: SyncRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            self.recorder.add(SYNC_OPS[func])
        elif func in BOOL_INDEX_OPS:
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
                self.recorder.add(BOOL_INDEX_OPS[func])
        elif func in REPEAT_OPS and kwargs.get("output_size") is None:
            self.recorder.add("repeat_interleave without output_size")
        return func(*args, **kwargs)


def _device_arg(args, kwargs):
    dev = kwargs.get("device")
    for a in args:
        if isinstance(a, (str, torch.device)):
            dev = a
    return dev


def _from_package(skip: int = 2) -> bool:
    return sys._getframe(skip).f_code.co_filename.startswith(PKG)


@pytest.fixture
def record_syncs(monkeypatch):
    """recording() -> a context that records the sync events of the code run inside it."""
    recorder = SyncRecorder()

    def wrap(owner, name, kind, when=lambda args, kwargs: True, own_calls_only=False):
        original = getattr(owner, name)

        def patched(*args, **kwargs):
            if when(args, kwargs) and (not own_calls_only or _from_package()):
                recorder.add(kind)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, patched)

    wrap(torch.Tensor, "tolist", "tolist")
    with_device = lambda args, kwargs: _device_arg(args[1:], kwargs) is not None  # noqa: E731
    wrap(torch, "tensor", "host data to device", lambda a, k: k.get("device") is not None)
    wrap(torch, "as_tensor", "host data to device", with_device)
    wrap(torch.Tensor, "new_tensor", "host data to device", lambda a, k: k.get("device") is not None)
    blocking_move = lambda a, k: with_device(a, k) and not k.get("non_blocking", False)  # noqa: E731
    wrap(torch.Tensor, "to", "blocking .to(device)", blocking_move, own_calls_only=True)
    wrap(torch.Tensor, "cpu", "device to host (.cpu())", own_calls_only=True)

    class Recording:
        def __enter__(self):
            self.mode = _SyncOps(recorder).__enter__()
            recorder.on = True
            return recorder

        def __exit__(self, *exc):
            recorder.on = False
            return self.mode.__exit__(*exc)

    return Recording


def _allowed_class(kind: str, site: tuple) -> str | None:
    """The CLASS_REASONS entry that covers an event, or None."""
    rel, _, _, via, host_masks, _ = site
    if via == "torch.optim":
        return "cpu optimizer"
    if rel.startswith("ops/") and rel.endswith("/cpu.py"):
        return "cpu backend"
    if host_masks and rel in ("train/masking.py", "train/data.py") and kind != "blocking .to(device)":
        return "host masks"
    return None


def check_step_syncs(events) -> list[str]:
    """The problems among one step's events: events nothing allows, and allowed ones above their count."""
    counts = collections.Counter()
    problems, stacks = [], {}
    for kind, site in events:
        if _allowed_class(kind, site) is not None:
            continue
        rel, func, line, _, _, stack = site
        key = (rel, func, kind)
        counts[key] += 1
        stacks.setdefault(key, (line, stack))
    for key, n in sorted(counts.items()):
        most, _ = ALLOWED.get(key, (0, None))
        if most is not None and n > most:
            line, stack = stacks[key]
            problems.append(f"{n} x {key[2]} at dinov3_fast/{key[0]}:{line} ({key[1]}), allowed {most}:\n{stack}")
    return problems


CASES = {
    # Gram teacher on, stochastic depth on (its randperm subsets), every loss
    "fused": ["train.ops=fused"],
    "reference": ["train.ops=reference"],
    # the Gram loss on a subset of the tokens, gathered by index (meta_arch.get_gram_teacher_output)
    "fused-gram-masked": ["train.ops=fused", "gram.tokens_used=masked", "gram.img_level=false"],
    "reference-gram-unmasked": ["train.ops=reference", "gram.tokens_used=unmasked", "gram.img_level=false"],
}


def _state(extra, device="cpu"):
    cfg = apply_overrides(get_preset("debug"), [
        "train.batch_size_per_gpu=4", "student.drop_path_rate=0.3", "gram.use_loss=true", "gram.it_load_ema_teacher=0",
        "crops.gram_teacher_crops_size=48", "checkpointing.period=-1", *extra])
    return build_state(cfg, device)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_training_step_has_no_host_device_sync(case, record_syncs, monkeypatch):
    """Step 2 of a debug-preset run (the first warms the caches: device constants, sequence tables,
    optimizer state), from the schedules to the EMA update, without logging; each ops setting's
    default dispatch."""
    monkeypatch.delenv("DINOV3_FAST_BACKEND", raising=False)
    state = _state(CASES[case])
    train_step(state)
    with record_syncs() as recorder:
        train_step(state)
    assert state.step == 2
    problems = check_step_syncs(recorder.events)
    assert not problems, "host-device syncs in a training step:\n" + "\n".join(problems)
    # the recorder saw the step: the host-side mask sampling and the noise seed are there
    classes = {_allowed_class(k, s) for k, s in recorder.events}
    assert "host masks" in classes and classes <= {None, *CLASS_REASONS}, classes
    assert any(s[:2] == ("train/data.py", "SyntheticShapes.batch") for _, s in recorder.events)


def test_the_recorder_catches_syncs_added_to_the_step(record_syncs, monkeypatch):
    """Syncs added to the loss computation -- a branch on a device value, a boolean-mask index
    (forward, and its backward's index_put), a tensor made from host data on the device -- fail
    the check, each named at the meta_arch.py line that runs them (the backward's: loss.backward())."""
    from dinov3_fast.train.meta_arch import SSLMetaArch
    compute_losses = SSLMetaArch.compute_losses

    def with_syncs(self, teacher_global, student_global, *args, **kwargs):
        loss, logs = compute_losses(self, teacher_global, student_global, *args, **kwargs)
        cls = student_global["cls_pre_head"]
        loss = loss + cls[cls > 0].sum() * 0
        if loss > 0:
            loss = loss * torch.tensor(1.0, device=loss.device)
        return loss, logs

    monkeypatch.setattr(SSLMetaArch, "compute_losses", with_syncs)
    monkeypatch.delenv("DINOV3_FAST_BACKEND", raising=False)
    state = _state(CASES["fused"])
    train_step(state)
    with record_syncs() as recorder:
        train_step(state)
    problems = check_step_syncs(recorder.events)
    kinds = sorted(p.split(" at ")[0].split(" x ", 1)[1] for p in problems)
    assert kinds == ["bool index", "bool index_put", "host data to device", "item"], problems
    assert all("dinov3_fast/train/meta_arch.py" in p and "forward_backward" in p for p in problems), problems


@pytest.mark.gpu
@pytest.mark.parametrize("ops", ["fused", "reference"])
def test_a_cuda_training_step_has_no_host_device_sync(ops, monkeypatch):
    """The same step on a GPU, checked by CUDA itself: torch.cuda.set_sync_debug_mode reports every
    synchronising call of step 2, counted per calling line (profiling.SyncCounter); none is expected."""
    monkeypatch.delenv("DINOV3_FAST_BACKEND", raising=False)
    state = _state([f"train.ops={ops}"], device="cuda")
    train_step(state)
    torch.cuda.synchronize()
    with SyncCounter() as syncs:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(state)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert not syncs.counts, f"synchronising calls in a CUDA training step: {dict(syncs.counts)}"
