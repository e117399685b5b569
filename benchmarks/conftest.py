"""pytest-benchmark suites over the same presets as `dinov3-fast bench` (not in the default test run:
`pytest benchmarks/`). Only presets meant for the present device are collected."""
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def presets_for(op: str):
    """(id, case) for every bench case of `op` that targets this machine's device."""
    from dinov3_fast.bench.cases import all_cases

    return [c for c in all_cases() if c.op == op and c.device == DEVICE.type]


def bench_step(case, impl_name: str):
    """A zero-argument callable running one forward+backward of `impl_name` on fresh inputs."""
    from dinov3_fast.bench.runner import fwd_bwd_step

    args, kwargs = case.make_inputs(DEVICE)
    step = fwd_bwd_step(case.impls[impl_name], args, kwargs)
    if DEVICE.type == "cuda":
        def synced():
            step()
            torch.cuda.synchronize()
        return synced
    return step
