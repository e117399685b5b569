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
            # (the extension's, which `make` always builds) forms only the upper triangle of y y^T
            flops=2 * n * n * D, impl_flops={"fused": n * n * D} if device == "cpu" else {},
            fp32_impls=("reference", "reference+compile"), bytes=n * D * elt,
            note=f"n={n} D={D} {str(dtype)[6:]} topk={topk}; reference forms the n x n dots "
                 f"({n * n * 4 / 2**20:.1f} MiB fp32), the fused op never does",
        ))
    return out
