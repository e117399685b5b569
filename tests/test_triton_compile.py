"""Every Triton kernel compiles for the GPU (sm_90 and sm_80) at every configuration the ops launch
at the benchmark presets: the interpreter accepts code the GPU compiler rejects. Runs
tools/aot_compile.py in a subprocess, since it needs real (not interpreted) JIT kernels."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def aot_report(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "aot_compile.py"), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert out.exists(), proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc


def test_every_launch_compiles(aot_report):
    report, proc = aot_report
    errors = [f"{r['kernel']} {r['target']} {r['constexprs']}: {r['error']}" for r in report["results"] if "error" in r]
    assert not errors, "\n".join(errors)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {r["target"] for r in report["results"]} == {"sm_90", "sm_80"}


def test_every_kernel_is_exercised(aot_report):
    report, _ = aot_report
    assert report["never_launched"] == [], "kernels no benchmark preset launches (add a preset): " \
        f"{report['never_launched']}"


def test_half_precision_dots_use_wgmma_on_hopper(aot_report):
    report, _ = aot_report
    missing = [f"{r['kernel']} {r['constexprs']}" for r in report["results"]
               if r["target"] == "sm_90" and r.get("has_dot") and r.get("half_inputs") and not r.get("wgmma")]
    assert not missing, f"tensor-core dots that did not lower to wgmma: {missing}"


def test_every_launch_reports_its_resources(aot_report):
    """Registers, stack and shared memory come from cuobjdump and the compiled metadata: a launch
    whose figures could not be read would pass the spill and shared-memory checks unseen."""
    report, _ = aot_report
    unread = [f"{r['kernel']} {r['target']} {r['constexprs']}" for r in report["results"] if "error" not in r
              and any(r.get(k) is None for k in ("registers", "stack_bytes", "shared"))]
    assert not unread, unread


def test_no_register_spills_in_half_precision_launches_on_hopper(aot_report):
    """Every bf16/fp16 launch compiles for sm_90 without spilling (local-memory traffic in the hot
    loops). Only meaningful with the JIT's argument specialisation, which the tool applies."""
    report, _ = aot_report
    spills = [f"{r['kernel']} {r['constexprs']}: {r['stack_bytes']} B" for r in report["results"]
              if r["target"] == "sm_90" and r.get("half_inputs") and "error" not in r and r["stack_bytes"] > 0]
    assert not spills, spills


# Shared memory a block may use (the opt-in maximum): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
MAX_SHARED = {"sm_80": 166912, "sm_90": 232448}  # a target missing here fails the test: add its limit


def test_every_launch_fits_its_targets_shared_memory(aot_report):
    """A launch whose tiles need more shared memory than the card has compiles, then fails at launch
    with OutOfResources: the compile check alone does not catch it."""
    report, _ = aot_report
    over = [f"{r['kernel']} {r['target']} {r['constexprs']}: {r['shared']} B" for r in report["results"]
            if "error" not in r and r["shared"] > MAX_SHARED[r["target"]]]
    assert not over, over


def test_soft_ce_launches_do_not_fuse_multiply_adds(aot_report):
    """The soft-CE kernels' exponents must round alike in all three kernels (ops/soft_ce/triton.py:
    fused, they put the backward's softmax ~1e-4 off the forward's logsumexp)."""
    report, _ = aot_report
    launches = [r for r in report["results"] if r["kernel"].startswith("_soft_ce_")]
    assert {r["kernel"] for r in launches} == {"_soft_ce_fwd_kernel", "_soft_ce_combine_kernel", "_soft_ce_bwd_kernel"}
    assert all(r.get("enable_fp_fusion") is False for r in launches)


def test_tensor_core_instructions_are_read_from_the_sass(aot_report):
    """The SASS census behind docs/kernels.md's shapes: a launch whose PTX has wgmma must show
    HGMMA instructions on sm_90, one with a half-precision dot HMMA on sm_80, and every launch a
    global store (each kernel writes its results with STG). A census that read nothing (a changed
    cuobjdump format) would leave the table's columns silently empty."""
    report, _ = aot_report
    no_store = [f"{r['kernel']} {r['target']}" for r in report["results"]
                if "error" not in r and not any(k.startswith("STG.") for k in r["global"])]
    assert not no_store, no_store
    unread = [f"{r['kernel']} {r['target']} {r['constexprs']}" for r in report["results"] if "error" not in r and (
        (r["target"] == "sm_90" and r["wgmma"] and not any(k.startswith("HGMMA.") for k in r["mma"]))
        or (r["target"] == "sm_80" and r["has_dot"] and r["half_inputs"]
            and not any(k.startswith("HMMA.") for k in r["mma"])))]
    assert not unread, unread
