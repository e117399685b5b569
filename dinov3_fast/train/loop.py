"""The training loop: setup, the per-iteration schedule, logging, checkpoints, kNN probe.

    history = train(get_preset("debug"), steps=20)

Runs under `torchrun` (FSDP2 over all ranks: nccl on CUDA, gloo on CPU) or in one process: on
CUDA with a low-precision compute_precision.param_dtype, FSDP2 on a 1-rank group (modules in that
dtype, as on many ranks; `compute_precision.single_rank_fsdp=false`: fp32 modules with the forward
under autocast instead); on the CPU, or in fp32, plain fp32 modules. Per iteration, DINOv3's order:
Gram-teacher load/refresh, schedules -> optimizer groups, batch (augmentation on the device),
forward_backward, per-sub-model gradient clipping, AdamW step, EMA update.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import resource
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from dinov3_fast.models import block_keep_fraction, flops_per_image
from dinov3_fast.train.augment import MultiCropAugmentation
from dinov3_fast.train.checkpoint import check_run_start, load_checkpoint, save_checkpoint
from dinov3_fast.train.config import Config, ConfigError, CropsConfig, save_config, validate
from dinov3_fast.train.data import build_source, make_batch, source_image_size, step_indices
from dinov3_fast.train.knn import knn_probe
from dinov3_fast.train.masking import MaskingGenerator, global_crop_masker
from dinov3_fast.train.meta_arch import SSLMetaArch
from dinov3_fast.train.optim import apply_schedule, build_optimizer, clip_gradients
from dinov3_fast.train.parallelize import parallelize, shards_single_process
from dinov3_fast.train.preemption import Preempted, Preemption, signal_name
from dinov3_fast.train.profiling import StepProfiler, format_summary
from dinov3_fast.train.schedules import Schedules

DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}
MAX_NAN_STEPS = 2  # consecutive non-finite losses tolerated (DINOv3's do_train)
# Dense bf16 peak FLOP/s per card, for MFU; the first name found in the device's name counts, so a
# variant comes before its family (an H100 PCIe has 756, not the SXM card's 989).
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "GH200": 989e12, "H200 NVL": 835e12,
              "H200": 989e12, "A100": 312e12, "L40S": 362e12}
ALLOCATOR_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # the user's allocator settings


def enable_expandable_segments_unless_configured() -> None:
    """Expandable segments for the CUDA caching allocator, unless the user set either ALLOCATOR_ENV
    variable (then theirs stand).

    A step frees and reallocates activations of many sizes. With fixed segments, the H100 batch
    probe of 2026-11-26 ran out of memory with 5.7-6.9 GiB reserved but unallocated, on a 79.2 GiB
    card. The setting goes through the allocator's runtime setter: a CUDA build of torch may parse
    the environment when it is imported, so setting the variable here would be too late. It
    applies to the segments allocated from then on. `allocator_record` reports what is actually in
    effect.
    """
    if any(name in os.environ for name in ALLOCATOR_ENV):
        return
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch 2.11 and 2.13 have it
    if setter is None:
        setter = torch.cuda.memory._set_allocator_settings  # older torch; deprecated in favour of the above
    setter("expandable_segments:True")


def allocator_record(device: torch.device) -> dict[str, Any]:
    """The allocator settings of a run, for its JSON: the user's ALLOCATOR_ENV variables, and whether
    the CUDA caching allocator's segments are expandable (what is in effect, whoever set it; None off
    CUDA or before the first allocation)."""
    expandable = None
    if device.type == "cuda":
        segments = torch.cuda.memory_snapshot()
        expandable = any(seg.get("is_expandable", False) for seg in segments) if segments else None
    return {"env": {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ}, "expandable_segments": expandable}


def peak_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak FLOP/s (PEAK_FLOPS), None off CUDA or for a card not listed."""
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_flops_of(card: str) -> float | None:
    """PEAK_FLOPS for a device name such as "NVIDIA H100 80GB HBM3"."""
    return next((v for k, v in PEAK_FLOPS.items() if k in card), None)


def train_flops_per_image(arch: SSLMetaArch, cfg: Config) -> float:
    """Backbone matmul FLOPs per image and step that the GPU runs: student fwd + bwd (3x) on all
    crops, its blocks' branches on the images stochastic depth keeps (at vitl16_h100's rate 0.3,
    0.7 of them: counting the dropped ones would inflate MFU by a third); teacher forward on the
    global crops, Gram teacher forward on its crops (heads and activation recompute not counted)."""
    c, b = cfg.crops, cfg.train.batch_size_per_gpu
    backbone, rate = arch.student.backbone, cfg.student.drop_path_rate
    student = (flops_per_image(backbone, [c.global_crops_size] * 2, block_keep_fraction(2 * b, rate))
               + flops_per_image(backbone, [c.local_crops_size] * c.local_crops_number,
                                 block_keep_fraction(c.local_crops_number * b, rate)))
    total = 3 * student + flops_per_image(arch.teacher.backbone, [c.global_crops_size] * 2)
    if arch.gram_teacher is not None:
        total += flops_per_image(arch.gram_teacher.backbone, [c.gram_teacher_crops_size] * 2)
    return float(total)


def setup_distributed(cfg: Config, device: torch.device) -> tuple[int, int]:
    """The run's process group, initialised unless one exists; returns (rank, world). Under torchrun
    (WORLD_SIZE > 1): every rank, nccl on CUDA, gloo on CPU. One process that
    `shards_single_process`: a 1-rank nccl group over an in-memory store. Otherwise none (0, 1).
    An nccl group is bound to `device` (this rank's GPU, already current), so its communicators
    are made there at once rather than on a device guessed at the first collective.
    The group lives until the process ends or its owner destroys it (the CLI does, after train)."""
    if not (dist.is_available() and dist.is_initialized()):
        group = {"backend": "nccl", "device_id": device} if device.type == "cuda" else {"backend": "gloo"}
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group(**group)
        elif shards_single_process(cfg, device.type):
            dist.init_process_group(**group, store=dist.HashStore(), rank=0, world_size=1)
        else:
            return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: max RSS, GiB


@dataclasses.dataclass
class TrainState:
    """What the loop owns: models, optimizer, data pipeline and its random state."""
    cfg: Config
    arch: SSLMetaArch
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    source: Any
    aug: MultiCropAugmentation
    gen: torch.Generator
    masker: MaskingGenerator
    device: torch.device
    rank: int
    world: int
    sharded: bool  # FSDP2 (a process group exists); else plain modules (autocast on CUDA)
    step: int = 0
    gram_updates: int = 0

    def rank_state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "aug": self.gen.get_state(), "mask": self.masker.rng.getstate(),
               "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"rng": rng, "gram_updates": self.gram_updates, "gram_initialized": self.arch.gram_teacher_initialized}

    def restore(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.gram_updates = state.get("gram_updates", 0)
        self.arch.gram_teacher_initialized = state.get("gram_initialized", False)
        rng = state.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            self.gen.set_state(rng["aug"])
            self.masker.rng.setstate(rng["mask"])
            random.setstate(rng["python"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)


def warn_if_gram_crops_are_upsampled(crops: CropsConfig, image_size: int) -> None:
    """Warn when the Gram teacher's crops are larger than the source images (side `image_size`):
    each of them is then an upsampled image, with no more detail than the student's crops, which
    is what the Gram teacher's high resolution is for. A warning, not an error: the run is valid
    (DINOv3's RandomResizedCrop upsamples any image smaller than its output), and small sources
    are what quick CPU runs use."""
    if crops.gram_teacher_crops_size is not None and crops.gram_teacher_crops_size > image_size:
        warnings.warn(f"crops.gram_teacher_crops_size ({crops.gram_teacher_crops_size}) is larger than the source "
                      f"images ({image_size} px, train.image_size): every Gram-teacher crop is upsampled, so it "
                      "adds no detail; raise train.image_size (or leave it null for 1.25 x the largest crop)",
                      stacklevel=2)


def build_state(cfg: Config, device: torch.device | str | None = None) -> TrainState:
    """Models (initialised, parallelised), optimizer, schedules and data pipeline for `cfg`."""
    device = torch.device(device or cfg.train.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    elif device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.index != local_rank:
        raise ConfigError(f"train.device={device} under torchrun would put every rank on that GPU; "
                          f"give train.device=cuda (each rank takes cuda:LOCAL_RANK, here cuda:{local_rank})")
    if device.type == "cuda":
        enable_expandable_segments_unless_configured()
        torch.cuda.set_device(device)
    rank, world = setup_distributed(cfg, device)
    validate(cfg, world)
    t = cfg.train
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    sharded = dist.is_available() and dist.is_initialized()  # see setup_distributed
    meta_init = device.type == "cuda" and sharded
    arch = SSLMetaArch(cfg, device="meta" if meta_init else device)
    if not meta_init:
        arch.init_weights()
    cp = cfg.compute_precision
    mesh = None
    if sharded:
        mesh = init_device_mesh(device.type, (world,))  # on the training device, whatever the backend
    parallelize(arch, ac=t.ac, compile=t.compile, mesh=mesh, param_dtype=DTYPE[cp.param_dtype] if sharded else None,
                reduce_dtype=DTYPE[cp.reduce_dtype], shard=sharded)
    if meta_init:
        arch.to_empty(device=device)
        arch.init_weights()
    arch.train()
    optimizer = build_optimizer(cfg, arch.student)
    image_size = source_image_size(cfg)
    warn_if_gram_crops_are_upsampled(cfg.crops, image_size)
    source = build_source(t.dataset_path, image_size, t.synthetic_classes, t.seed)
    gen = torch.Generator(device=device).manual_seed(t.seed * 1000 + rank)
    masker = global_crop_masker(cfg.crops.global_crops_size, cfg.student.patch_size,
                                random.Random(t.seed * 1000 + rank))
    torch.manual_seed(t.seed * 1000 + rank)  # per-rank streams from here on (drop path, RoPE jitter)
    return TrainState(cfg, arch, optimizer, Schedules(cfg, world), source, MultiCropAugmentation(cfg.crops), gen,
                      masker, device, rank, world, sharded)


def next_batch(state: TrainState):
    """This rank's batch at state.step: the source's images (an image folder's as a padded canvas
    with each image's extent, so crops come from whole images), augmented and masked."""
    cfg = state.cfg
    idx = step_indices(state.source, state.step, cfg.train.batch_size_per_gpu, state.rank, state.world, cfg.train.seed)
    images, labels, extents = state.source.batch_with_extents(idx, state.device)
    return make_batch(images, labels, state.aug, state.gen, state.masker, cfg.ibot.mask_ratio_min_max,
                      cfg.ibot.mask_sample_probability, extents)


def train_step(state: TrainState) -> dict[str, torch.Tensor]:
    """One iteration at state.step; returns the (unsynchronised) logs and advances the step."""
    cfg, arch, it = state.cfg, state.arch, state.step
    g = cfg.gram
    if arch.has_gram_teacher and it == g.it_load_ema_teacher:
        arch.gram_load_ema_teacher()
    values = state.schedules.at(it)
    apply_schedule(state.optimizer, values)
    batch = next_batch(state)
    state.optimizer.zero_grad(set_to_none=True)
    autocast = (torch.autocast("cuda", dtype=DTYPE[cfg.compute_precision.param_dtype])
                if state.device.type == "cuda" and not state.sharded and cfg.compute_precision.param_dtype != "fp32"
                else contextlib.nullcontext())
    loss, logs = arch.forward_backward(batch, teacher_temp=values.teacher_temp, iteration=it, autocast=autocast)
    norms = clip_gradients(arch.student, cfg.optim.clip_grad)
    state.optimizer.step()
    arch.update_ema(values.momentum)
    if (arch.has_gram_teacher and g.rep_update and it + 1 >= g.it_first_update and (it + 1) % g.update_frequency == 0
            and (g.max_updates is None or state.gram_updates < g.max_updates)):
        arch.gram_load_ema_teacher()
        state.gram_updates += 1
    state.step += 1
    logs = {"total_loss": loss, **logs, **{f"grad_norm_{k}": v for k, v in norms.items()}}
    return logs | {"lr": torch.tensor(values.lr), "teacher_temp": torch.tensor(values.teacher_temp),
                   "momentum": torch.tensor(values.momentum)}


def _reduce_logs(pending: list[dict[str, torch.Tensor]], world: int) -> list[dict[str, float]]:
    """Each step's logs (0-dim tensors) as floats, averaged over the ranks in one all-reduce for
    all the steps (every rank logs the same keys at each step)."""
    if not pending:
        return []
    device = pending[0]["total_loss"].device
    keys = [sorted(logs) for logs in pending]
    vec = torch.stack([logs[k].detach().float().reshape(()).to(device) for logs, ks in zip(pending, keys) for k in ks])
    if world > 1:
        dist.all_reduce(vec)
        vec /= world
    values = iter(vec.tolist())
    return [{k: next(values) for k in ks} for ks in keys]


class _Intervals:
    """A run's logged intervals. `close` ends the one since the last: its steps' logs, reduced over
    the ranks, go to history["steps"]; their losses are checked (DINOv3 stops at the third
    non-finite step in a row, before saving it); the last row gets the interval's step time, img/s,
    peak memory and MFU, which rank 0 logs and hands to on_log."""

    def __init__(self, state: TrainState, history: dict[str, Any], bar, log_fn, on_log):
        self.state, self.history, self.bar, self.log_fn, self.on_log = state, history, bar, log_fn, on_log
        self.flops, self.peak = train_flops_per_image(state.arch, state.cfg), peak_flops(state.device)
        self.global_batch = state.cfg.train.batch_size_per_gpu * state.world
        self.pending: list[dict[str, torch.Tensor]] = []  # the unsynchronised logs of the open interval
        self.t_last, self.n_last = time.perf_counter(), state.step
        self.nan_run = 0  # consecutive steps with a non-finite loss

    def close(self, it: int, profile_wall_s: float | None = None) -> None:
        """End the interval at step `it` (a device synchronisation). profile_wall_s: the profiler's own
        wall time of the interval, when it was the profiled one (without the profiler's summary work)."""
        state, history = self.state, self.history
        if state.device.type == "cuda":
            torch.cuda.synchronize(state.device)
        now = self.t_last + profile_wall_s if profile_wall_s is not None else time.perf_counter()
        step_time = (now - self.t_last) / max(it - self.n_last, 1)
        self.t_last, self.n_last = now, it
        for step, row in enumerate(_reduce_logs(self.pending, state.world), start=it - len(self.pending) + 1):
            history["steps"].append(row)
            self.nan_run = self.nan_run + 1 if not math.isfinite(row["total_loss"]) else 0
            if self.nan_run > MAX_NAN_STEPS:
                raise RuntimeError(f"the loss was not finite for {self.nan_run} steps in a row (to step {step}); "
                                   f"the last checkpoint ({history['checkpoint']}) predates them")
        self.pending.clear()
        last = history["steps"][-1]
        img_s = self.global_batch / step_time
        mfu = self.flops * img_s / (self.peak * state.world) if self.peak else None
        last.update(step=it, step_time=step_time, img_per_s=img_s, peak_mem_gib=_peak_memory(state.device), mfu=mfu)
        if profile_wall_s is not None:
            last["profiled"] = True
        self.bar.set_postfix(loss=f"{last['total_loss']:.3f}", img_s=f"{img_s:.1f}")
        if "allocator" not in history:  # once, after real allocations
            history["allocator"] = allocator_record(state.device)
        if state.rank == 0 and self.log_fn is not None:
            losses = " ".join(f"{k}={last[k]:.4f}" for k in sorted(last) if k.endswith("loss"))
            self.log_fn(f"step {it}/{state.cfg.total_steps} {losses} lr={last['lr']:.3g} "
                        f"teacher_temp={last['teacher_temp']:.4f} img/s={img_s:.1f} step={step_time * 1e3:.0f}ms "
                        f"peak_mem={last['peak_mem_gib']:.2f}GiB mfu={'n/a' if mfu is None else f'{100 * mfu:.1f}%'}")
        if state.rank == 0 and self.on_log is not None:
            self.on_log(history)


def train(cfg: Config, *, resume: str | Path | None = None, progress: bool = True, device=None,
          log_fn=print, on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run cfg.total_steps iterations (from a checkpoint with `resume`). Returns the history:
    per-step reduced logs, kNN accuracies, throughput figures and the last checkpoint (this run's
    newest save, else the one it resumed from, else None).
    on_log(history) is called on rank 0 after every logged interval, e.g. to persist the figures
    so far: a run killed by a time limit keeps what it measured.

    SIGTERM, SIGINT or SIGUSR1 during the steps (a preemption, Ctrl-C) stops the run after a step
    all ranks agree on (the one in flight, or the next with several ranks), which saves a
    checkpoint as a periodic save would and raises `Preempted` (the CLI exits with 128 + the
    signal's number). The handlers are train's only while it runs, and only when it runs in the
    main thread; see preemption.py."""
    from tqdm import tqdm
    out_dir = Path(cfg.train.output_dir)
    ckpt_root = out_dir / "ckpt"
    resume = check_run_start(resume, cfg, ckpt_root)  # the folder checked is the folder loaded
    state = build_state(cfg, device)
    resumed_from = None  # the checkpoint folder, until this run saves its own
    if resume is not None:
        loaded = load_checkpoint(resume, state.arch, state.optimizer)
        state.restore(loaded)
        resumed_from = loaded["checkpoint"]
    g = cfg.gram
    if state.arch.has_gram_teacher and not state.arch.gram_teacher_initialized:
        # the Gram loss runs from the first step, and its teacher can only start as the EMA teacher
        holder = "a fresh run has none" if resume is None else f"checkpoint {resume} holds no Gram teacher"
        if g.it_load_ema_teacher != state.step:
            raise ConfigError(f"gram.it_load_ema_teacher ({g.it_load_ema_teacher}) must be this run's first "
                              f"step ({state.step}): the Gram teacher is a copy of the EMA teacher made then, "
                              f"and {holder}")
        if resume is not None and state.rank == 0 and log_fn is not None:
            log_fn(f"{holder}: the Gram teacher starts as a copy of the EMA teacher at step {state.step}")
    if state.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    config_yaml = (out_dir / "config.yaml").read_text() if state.rank == 0 else None
    total = cfg.total_steps
    history: dict[str, Any] = {"steps": [], "knn": [], "checkpoint": resumed_from}
    bar = tqdm(total=total, initial=state.step, disable=not progress or state.rank != 0, dynamic_ncols=True)
    if log_fn is print and not bar.disable:
        log_fn = bar.write  # keeps the bar intact
    intervals = _Intervals(state, history, bar, log_fn, on_log)
    period, evals = cfg.checkpointing.period, cfg.evaluation.eval_period_iterations
    # the kNN probe needs the synthetic data's hidden labels, and is off with no validation images
    knn = cfg.train.dataset_path == "synthetic" and cfg.evaluation.knn_val_samples > 0
    # Profiled: the last profile_steps steps, logged as an interval of their own (a log right before
    # them closes the timed interval). Last, not first: the profiler may leave CUPTI attached and
    # slow what follows (pytorch#144455), which must not reach the timed steps.
    profile_from = max(state.step, total - cfg.train.profile_steps) if cfg.train.profile_steps > 0 else None
    profiler = StepProfiler(state.device) if profile_from is not None and profile_from < total else None

    def save(step: int) -> None:  # every rank
        history["checkpoint"] = str(save_checkpoint(ckpt_root, step, state.arch, state.optimizer, state.rank_state(),
                                                    config_yaml, cfg.checkpointing.max_to_keep))

    def preempted(signum: int, it: int, saved: bool) -> Preempted:
        """Save step `it` by the periodic save's rules (unless `saved`: a periodic save just did),
        log why the run stops, and return the exception that stops it."""
        nan_run = intervals.nan_run
        skip = ("checkpointing.period=-1" if period < 0 else "no train.output_dir" if not cfg.train.output_dir
                else f"the loss was not finite for the last {nan_run} step(s)" if nan_run else None)
        if skip is None and not saved:
            save(it)
        history["state"] = state
        where = (f"saved checkpoint {history['checkpoint']} (resume: --resume {out_dir})" if skip is None
                 else f"no checkpoint of this step ({skip}); the last one: {history['checkpoint']}")
        message = f"{signal_name(signum)} received: stopped after step {it}/{total}, {where}"
        if state.rank == 0 and log_fn is not None:
            log_fn(message)
        return Preempted(message, signum, it, history["checkpoint"], history)

    with Preemption(state.device, state.world) as preemption:  # see preemption.py
        while state.step < total:
            if profiler is not None and state.step == profile_from:
                profiler.start()
            try:
                intervals.pending.append(train_step(state))
            except BaseException:
                if profiler is not None:
                    profiler.abort()
                raise
            bar.update(1)
            it = state.step
            profiled = it == total and profiler is not None
            if profiled:
                history["profile"] = profiler.stop() | {"steps": it - profile_from, "first_step": profile_from + 1}
                if state.rank == 0 and log_fn is not None:
                    log_fn(format_summary(history["profile"], it - profile_from))
            in_profile = profiler is not None and profiler.active  # no logging (it syncs) inside the window
            # none inside the profiled window: its losses are not read there (that would sync), and the
            # end-of-run save comes within profile_steps steps
            saves = period > 0 and it % period == 0 and it < total and not in_profile
            # a signal's number once every rank has seen it, else 0 (with several ranks a collective, at
            # the same steps on all); none inside the profiled window, nor at the last step, which saves anyway
            stop = 0 if in_profile or it == total else preemption.agreed()
            # a checkpoint step is a logged one too, so its losses are checked (below) before it saves
            if (it % cfg.train.log_every == 0 or it in (total, profile_from) or saves or stop) and not in_profile:
                intervals.close(it, history["profile"]["wall_s"] if profiled else None)
            if saves and intervals.nan_run:  # a non-finite step may have left NaN weights: keep the last good one
                if state.rank == 0 and log_fn is not None:
                    log_fn(f"step {it}: no checkpoint, the loss was not finite for the last {intervals.nan_run} "
                           f"step(s)")
            elif saves:
                save(it)
            if stop:
                bar.close()
                raise preempted(stop, it, saved=saves)
            if knn and evals > 0 and it % evals == 0 and it < total:
                history["knn"].append((it, _knn(state)))
        bar.close()
        if period >= 0 and cfg.train.output_dir:
            if not intervals.nan_run:
                save(state.step)
            elif state.rank == 0 and log_fn is not None:
                log_fn(f"step {state.step}: no final checkpoint, the loss was not finite for the last "
                       f"{intervals.nan_run} step(s)")
    if knn:
        history["knn"].append((state.step, _knn(state)))
        if state.rank == 0 and log_fn is not None:
            log_fn(f"kNN top-1 on the synthetic hidden labels: {100 * history['knn'][-1][1]:.1f}% "
                   f"(chance {100 / cfg.train.synthetic_classes:.1f}%)")
    history["state"] = state
    return history


def _knn(state: TrainState) -> float:
    return knn_probe(state.arch.teacher.backbone, state.source, state.cfg, state.device)
