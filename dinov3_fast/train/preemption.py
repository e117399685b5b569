"""Stop on a signal at a step every rank agrees on, so the loop can save a checkpoint there and exit.

    with Preemption(device, world) as preemption:
        while ...:
            train_step(...)
            if signum := preemption.agreed():   # at the same steps on every rank
                ... save a checkpoint of this step ...
                raise Preempted(message, signum, step, checkpoint, history)

Signals: SIGTERM (SLURM, Kubernetes, torchrun's scale-down and shutdown), SIGINT (Ctrl-C) and
SIGUSR1 (SLURM's `--signal=USR1@<seconds>`). The handlers only record the first signal's number;
the loop reads it between steps. A signal whose handler is SIG_IGN when training starts stays
ignored (a background job's SIGINT, a launcher's choice). The previous handlers come back when the
context exits, whether it returns or raises. signal.signal works only in the main thread:
elsewhere nothing is installed and a signal does whatever the process's own handlers do.
Under torchrun the agent forwards SIGTERM and SIGINT to the workers and SIGKILLs them after
--shutdown-timeout (30 s); SIGUSR1 reaches them through it only with `--signals-to-handle
SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1` (not in its default list: an unhandled SIGUSR1 ends the agent).

Repeated signals are recorded and otherwise ignored: they do not abort the save. Under `srun
torchrun` they are the normal case, not an impatient user: SLURM signals every process of the job
step (time limit, preemption, scancel, srun's Ctrl-C) and the torchrun agent forwards what it got,
so each rank gets the signal twice within milliseconds, and a rule "a second signal aborts" would
abort there every time. What stops the process at once is the sender's SIGKILL (SLURM's KillWait,
Kubernetes' terminationGracePeriodSeconds, torchrun's --shutdown-timeout: 30 s by default each)
or, by hand, kill -9 or Ctrl-\\ (SIGQUIT). A kill during the save loses nothing already saved: a
save writes into .tmp_step_N, and only rank 0's rename after the manifest (once every rank's files
are in) makes step_N, so the previous checkpoint stays the newest complete one (checkpoint.py).

Agreement: the DCP save is collective, so every rank must stop at the same step, also when only
some of them got the signal (one node's processes signalled before another's). With several ranks,
every step all-reduces (MAX) the signal number each rank recorded, and reads the result one step
later: on a GPU through a copy to pinned host memory and an event recorded after the previous
step's work, whose wait leaves this whole step queued on the GPU. A `.item()` per step would drain
the queue instead, and the GPU would idle while the host prepares the next batch (iBOT masks alone
take ~8.5 ms of host time per ViT-L b128 step); the log steps synchronise anyway, but waiting for
one (train.log_every = 10) would make the latency 10 steps. The cost is one 4-byte all-reduce per
step (on 2 gloo CPU ranks that of a bare all-reduce, 0.7-1.8 ms on a loaded 2-core box, against
~100 ms debug-preset steps; on NCCL a tiny kernel). From the signal to the save: the rest of the
step in flight, plus one more step if the signal came after that step's vote, plus one more with
several ranks: at most ~1.9 s at ViT-L/16's 0.63 s step on an H100, leaving most of a 30 s grace
period to the save. No vote is taken inside a profiled window (train.profile_steps; it would be
counted there), nor at the last step, which saves anyway.
"""
from __future__ import annotations

import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a signal: `signum`, the `step` it stopped after, the `checkpoint` saved
    there (or the last good one, or None) and the `history` so far. `exit_code` is the shell's
    status for a process killed by that signal, 128 + signum (143 for SIGTERM, 130 for SIGINT),
    which the CLI exits with."""

    def __init__(self, message: str, signum: int, step: int, checkpoint: str | None, history: dict[str, Any]):
        super().__init__(message)
        self.signum, self.step, self.checkpoint, self.history = signum, step, checkpoint, history
        self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Preemption:
    """Records the first of `signals` while the context is open (module docstring); `agreed()`
    says when to stop, on every rank alike."""

    def __init__(self, device: torch.device | str = "cpu", world: int = 1, signals=STOP_SIGNALS):
        self.signals, self.world = tuple(signals), world
        self.received = 0  # the first signal's number, 0 while none came
        self.installed = False  # False outside the main thread (see the module docstring)
        self._previous: dict[int, Any] = {}
        self._posted = False
        if world > 1:
            device = torch.device(device)
            self._vote = torch.zeros(1, dtype=torch.int32, device=device)
            self._host = torch.zeros(1, dtype=torch.int32, pin_memory=device.type == "cuda")
            self._done = torch.cuda.Event() if device.type == "cuda" else None

    def _record(self, signum, frame) -> None:  # a signal handler: it only sets the flag
        if not self.received:
            self.received = signum

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._record)
            self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            # None: a handler set outside Python, which signal.signal cannot reinstall; the default is the closest
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def agreed(self) -> int:
        """The signal number to stop for after this step, 0 to go on; the same on every rank.
        With several ranks, every rank must call it at the same steps (it is a collective), and
        it answers for the vote of its previous call (module docstring)."""
        if self.world == 1:
            return self.received
        agreed = 0
        if self._posted:
            if self._done is not None:
                self._done.synchronize()
            agreed = int(self._host[0])
        self._vote.fill_(self.received)
        dist.all_reduce(self._vote, op=dist.ReduceOp.MAX)
        self._host.copy_(self._vote, non_blocking=True)
        if self._done is not None:
            self._done.record()
        self._posted = True
        return agreed
