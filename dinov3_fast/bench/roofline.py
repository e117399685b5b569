"""The two floors of every kernel: bytes / bandwidth and FLOPs / peak compute.

Both ceilings are measured at the start of a run, so fractions are of what this machine delivers,
not of a datasheet: on a GPU a 1 GiB device-to-device copy and 8192^2 bf16 and fp32 (no TF32)
matmuls; on a CPU a 64 MiB copy and a 1024^2 fp32 matmul on torch's threads (the CPU presets are
fp32, so both matmul fields hold that rate).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Roofline:
    device_name: str
    copy_bytes_per_s: float     # read + write bytes per second of a large copy
    bf16_flops_per_s: float     # dense bf16 matmul FLOP/s
    fp32_flops_per_s: float     # dense fp32 (no TF32) matmul FLOP/s

    def as_dict(self) -> dict:
        return asdict(self)


def _rate(fn, work: float, device: torch.device) -> float:
    from dinov3_fast.bench.timing import median_seconds

    return work / median_seconds(fn, device, min_run_time=0.3)


def measure_roofline(device: torch.device) -> Roofline:
    """Measure copy bandwidth and matmul rates on `device` (a few seconds on a GPU, about one on a CPU)."""
    if device.type == "cuda":
        n_bytes = 1 << 30
        src = torch.empty(n_bytes // 4, device=device)
        dst = torch.empty_like(src)
        copy = _rate(lambda: dst.copy_(src), 2 * n_bytes, device)
        del src, dst
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        bf16 = _rate(lambda: a @ a, 2 * n**3, device)
        a32 = a.float()
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            fp32 = _rate(lambda: a32 @ a32, 2 * n**3, device)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        return Roofline(torch.cuda.get_device_name(device), copy, bf16, fp32)
    n = 1 << 24
    src = torch.empty(n)
    dst = torch.empty_like(src)
    copy = _rate(lambda: dst.copy_(src), 8 * n, device)
    m = 1024
    a = torch.randn(m, m)
    fp32 = _rate(lambda: a @ a, 2 * m**3, device)
    return Roofline("cpu", copy, fp32, fp32)
