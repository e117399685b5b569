"""What one benchmark case is: an op at one DINOv3 shape, with the implementations to compare.

Each op contributes a module in `dinov3_fast/bench/cases/` exposing `cases() -> list[BenchCase]`.
The runner (`dinov3_fast.bench.runner`) times every implementation of a case in the same process,
so ratios to the first implementation (the baseline) are measured side by side.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Inputs = tuple[tuple, dict]


@dataclass(frozen=True)
class BenchCase:
    """One (op, preset) pair.

    Attributes:
        op: public op name, e.g. "gram_loss".
        preset: shape preset name, e.g. "vitl_256px"; DINOv3's real shapes, or "cpu_*" for the small
            presets meant for the CPU.
        device: "cpu" or "cuda": where this preset is meant to run. `dinov3-fast bench` runs the
            presets of the device it has.
        make_inputs: (device) -> (args, kwargs). Tensors that need gradients in training already have
            requires_grad=True; inputs are freshly drawn on every call.
        impls: name -> callable(*args, **kwargs) returning a tensor or a tuple/list of tensors
            (every output with a gradient is back-propagated). The first entry is the baseline
            every ratio is measured against.
            Conventional names: "reference" (eager DINOv3 formula), "reference+compile",
            "fused" (our op with its default backend), or "fused:<backend>".
        parameters: (device) -> the module parameters a backward writes gradients of (a whole-block
            case's weights), cleared between runs like the inputs'; None for a functional op.
        flops: forward matmul FLOPs (for TFLOP/s and the compute roofline against the measured
            matmul rate), or None where the op is not matmul work (an elementwise op's FLOPs
            against a matmul peak would say nothing).
        impl_flops: per-impl overrides of `flops`, where an impl runs a different formulation (the
            Gram reference forms P x P Grams where the fused op takes the D x D identity): each
            row's TFLOP/s is then the work that impl executes.
        fp32_impls: impls whose matmuls run in fp32 whatever the input dtype (DINOv3's Gram and KoLeo
            upcast): their fraction of peak is of the fp32 matmul rate, not the bf16 one.
        bytes: forward memory traffic in bytes (for the bandwidth roofline), or None: the minimal
            traffic, or where an issue judges a schedule (Sinkhorn-Knopp: "the bytes its schedule
            must move", issue #4) that schedule's, as the case's note says.
        min_bytes: where `bytes` counts a schedule's traffic, the minimal one (inputs read once,
            outputs written once): re-reads that hit the L2 are not DRAM traffic, so the row
            also reports this fraction of copy bandwidth.
        bwd_flops: useful FLOPs of the backward alone (None: not reported).
        backward: whether to also time forward+backward.
        note: one line shown with the case (e.g. which formulation the shapes select).
        tags: labels; "model" marks a whole-block case (run by `dinov3-fast bench --model`, and
            skipped by the AOT compile check, whose kernels the op presets already cover).
    """

    op: str
    preset: str
    device: str
    make_inputs: Callable[[torch.device], Inputs]
    impls: dict[str, Callable]
    parameters: Callable[[torch.device], list[torch.Tensor]] | None = None
    flops: float | None = None
    impl_flops: dict[str, float] = field(default_factory=dict)
    fp32_impls: tuple[str, ...] = ()
    bytes: float | None = None
    min_bytes: float | None = None
    bwd_flops: float | None = None
    backward: bool = True
    note: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_model(self) -> bool:
        return "model" in self.tags
