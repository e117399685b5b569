"""Golden loss trace: an 8-step fixed-seed run of the debug preset (fp32, CPU, fused ops as
dispatched by default, Gram loss on) against the per-step loss terms committed in
tests/golden/debug_cpu_fp32.json. A failure means the numerics changed. If the change is intended
(a recipe fix, a new default), regenerate the trace and commit it with the change:

    python -m dinov3_fast.train.golden --update

The tolerance (rtol 1e-5, atol 1e-6) and why it holds across x86 machines: dinov3_fast/train/golden.py.
"""
import json

import pytest
import torch

from dinov3_fast.train import golden


def _release(version: str) -> str:
    """"2.13" from "2.13.0+cpu"."""
    return ".".join(version.split("+")[0].split(".")[:2])


def test_golden_loss_trace_matches():
    want = json.loads(golden.GOLDEN_PATH.read_text())
    if _release(torch.__version__) != _release(want["torch"]):
        # Measured with torch 2.11 against the 2.13 trace: 5e-4 off at step 1 and 1e-2 by step 7;
        # at least nn.init.trunc_normal_ (the ViT's weight init) draws other values from the same
        # seed in 2.11. Another torch release gives another valid trace; CI pins the recorded one.
        pytest.skip(f"the golden trace was recorded with torch {want['torch']}, this is {torch.__version__}: "
                    "torch releases differ in their random initialisers (nn.init.trunc_normal_ at least, between "
                    "2.11 and 2.13), so the traces are not comparable")
    threads = torch.get_num_threads()
    got = golden.run_trace()  # on one intra-op thread
    assert torch.get_num_threads() == threads
    assert got["steps"] == want["steps"] == golden.STEPS
    bad = golden.compare(got, want)
    assert not bad, ("loss trace differs from tests/golden/debug_cpu_fp32.json (torch "
                     f"{got['torch']} vs {want['torch']}, backends {got['backends']} vs {want['backends']}); "
                     "if intended, run `python -m dinov3_fast.train.golden --update`:\n" + "\n".join(bad[:20]))


def test_golden_compare_catches_a_small_change():
    want = json.loads(golden.GOLDEN_PATH.read_text())
    got = json.loads(json.dumps(want))
    assert golden.compare(got, want) == []
    got["losses"]["ibot_loss"][5] *= 1 + 5e-5
    (line,) = golden.compare(got, want)
    assert line.startswith("ibot_loss step 6:")
    got["losses"]["koleo_loss"][0] = float("nan")
    assert len(golden.compare(got, want)) == 2
    del got["losses"]["gram_loss"]
    assert any("gram_loss" in line for line in golden.compare(got, want))
