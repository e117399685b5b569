"""A signal (SIGTERM, SIGINT, SIGUSR1) stops training after a step every rank agrees on, with a
checkpoint of that step that resumes as a periodic one does (train/preemption.py)."""
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from dinov3_fast.train.checkpoint import complete_checkpoints, verify_checkpoint
from dinov3_fast.train.config import apply_overrides, get_preset
from dinov3_fast.train.loop import train
from dinov3_fast.train.preemption import STOP_SIGNALS, Preempted, Preemption
from gloo_ranks import run_on_ranks

# the debug preset at batch 4: a step takes ~0.1 s on a CPU; no periodic save, no kNN probe
CLI = ["train", "--preset", "debug", "--steps", "5", "--batch", "4", "--log-every", "1", "--no-progress",
       "evaluation.knn_val_samples=0", "checkpointing.period=0"]
# The CLI in a fresh process that sends itself SIGTERM after logging step 2: the handler records it
# between steps 2 and 3, so the run stops after step 3, the step then in flight.
SIGTERM_AFTER_STEP_2 = """
import os, signal, sys
import dinov3_fast.train.loop as loop
from dinov3_fast.cli import main
original = loop.train
def train(cfg, **kwargs):
    def on_log(history):
        if kwargs.get("on_log") is not None:
            kwargs["on_log"](history)
        if history["steps"][-1]["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    return original(cfg, **{**kwargs, "on_log": on_log})
loop.train = train
sys.exit(main(sys.argv[1:]))
"""


def _cli(tmp_path, name, *args, script=None):
    cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m", "dinov3_fast.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, *CLI, "--json", str(tmp_path / f"{name}.json"), *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_sigterm_saves_the_step_exits_143_and_resumes_as_uninterrupted(tmp_path):
    """The CLI, SIGTERM mid-run: one line (no traceback), exit status 143, a complete checkpoint of
    the step it stopped after and the --json history with it; --resume into the same folder then
    gives the losses of an uninterrupted run, bitwise (all three runs in fresh processes, one thread)."""
    run = tmp_path / "run"
    stopped = _cli(tmp_path, "stopped", "--output-dir", str(run), script=SIGTERM_AFTER_STEP_2)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    ckpt = run / "ckpt" / "step_00000003"
    line = f"SIGTERM received: stopped after step 3/5, saved checkpoint {ckpt} (resume: --resume {run})"
    assert stopped.stderr.strip().splitlines()[-1] == f"stopped: {line}", stopped.stderr[-3000:]
    assert line in stopped.stdout.splitlines() and "step 4/5" not in stopped.stdout, stopped.stdout
    assert complete_checkpoints(run / "ckpt") == [ckpt] and verify_checkpoint(ckpt)["step"] == 3
    history = json.loads((tmp_path / "stopped.json").read_text())
    assert history["checkpoint"] == str(ckpt) and [s["step"] for s in history["steps"]] == [1, 2, 3]

    resumed = _cli(tmp_path, "resumed", "--output-dir", str(run), "--resume", str(run))
    full = _cli(tmp_path, "full", "--output-dir", str(tmp_path / "full"))
    assert resumed.returncode == 0 and full.returncode == 0, (resumed.stderr[-3000:], full.stderr[-3000:])
    losses = {name: [s["total_loss"] for s in json.loads((tmp_path / f"{name}.json").read_text())["steps"]]
              for name in ("stopped", "resumed", "full")}
    assert len(losses["full"]) == 5 and len(losses["resumed"]) == 2, losses
    assert losses["stopped"] == losses["full"][:3] and losses["resumed"] == losses["full"][3:], losses


def _cfg(tmp_path, *extra):
    return apply_overrides(get_preset("debug"), [f"train.output_dir={tmp_path}", "train.batch_size_per_gpu=4",
                                                 "train.steps=4", "train.log_every=1", "evaluation.knn_val_samples=0",
                                                 "checkpointing.period=0", *extra])


@pytest.fixture
def own_handlers():
    """Python handlers of this test's own for the three signals (a signal that reaches one of them
    is recorded instead of stopping pytest), restored afterwards."""
    caught = []
    mine = {sig: (lambda signum, frame: caught.append(signum)) for sig in STOP_SIGNALS}
    before = {sig: signal.signal(sig, handler) for sig, handler in mine.items()}
    yield mine, caught
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_handlers_are_trains_only_while_it_runs(tmp_path, own_handlers):
    """train installs its handlers for its steps only and gives the caller's back after it returns,
    after it stops on a signal and after another error. The first signal names the stop; a second
    one (here SIGTERM after SIGUSR1, as torchrun forwards what the job got) does not abort it."""
    mine, caught = own_handlers
    during = []

    def look(history):
        during.append({sig: signal.getsignal(sig) for sig in mine})

    train(_cfg(tmp_path / "a"), progress=False, log_fn=None, on_log=look)
    assert len(during) == 4 and all(h[sig] is not mine[sig] for h in during for sig in mine), during
    assert {sig: signal.getsignal(sig) for sig in mine} == mine

    def two_signals_at_step_2(history):
        if history["steps"][-1]["step"] == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)

    logs = []
    with pytest.raises(Preempted, match=r"^SIGUSR1 received: stopped after step 3/4, saved checkpoint") as stop:
        train(_cfg(tmp_path / "b"), progress=False, log_fn=logs.append, on_log=two_signals_at_step_2)
    ckpt = tmp_path / "b" / "ckpt" / "step_00000003"
    assert (stop.value.signum, stop.value.step, stop.value.exit_code) == (signal.SIGUSR1, 3, 138)
    assert stop.value.checkpoint == str(ckpt) and complete_checkpoints(tmp_path / "b" / "ckpt") == [ckpt]
    assert logs[-1] == str(stop.value) and [s["step"] for s in stop.value.history["steps"]] == [1, 2, 3]
    assert {sig: signal.getsignal(sig) for sig in mine} == mine and caught == []

    def fail(history):
        raise ValueError("on_log failed")

    with pytest.raises(ValueError, match="on_log failed"):
        train(_cfg(tmp_path / "c"), progress=False, log_fn=None, on_log=fail)
    assert {sig: signal.getsignal(sig) for sig in mine} == mine and caught == []


def test_a_stop_after_a_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, own_handlers):
    """A stop right after a non-finite loss saves nothing, as a periodic save would not: the step's
    weights may be NaN, and the last good checkpoint stays the newest."""
    from dinov3_fast.train.meta_arch import SSLMetaArch
    forward_backward = SSLMetaArch.forward_backward

    def nan_from_the_third_step(self, batch, *, iteration=0, **kwargs):
        loss, logs = forward_backward(self, batch, iteration=iteration, **kwargs)
        return (loss * float("nan") if iteration >= 2 else loss), logs

    def sigint_at_step_2(history):
        if history["steps"][-1]["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(SSLMetaArch, "forward_backward", nan_from_the_third_step)
    good = tmp_path / "ckpt" / "step_00000002"
    with pytest.raises(Preempted, match=r"SIGINT received: stopped after step 3/4, no checkpoint of this step "
                                        r"\(the loss was not finite for the last 1 step\(s\)\)") as stop:
        train(_cfg(tmp_path, "checkpointing.period=2"), progress=False, log_fn=None, on_log=sigint_at_step_2)
    assert stop.value.exit_code == 130 and stop.value.checkpoint == str(good)
    assert complete_checkpoints(tmp_path / "ckpt") == [good]


def test_ignored_signals_stay_ignored_and_other_threads_install_nothing(own_handlers):
    mine, _ = own_handlers
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job's SIGINT
    with Preemption() as preemption:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is not mine[signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.agreed() == 0 and preemption.installed
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is mine[signal.SIGTERM]
    seen = []

    def in_a_thread():
        with Preemption() as preemption:
            seen.append((preemption.installed, signal.getsignal(signal.SIGTERM)))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen == [(False, mine[signal.SIGTERM])]


def _signal_rank_1(rank: int, world: int, root: str) -> None:
    """Rank 1 alone sends itself SIGTERM inside step 2; every rank records where it stopped."""
    import dinov3_fast.train.loop as loop
    step = loop.train_step

    def train_step(state):
        logs = step(state)
        if rank == 1 and state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return logs

    loop.train_step = train_step  # this process only
    cfg = apply_overrides(get_preset("debug"), [f"train.output_dir={root}", "train.device=cpu",
                                                "train.batch_size_per_gpu=4", "train.steps=8", "train.log_every=10",
                                                "evaluation.knn_val_samples=0", "checkpointing.period=0"])
    try:
        train(cfg, progress=False, log_fn=None)
        result = None
    except Preempted as stop:
        result = {"signum": stop.signum, "step": stop.step, "checkpoint": stop.checkpoint}
    with open(f"{root}/rank{rank}.json", "w") as f:
        json.dump(result, f)


@pytest.mark.distributed
def test_two_ranks_stop_at_the_same_step_when_one_gets_the_signal(tmp_path):
    """2 gloo ranks, SIGTERM to rank 1 only, between log steps: both ranks agree (one step later,
    the all-reduce being read a step after it is posted) to stop after step 3, save that step
    together (the DCP save is collective) and stop; neither trains on."""
    run_on_ranks(_signal_rank_1, str(tmp_path), world=2)
    ckpt = tmp_path / "ckpt" / "step_00000003"
    want = {"signum": signal.SIGTERM, "step": 3, "checkpoint": str(ckpt)}
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [want, want]
    assert complete_checkpoints(tmp_path / "ckpt") == [ckpt]
    meta = verify_checkpoint(ckpt)
    assert meta["step"] == 3 and meta["world_size"] == 2 and {"rank0.pt", "rank1.pt"} <= set(meta["files"])
    assert [torch.load(ckpt / f"rank{r}.pt", weights_only=False)["step"] for r in (0, 1)] == [3, 3]
