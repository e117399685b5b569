"""Per-iteration schedules (DINOv3's CosineScheduler, in closed form: no per-iteration arrays).

A schedule is a pure function of the iteration, so a resumed run needs only the step to restore
them. `Schedules.at(it)` gives every value the step needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from dinov3_fast.train.config import Config, WeightSchedule


@dataclass(frozen=True)
class Schedule:
    """DINOv3's `CosineScheduler` (its v1 schedules): linear warmup `linspace(start_warmup_value,
    base_value, warmup_iters)` (endpoint included: the last warmup iteration is at `base_value`),
    then cosine to `final_value` at `total_iters` ("cosine"); `final_value` afterwards. Iterations
    below `zero_iters` give 0 (the frozen last layer).

    `warmup_endpoint=False` is the warmup of DINOv3's v2 `schedules:` (`linear_warmup_cosine_decay`:
    `linspace(start, peak, warmup, endpoint=False)`, so `base_value` is first reached at
    `warmup_iters`); with kind "constant" (the 7B recipe's v2 schedules, whose cosine runs from
    the peak to an equal end) the value then stays at `base_value`."""
    base_value: float
    final_value: float
    total_iters: int
    warmup_iters: int = 0
    start_warmup_value: float = 0.0
    kind: str = "cosine"
    zero_iters: int = 0
    warmup_endpoint: bool = True

    def __call__(self, it: int) -> float:
        if it < self.zero_iters:
            return 0.0
        if it < self.warmup_iters:
            steps = self.warmup_iters - 1 if self.warmup_endpoint else self.warmup_iters
            if steps == 0:  # linspace(a, b, 1) == [a]
                return self.start_warmup_value
            return self.start_warmup_value + (self.base_value - self.start_warmup_value) * it / steps
        if self.kind == "constant":
            return self.base_value
        if it >= self.total_iters:
            return self.final_value
        span = self.total_iters - self.warmup_iters
        progress = (it - self.warmup_iters) / span
        return self.final_value + 0.5 * (self.base_value - self.final_value) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class WarmupCosine:
    """DINOv3's `linear_warmup_cosine_decay` (the loss-weight schedules) in closed form: index `it`
    of `concat(linspace(start, peak, warmup, endpoint=False), (peak - end) * (1 + cos(linspace(0,
    pi, cosine))) / 2 + end, full(rest, end))`. Note the cosine's endpoint: it reaches `end` at its
    last iteration (the lr Schedule above, like DINOv2's, does not). Past the array: `end`."""
    start: float
    peak: float
    end: float
    warmup_iters: int
    cosine_iters: int

    @classmethod
    def from_config(cls, ws: WeightSchedule, epoch_length: int, total_iters: int) -> WarmupCosine:
        warmup = int(epoch_length * ws.warmup_epochs)
        cosine = int(epoch_length * ws.cosine_epochs) if ws.cosine_epochs is not None else total_iters - warmup
        return cls(ws.start, ws.peak, ws.end, warmup, cosine)

    def __call__(self, it: int) -> float:
        if it < self.warmup_iters:
            return self.start + (self.peak - self.start) * it / self.warmup_iters
        i = it - self.warmup_iters
        if i >= self.cosine_iters:
            return self.end
        c = 1.0 if self.cosine_iters == 1 else (1 + math.cos(math.pi * i / (self.cosine_iters - 1))) / 2
        return (self.peak - self.end) * c + self.end


def loss_weight_schedules(cfg: Config) -> tuple[WarmupCosine | None, WarmupCosine | None]:
    """The local-DINO-term weight (`dino.reweight_dino_local_loss`) and Gram-weight
    (`gram.loss_weight_schedule`) schedules, None where off. They span the run (`cfg.total_steps`,
    as the lr schedules here): DINOv3's `optim.epochs * OFFICIAL_EPOCH_LENGTH` unless `train.steps`
    shortens it."""
    epoch = cfg.train.OFFICIAL_EPOCH_LENGTH
    total = cfg.total_steps
    local = (WarmupCosine.from_config(cfg.dino.local_loss_weight_schedule, epoch, total)
             if cfg.dino.reweight_dino_local_loss else None)
    gram = (WarmupCosine.from_config(cfg.gram.loss_weight_schedule, epoch, total)
            if cfg.gram.use_loss and cfg.gram.loss_weight_schedule is not None else None)
    return local, gram


def scaled_lr(cfg: Config, world_size: int) -> float:
    """DINOv3's lr scaling rule (`apply_scaling_rules_to_cfg`) applied to optim.lr for the global batch B:
    sqrt_wrt_1024: lr * 4 * sqrt(B / 1024); linear_wrt_256: lr * B / 256."""
    batch = cfg.train.batch_size_per_gpu * world_size
    rule = cfg.optim.scaling_rule
    if rule == "sqrt_wrt_1024":
        return cfg.optim.lr * 4 * math.sqrt(batch / 1024)
    if rule == "linear_wrt_256":
        return cfg.optim.lr * batch / 256
    return cfg.optim.lr


@dataclass(frozen=True)
class StepValues:
    lr: float
    last_layer_lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float


class Schedules:
    """lr, last-layer lr, weight decay, teacher momentum and teacher temperature, DINOv3's way.

    optim.schedule "cosine" is DINOv3's v1 schedules (`build_schedulers`, `CosineScheduler`);
    "constant" is its v2 `schedules:` section as the 7B recipe sets it (`build_schedulers_v2`:
    `linear_warmup_cosine_decay` with peak == end), whose lr and teacher-temperature warmups
    leave out their endpoint. Weight decay and momentum follow the v1 cosine in both (the 7B
    recipe holds them constant, where v1 and v2 agree)."""

    def __init__(self, cfg: Config, world_size: int = 1) -> None:
        epoch = cfg.train.OFFICIAL_EPOCH_LENGTH
        total = cfg.total_steps
        o, t = cfg.optim, cfg.teacher
        v1 = o.schedule != "constant"
        warmup = int(o.warmup_epochs * epoch)
        peak = scaled_lr(cfg, world_size)
        self.lr = Schedule(peak, o.min_lr, total, warmup, 0.0, o.schedule, warmup_endpoint=v1)
        self.last_layer_lr = Schedule(peak, o.min_lr, total, warmup, 0.0, o.schedule,
                                      zero_iters=int(o.freeze_last_layer_epochs * epoch), warmup_endpoint=v1)
        self.weight_decay = Schedule(o.weight_decay, o.weight_decay_end, total)
        self.momentum = Schedule(t.momentum_teacher, t.final_momentum_teacher, total)
        temp_warmup = int(t.warmup_teacher_temp_epochs * epoch)
        self.teacher_temp = Schedule(t.teacher_temp, t.teacher_temp, temp_warmup, temp_warmup, t.warmup_teacher_temp,
                                     warmup_endpoint=v1)

    def at(self, it: int) -> StepValues:
        return StepValues(self.lr(it), self.last_layer_lr(it), self.weight_decay(it), self.momentum(it),
                          self.teacher_temp(it))
