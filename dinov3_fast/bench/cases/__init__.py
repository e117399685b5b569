"""Registry of benchmark cases: one module per op, each exposing `cases() -> list[BenchCase]`."""
from __future__ import annotations

import importlib

from dinov3_fast.bench.case import BenchCase

# One line per op module; keep this list sorted.
CASE_MODULES = (
    "dinov3_fast.bench.cases.attention",
    "dinov3_fast.bench.cases.gram",
    "dinov3_fast.bench.cases.koleo",
    "dinov3_fast.bench.cases.linear_soft_ce",
    "dinov3_fast.bench.cases.model_block",
    "dinov3_fast.bench.cases.sinkhorn",
    "dinov3_fast.bench.cases.soft_ce",
)


def all_cases() -> list[BenchCase]:
    out: list[BenchCase] = []
    for name in CASE_MODULES:
        out.extend(importlib.import_module(name).cases())
    return out
