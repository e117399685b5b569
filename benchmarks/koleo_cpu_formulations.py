"""KoLeo on the CPU: reference vs the cpu backend's C++ path vs its PyTorch formulation (the
fallback without dinov3_fast._C), timed in interleaved rounds so machine load hits all three alike.

    python benchmarks/koleo_cpu_formulations.py N D TOPK [ROUNDS]     e.g. 4096 384 1
"""
import statistics
import sys
import time

import torch

from dinov3_fast.bench.memory import peak_extra_bytes
from dinov3_fast.ops import koleo_loss
from dinov3_fast.ops.koleo import cpu as koleo_cpu
from dinov3_fast.ops.koleo import koleo_loss_ref


def main() -> None:
    n, D, topk = (int(a) for a in sys.argv[1:4])
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 12
    x = torch.randn(n, D, requires_grad=True)
    native = koleo_cpu.native

    def fused(with_native: bool):
        koleo_cpu.native = native if with_native else (lambda: None)
        return koleo_loss(x, topk=topk, backend="cpu")

    impls = {"reference": lambda: koleo_loss_ref(x, 1e-8, topk), "cpu backend (C++)": lambda: fused(True),
             "PyTorch formulation": lambda: fused(False)}
    times = {name: ([], []) for name in impls}
    for fn in impls.values():
        fn().backward()
    for _ in range(rounds):
        for name, fn in impls.items():
            x.grad = None
            t0 = time.perf_counter()
            loss = fn()
            t1 = time.perf_counter()
            loss.backward()
            times[name][0].append(t1 - t0)
            times[name][1].append(time.perf_counter() - t0)
    base = statistics.median(times["reference"][1])
    print(f"n={n} D={D} topk={topk} fp32, {torch.get_num_threads()} threads, {rounds} interleaved rounds (medians)")
    for name, fn in impls.items():
        fwd, both = times[name]
        mem = peak_extra_bytes(lambda: fn().backward(), x.device) / 2**20
        print(f"{name:22s} fwd {statistics.median(fwd) * 1e3:7.1f} ms  fwd+bwd {statistics.median(both) * 1e3:7.1f} ms"
              f"  speedup {base / statistics.median(both):5.2f}x  peak extra {mem:6.1f} MiB")
    koleo_cpu.native = native


if __name__ == "__main__":
    main()
