"""What a run ran on: library versions, card, driver and git revision, recorded beside its figures.

`python -m dinov3_fast.bench.environment` prints it as JSON (benchmarks/*_check.sh write it to
$OUT/env.json). The device machine gets a copy of the tree, maybe without .git or git, so a
GIT_REV environment variable set by the caller takes precedence.
"""
from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import torch


def _stdout(cmd: list[str]) -> str | None:
    """A command's stripped stdout, or None where it is missing or fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def run_environment() -> dict[str, Any]:
    """torch / CUDA / triton versions, the GPU (name, memory, driver) if any, and the git revision
    with whether tracked files differ from it (None where unknown)."""
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version(),
                            "gpu": None, "gpu_mem_gib": None, "driver": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_mem_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        info["driver"] = _stdout(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    info.update(git_revision())
    return info


def git_revision() -> dict[str, Any]:
    """{"git": the revision (GIT_REV if set, else HEAD), "git_dirty": whether tracked files differ
    from it}; None where unknown."""
    rev = os.environ.get("GIT_REV") or _stdout(["git", "rev-parse", "HEAD"])
    dirty = _stdout(["git", "status", "--porcelain", "--untracked-files=no"]) if rev else None
    return {"git": rev, "git_dirty": None if dirty is None else bool(dirty)}


if __name__ == "__main__":
    print(json.dumps(run_environment(), indent=1))
