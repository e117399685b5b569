"""Backend selection, the input checks and the process-group rule shared by every op.

Backends, in the order an op prefers them by default:
  cuda       our CUDA C++ kernels (dinov3_fast._C built with nvcc), CUDA tensors only
  triton     Triton kernels: CUDA tensors, or CPU tensors when TRITON_INTERPRET=1
  cpu        C++ (OpenMP) kernels or the best PyTorch formulation, CPU tensors
  reference  the plain-PyTorch DINOv3 formula; always available

Each op declares which backends it implements and, per device, the order to try them (the
fastest measured first). `backend=` on the op forces one and fails loudly if it cannot run. The
environment variable DINOV3_FAST_BACKEND forces one for every op that implements it; ops that do
not implement it keep their default, so one variable can steer a whole training run.
"""
from __future__ import annotations

import contextlib
import functools
import numbers
import os
from collections.abc import Iterator, Sequence

import torch

from dinov3_fast._ext import native, native_error, native_has_cuda

BACKENDS = ("cuda", "triton", "cpu", "reference")
ENV_VAR = "DINOV3_FAST_BACKEND"
_simulating_cuda = False


@contextlib.contextmanager
def simulate_cuda_dispatch() -> Iterator[None]:
    """Dispatch CPU (and meta) tensors as if they lived on a GPU: backends, and each op's other
    device-dependent choices (`dispatch_device_type`).

    For the ahead-of-time compile check (tools/aot_compile.py), which records every Triton launch
    the ops make at real shapes, without running them, and compiles each for sm_90/sm_80; and for
    the memory planner (train/planner.py), whose meta-device forward keeps what a GPU run keeps.
    """
    global _simulating_cuda
    _simulating_cuda = True
    try:
        yield
    finally:
        _simulating_cuda = False


def dispatch_device_type(device: torch.device) -> str:
    """The device type dispatch decides for: "cuda" while `simulate_cuda_dispatch` is active."""
    return "cuda" if _simulating_cuda else device.type


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _import_triton() -> str:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError as exc:
        return f"triton not importable ({exc})"
    return ""


@torch.compiler.assume_constant_result
def _triton_import_error() -> str:
    """Why triton cannot be imported ('' when it can). A constant to torch.compile, which would
    otherwise trace past the cache of `_import_triton` (and warn about it)."""
    return _import_triton()


def backend_status(name: str, device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether backend `name` can run on `device` (default: the best device present), and why not."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    dev = torch.device(device) if device is not None else _default_device()
    if name == "reference":
        return True, ""
    if name == "cpu":
        return (True, "") if dev.type == "cpu" else (False, f"cpu backend needs CPU tensors, got {dev.type}")
    if name == "triton":
        if err := _triton_import_error():
            return False, err
        if dev.type == "cuda" or _simulating_cuda:
            return True, ""
        if dev.type == "cpu" and triton_interpreting():
            return True, ""
        return False, f"triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors (got {dev.type})"
    # cuda
    if dev.type != "cuda":
        return False, f"cuda backend needs CUDA tensors, got {dev.type}"
    if native() is None:
        return False, native_error()
    if not native_has_cuda():
        return False, "dinov3_fast._C was built without nvcc; rebuild with nvcc on PATH"
    return True, ""


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _accepted(implemented: Sequence[str]) -> tuple[str, ...]:
    """What `backend=` may name for an op implementing `implemented` on a device: those, and
    "reference" (always available)."""
    return tuple(implemented) if "reference" in implemented else (*implemented, "reference")


def forced_by_env(device: torch.device, preference: dict[str, Sequence[str]]) -> str | None:
    """The backend DINOV3_FAST_BACKEND forces on an op with `preference` for `device`, or None:
    unset, or naming a backend the op lacks there (it keeps its default)."""
    forced = os.environ.get(ENV_VAR)
    if not forced:
        return None
    if forced not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {forced!r}")
    implemented = preference.get(dispatch_device_type(device), ("reference",))
    return forced if forced in _accepted(implemented) else None


def select_backend(
    op: str,
    device: torch.device,
    requested: str | None,
    preference: dict[str, Sequence[str]],
) -> str:
    """Choose the backend for one call of `op` on tensors living on `device`.

    Args:
        op: op name, for error messages.
        device: where the inputs live.
        requested: the op's `backend=` argument (strict), or None.
        preference: device type ("cuda" / "cpu") -> backends this op implements there, fastest first.
            "reference" is always implemented and always last.
    """
    implemented = preference.get(dispatch_device_type(device), ("reference",))
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {requested!r}")
        accepted = _accepted(implemented)
        if requested not in accepted:
            raise ValueError(
                f"{op}: backend {requested!r} is not implemented for {device.type} tensors; "
                f"choose from {accepted}")
        ok, why = backend_status(requested, device)
        if not ok:
            raise RuntimeError(f"{op}: backend {requested!r} unavailable: {why}")
        return requested
    forced = forced_by_env(device, preference)
    if forced is not None:
        ok, why = backend_status(forced, device)
        if not ok:
            raise RuntimeError(f"{op}: {ENV_VAR}={forced} unavailable: {why}")
        return forced
    for name in implemented:
        if backend_status(name, device)[0]:
            return name
    return "reference"


# ----------------------------------------------------------------------------- input checks
# Each raises before any kernel runs, naming the argument and what was expected versus given.

# The dtypes every backend reads (float64 on some only: each op says which); float8 is floating
# point too, but no backend computes with it.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {t.dtype}")


def check_rank(name: str, t: torch.Tensor, ranks: int | Sequence[int], layout: str = "") -> None:
    allowed = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if t.dim() not in allowed:
        want = " or ".join(f"{r}-D" for r in allowed)
        hint = f" {layout}" if layout else ""
        raise ValueError(f"{name} must be {want}{hint}, got shape {tuple(t.shape)}")


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int], layout: str = "") -> None:
    """t.shape == shape; `layout` names the dims, e.g. "(B, N)"."""
    if tuple(t.shape) != tuple(shape):
        hint = f"{layout} = " if layout else ""
        raise ValueError(f"{name} must have shape {hint}{tuple(shape)}, got {tuple(t.shape)}")


def check_same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")


def check_nonempty(name: str, t: torch.Tensor) -> None:
    if t.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")


def check_positive(name: str, value: float) -> None:
    """`value` is a positive Python number. A tensor is refused: the ops take temperatures and eps
    as Python floats, so a tensor's value would be read on the host in every call (a GPU sync)
    and cannot be traced by torch.compile (DINOv3 passes Python floats)."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python float, got a tensor of shape {tuple(value.shape)}; "
                        f"pass float({name}) instead")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_no_double_backward(op: str) -> None:
    """Call first in the backward of a custom op: it runs with grad mode on only for
    create_graph=True, and no fused backward is differentiable (their backward custom ops have no
    autograd formula), so gradients of gradients are refused here, naming the way out, rather
    than by torch's generic error at the second backward."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op} has no double backward (create_graph=True): its fused backward is not "
                           "differentiable; use backend='reference' for that")


def single_rank_as_none(group):
    """`group`, or None where it spans one rank (a trainer's 1-rank FSDP2 group): one rank's
    collectives are identities, and the ops' single-process paths (Sinkhorn's one-launch cuda
    kernel, KoLeo without an all-gather) are the faster choice. `group` must be usable: None, or a
    group of an initialised torch.distributed."""
    if group is not None:
        import torch.distributed as dist
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
        if dist.get_world_size(group) == 1:
            return None
    return group
