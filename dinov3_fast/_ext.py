"""Optional native extension `dinov3_fast._C`, loaded once.

`native()` returns the module or None; `native_error()` says why it is missing. Nothing else in the
package imports `_C` directly, so every op keeps working (with another backend) without it.
"""
from __future__ import annotations

import functools
from types import ModuleType

import torch


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ModuleType | None, str]:
    try:
        from dinov3_fast import _C
    except ImportError as exc:  # not built, or built for another interpreter
        return None, f"extension dinov3_fast._C not importable ({exc}); run `pip install -e .`"
    return _C, ""


def native() -> ModuleType | None:
    """The `_C` module, or None when it was not built."""
    return _load()[0]


def native_error() -> str:
    """Why `native()` is None ('' when it is available)."""
    return _load()[1]


@torch.compiler.assume_constant_result
def native_has_cuda() -> bool:
    """True when `_C` was compiled with the CUDA kernels of kernels/. A constant to torch.compile:
    dispatch asks it inside traced code, and dynamo cannot trace a call into the extension."""
    mod = native()
    return bool(mod is not None and mod.build_info()["cuda"])
