"""KoLeo presets: DINOv3's real uses of the regulariser.

  cls_*    the CLS vectors of one global crop per GPU (n = 16 or 32) at D = 1024 (ViT-L) and
           4096 (ViT-7B): the single-process KoLeoLoss.
  group_*  searches over a gathered loss group of n = 4096 or 16,384 samples at D = 1024 (what
           KoLeoLossDistributed does on every rank; the op is timed without the all_gather).
  cpu_*    small enough for the 2-core CI machine; cpu_n4096_d384 is the CPU goal case.
"""
from __future__ import annotations

import functools

import torch

from dinov3_fast.bench.case import BenchCase
from dinov3_fast.ops.koleo import koleo_loss, koleo_loss_ref

# (preset, device, n, D, dtype, topk)
PRESETS = (
    ("cpu_n4096_d384", "cpu", 4096, 384, torch.float32, 1),
    ("cpu_n1024_d384_top4", "cpu", 1024, 384, torch.float32, 4),
    ("cpu_cls_n32_d1024", "cpu", 32, 1024, torch.float32, 1),
    ("cls_n16_d1024", "cuda", 16, 1024, torch.bfloat16, 1),
    ("cls_n32_d1024", "cuda", 32, 1024, torch.bfloat16, 1),
    ("cls_n16_d4096", "cuda", 16, 4096, torch.bfloat16, 1),
    ("cls_n32_d4096", "cuda", 32, 4096, torch.bfloat16, 1),
    ("group_n4096_d1024", "cuda", 4096, 1024, torch.bfloat16, 1),
    ("group_n16384_d1024", "cuda", 16384, 1024, torch.bfloat16, 1),
    ("group_n16384_d1024_fp32", "cuda", 16384, 1024, torch.float32, 1),
)


def _inputs(n, D, dtype, device):
    return (torch.randn(n, D, device=device, dtype=dtype, requires_grad=True),), {}


# csrc/koleo_cpu.cpp's kBlock: the query / candidate tile edge of the extension's search
CPU_TILE = 64


def _cpu_search_flops(n: int, D: int) -> int:
    """FLOPs of the extension's search when every row queries every row (`search_all`): the tiles
    on and above the block diagonal, each formed whole (a diagonal tile's lower half included):
    2 D sum_{I <= J} n_I n_J = D (n^2 + sum_I n_I^2). Half of 2 n^2 D only as the tiles get
    small against n: 1.02x that half at n = 4096, 2x (one tile, all of y y^T) at n <= 64."""
    sizes = [min(CPU_TILE, n - i) for i in range(0, n, CPU_TILE)]
    return D * (n * n + sum(s * s for s in sizes))


@functools.lru_cache(maxsize=None)
def _compiled_reference(topk: int):
    return torch.compile(functools.partial(koleo_loss_ref, topk=topk))


def cases() -> list[BenchCase]:
    out = []
    for preset, device, n, D, dtype, topk in PRESETS:
        elt = torch.finfo(dtype).bits // 8
        out.append(BenchCase(
            op="koleo_loss", preset=preset, device=device,
            make_inputs=functools.partial(_inputs, n, D, dtype),
            impls={
                "reference": functools.partial(koleo_loss_ref, topk=topk),
                "reference+compile": _compiled_reference(topk),
                "fused": functools.partial(koleo_loss, topk=topk),
            },
            # the references compute in fp32 (DINOv3's upcast); on the CPU the fused op's search
            # (the extension's, which `make` always builds) forms only the tiles on and above the
            # diagonal of y y^T
            flops=2 * n * n * D, impl_flops={"fused": _cpu_search_flops(n, D)} if device == "cpu" else {},
            fp32_impls=("reference", "reference+compile"), bytes=n * D * elt,
            note=f"n={n} D={D} {str(dtype)[6:]} topk={topk}; reference forms the n x n dots "
                 f"({n * n * 4 / 2**20:.1f} MiB fp32), the fused op never does",
        ))
    return out
