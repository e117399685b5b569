"""Fused RoPE attention: every backend against the float64 oracle (DINOv3's path), forward and
backward through the rotation, the list (variable-length) form, the SelfAttention drop-in."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import dinov3_fast
from dinov3_fast.ops import rope_attention, rope_attention_list
from dinov3_fast.ops.attention import _rope_attention_fwd, rope_attention_ref
from oracle import rel_err

HAS_CUDA = torch.cuda.is_available()
# Triton runs on CPU tensors under the interpreter (tests/conftest.py); on a GPU machine the
# gpu-marked tests below cover it.
BACKENDS = ["cpu", pytest.param("triton", marks=pytest.mark.skipif(HAS_CUDA, reason="CPU-tensor triton needs the interpreter"))]


def dinov3_rope(h: int, w: int, head_dim: int, rescale: float | None = None, base: float = 100.0,
                dtype=torch.float32, device="cpu"):
    """DINOv3's RopePositionEmbedding.forward (separate normalisation), optionally with a coordinate
    rescale factor (as drawn at training time, log-uniform in [0.5, 2])."""
    periods = base ** (2 * torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 2))
    coords_h = torch.arange(0.5, h, dtype=torch.float64) / h
    coords_w = torch.arange(0.5, w, dtype=torch.float64) / w
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0
    if rescale is not None:
        coords = coords * rescale
    angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1, 2).tile(2)
    return torch.sin(angles).to(dtype).to(device), torch.cos(angles).to(dtype).to(device)


def random_rescale() -> float:
    return math.exp(torch.empty(1).uniform_(-math.log(2), math.log(2)).item())


def grid_for(num_patches: int) -> tuple[int, int]:
    h = int(math.isqrt(num_patches))
    while num_patches % h:
        h -= 1
    return h, num_patches // h


def dinov3_compute_attention(qkv, rope, num_heads):
    """DINOv3's SelfAttention.compute_attention + apply_rope, transcribed statement by statement."""
    B, N, _ = qkv.shape
    C = qkv.shape[-1] // 3
    qkv = qkv.reshape(B, N, 3, num_heads, C // num_heads)
    q, k, v = torch.unbind(qkv, 2)
    q, k, v = [t.transpose(1, 2) for t in [q, k, v]]
    if rope is not None:
        sin, cos = rope
        q_dtype, k_dtype = q.dtype, k.dtype
        q, k = q.to(dtype=sin.dtype), k.to(dtype=sin.dtype)
        prefix = q.shape[-2] - sin.shape[-2]

        def rot(x):
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat([-x2, x1], dim=-1)
        q = torch.cat((q[:, :, :prefix, :], q[:, :, prefix:, :] * cos + rot(q[:, :, prefix:, :]) * sin), dim=-2)
        k = torch.cat((k[:, :, :prefix, :], k[:, :, prefix:, :] * cos + rot(k[:, :, prefix:, :]) * sin), dim=-2)
        q, k = q.to(dtype=q_dtype), k.to(dtype=k_dtype)
    x = F.scaled_dot_product_attention(q, k, v)
    return x.transpose(1, 2).reshape([B, N, C])


def check_against_oracle(qkv, rope, num_heads, backend, tol):
    """Output and the q, k, v parts of the packed gradient against float64 DINOv3. tol: a number, or
    "half" for bf16/fp16 inputs: max(1e-2, 2x the error of PyTorch's own computation in qkv's dtype
    (rope_attention_ref, same upstream gradient rounded to that dtype)), per output and gradient,
    the 2x-PyTorch rule of the contract (docs/architecture.md, Tests)."""
    q64 = qkv.detach().double().requires_grad_()
    rope64 = None if rope is None else tuple(t.double() for t in rope)
    ref = rope_attention_ref(q64, rope64, num_heads)
    grad = torch.randn_like(ref)
    (ref_g,) = torch.autograd.grad(ref, q64, grad)
    B, N = qkv.shape[:2]

    def errors(out, g):  # out, dq, dk, dv
        parts = [(g.view(B, N, 3, -1)[:, :, i], ref_g.view(B, N, 3, -1)[:, :, i]) for i in range(3)]
        return [rel_err(out, ref)] + [rel_err(a, b) for a, b in parts]

    qkv = qkv.detach().requires_grad_()
    out = rope_attention(qkv, rope, num_heads=num_heads, backend=backend)
    (g,) = torch.autograd.grad(out, qkv, grad.to(out.dtype))
    assert out.dtype == qkv.dtype and out.shape == ref.shape and g.shape == qkv.shape
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    if tol == "half":
        assert qkv.dtype in (torch.bfloat16, torch.float16)
        out_t = rope_attention_ref(qkv, rope, num_heads)
        (g_t,) = torch.autograd.grad(out_t, qkv, grad.to(qkv.dtype))
        tols = [max(1e-2, 2 * e) for e in errors(out_t, g_t)]
    else:
        tols = [tol] * 4
    for name, err, t in zip(("out", "dq", "dk", "dv"), errors(out, g), tols):
        assert err < t, f"{name}: {err} (bound {t})"


@pytest.mark.parametrize("prefix", [5, 0])
def test_reference_is_dinov3(prefix):
    qkv = torch.randn(2, prefix + 12, 3 * 2 * 8, dtype=torch.float64)
    rope = dinov3_rope(3, 4, 8, rescale=random_rescale(), dtype=torch.float64)
    torch.testing.assert_close(rope_attention_ref(qkv, rope, 2), dinov3_compute_attention(qkv, rope, 2),
                               rtol=1e-12, atol=1e-12)


# (N, prefix): prefix + one patch, a local crop, a global crop, and the same without a prefix
SHAPES = [(6, 5), (54, 5), (261, 5), (54, 0), (261, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("n,prefix", SHAPES)
def test_matches_oracle_fp32(backend, head_dim, n, prefix):
    heads, batch = (1, 1) if n > 100 else (2, 2)
    qkv = torch.randn(batch, n, 3 * heads * head_dim)
    rope = dinov3_rope(*grid_for(n - prefix), head_dim, rescale=random_rescale())
    check_against_oracle(qkv, rope, heads, backend, 1e-5)


@pytest.mark.skipif(HAS_CUDA, reason="CPU-tensor triton needs the interpreter")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("n,prefix", [(6, 5), (54, 5), (261, 5)])
def test_matches_oracle_fp16_triton(head_dim, n, prefix):
    heads = 1 if n > 100 else 2
    qkv = torch.randn(1, n, 3 * heads * head_dim).half()
    rope = dinov3_rope(*grid_for(n - prefix), head_dim, rescale=random_rescale())
    check_against_oracle(qkv, rope, heads, "triton", 1e-2)


@pytest.mark.skipif(HAS_CUDA, reason="CPU-tensor triton needs the interpreter")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("n,prefix", [(6, 5), (54, 5), (261, 5), (19, None)])
def test_matches_oracle_bf16_triton(head_dim, n, prefix, interpreter_bf16_dots):
    """bf16 through the Triton kernels on CPU, within 2x PyTorch's own bf16 error (at least 1e-2).
    Measured: 0.8-1.0x PyTorch's error on out, dq, dk and dv. (Before the fixture rounded fp32 ->
    bf16 casts to nearest, the interpreter's truncation made it 2-3.4x, dq 1.5e-2 at 261 tokens.)"""
    heads, batch = (1, 1) if n > 100 else (2, 2)
    qkv = torch.randn(batch, n, 3 * heads * head_dim).bfloat16()
    rope = None if prefix is None else dinov3_rope(*grid_for(n - prefix), head_dim, rescale=random_rescale())
    check_against_oracle(qkv, rope, heads, "triton", "half")


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_rope_and_bf16_cpu(backend):
    qkv = torch.randn(2, 19, 3 * 2 * 64)
    check_against_oracle(qkv, None, 2, backend, 1e-5)
    if backend == "cpu":  # triton bf16 needs the interpreter_bf16_dots fixture: test_matches_oracle_bf16_triton
        check_against_oracle(qkv.bfloat16(), dinov3_rope(2, 7, 64), 2, "cpu", 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_qkv(backend):
    wide = torch.randn(2, 54, 3 * 2 * 64 + 17)
    qkv = wide[..., 5:5 + 3 * 2 * 64]  # token stride != 3C
    check_against_oracle(qkv, dinov3_rope(7, 7, 64), 2, backend, 1e-5)
    strided = torch.randn(54, 2, 3 * 2 * 64).transpose(0, 1)  # batch-minor
    check_against_oracle(strided, dinov3_rope(7, 7, 64), 2, backend, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_list_form_matches_separate_calls(backend):
    heads, head_dim = 2, 64
    crops = [(2, 54, 49), (3, 6, 1), (1, 21, None)]  # (B, N, HW or no rope)
    qkv_list = [torch.randn(b, n, 3 * heads * head_dim, requires_grad=True) for b, n, _ in crops]
    rope_list = [None if hw is None else dinov3_rope(*grid_for(hw), head_dim, rescale=random_rescale())
                 for _, _, hw in crops]
    outs = rope_attention_list(qkv_list, rope_list, num_heads=heads, backend=backend)
    refs = [rope_attention(q, r, num_heads=heads, backend=backend) for q, r in zip(qkv_list, rope_list)]
    grads = [torch.randn_like(o) for o in outs]
    g_list = torch.autograd.grad(outs, qkv_list, grads)
    g_sep = torch.autograd.grad(refs, qkv_list, grads)
    for o, r, a, b in zip(outs, refs, g_list, g_sep):
        assert o.shape == r.shape
        assert rel_err(o, r) < 1e-6 and rel_err(a, b) < 1e-6



# Schedules beyond the defaults (rope_attention_fwd_triton's config and prerotate;
# rope_attention_bwd_triton's config, dq_config and prerotate), which benchmarks/attention_sweep.py
# times on a GPU: tiles that do not divide N = 37.
def _tiles(block, inner, warps=4, stages=1):
    return dict(BLOCK=block, BLOCK_INNER=inner, num_warps=warps, num_stages=stages)


def _fwd_tiles(block_m, block_n, warps=4, stages=1):
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


FWD_SCHEDULES = {
    "config": dict(config=_fwd_tiles(16, 32)),
    "prerotate": dict(prerotate=True),
    "prerotate_config": dict(config=_fwd_tiles(32, 16), prerotate=True),
}
BWD_SCHEDULES = {
    "config": dict(config=_tiles(32, 16)),
    "prerotate": dict(prerotate=True),
    "split": dict(config=_tiles(16, 32), dq_config=_tiles(32, 16)),
    "prerotate_split": dict(config=_tiles(32, 16), dq_config=_tiles(16, 64), prerotate=True),
}


def _run_with_schedule(monkeypatch, launcher: str, schedule: dict) -> list:
    """Make the triton backend's `launcher` (a name in ops/attention/triton.py) run with `schedule`;
    returns the list in which the calls it serves are counted."""
    from dinov3_fast.ops.attention import triton as attn_triton

    calls, original = [], getattr(attn_triton, launcher)

    def scheduled(*args):
        calls.append(args[0].shape)
        return original(*args, **schedule)

    monkeypatch.setattr(attn_triton, launcher, scheduled)
    return calls


@pytest.fixture
def triton_fwd_schedule(monkeypatch, request):
    """The triton backend's forward run with schedule `request.param` (a FWD_SCHEDULES key)."""
    return _run_with_schedule(monkeypatch, "rope_attention_fwd_triton", FWD_SCHEDULES[request.param])


@pytest.fixture
def triton_bwd_schedule(monkeypatch, request):
    """The triton backend's backward run with schedule `request.param` (a BWD_SCHEDULES key)."""
    return _run_with_schedule(monkeypatch, "rope_attention_bwd_triton", BWD_SCHEDULES[request.param])


def _check_schedule_against_oracle():
    """Values and gradients through the triton backend against float64 DINOv3 at the fp32 bound of
    the default's test: one crop size (head dims 32 and 64) and a crop list (variable length, one
    crop without rope). Three calls reach each launcher."""
    for head_dim in (32, 64):
        qkv = torch.randn(2, 37, 3 * 2 * head_dim)
        check_against_oracle(qkv, dinov3_rope(4, 8, head_dim, rescale=random_rescale()), 2, "triton", 1e-5)
    crops = [(2, 37, 32), (3, 6, 1), (1, 21, None)]  # (B, N, HW or no rope)
    qkv_list = [torch.randn(b, n, 3 * 2 * 32, requires_grad=True) for b, n, _ in crops]
    rope_list = [None if hw is None else dinov3_rope(*grid_for(hw), 32, rescale=random_rescale()) for *_, hw in crops]
    outs = rope_attention_list(qkv_list, rope_list, num_heads=2, backend="triton")
    grads = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, qkv_list, grads)
    for o, g, q, r, up in zip(outs, got, qkv_list, rope_list, grads):
        q64 = q.detach().double().requires_grad_()
        want = rope_attention_ref(q64, None if r is None else tuple(t.double() for t in r), 2)
        (want_g,) = torch.autograd.grad(want, q64, up.double())
        assert rel_err(o, want) < 1e-5 and rel_err(g, want_g) < 1e-5


@pytest.mark.skipif(HAS_CUDA, reason="CPU-tensor triton needs the interpreter")
@pytest.mark.parametrize("triton_fwd_schedule", list(FWD_SCHEDULES), indirect=True)
def test_fwd_schedules_match_oracle(triton_fwd_schedule, interpreter_bf16_dots):
    """Each forward schedule (its out and its lse, through the default backward) against float64
    DINOv3, fp32 as the default's test and bf16 within 2x PyTorch's own error."""
    _check_schedule_against_oracle()
    check_against_oracle(torch.randn(1, 37, 3 * 2 * 64).bfloat16(), dinov3_rope(4, 8, 64), 2, "triton", "half")
    assert len(triton_fwd_schedule) == 4


@pytest.mark.skipif(HAS_CUDA, reason="CPU-tensor triton needs the interpreter")
@pytest.mark.parametrize("triton_bwd_schedule", list(BWD_SCHEDULES), indirect=True)
def test_bwd_schedules_match_oracle(triton_bwd_schedule):
    """Each backward schedule's gradients against float64 DINOv3 (see _check_schedule_against_oracle)."""
    _check_schedule_against_oracle()
    assert len(triton_bwd_schedule) == 3


@pytest.mark.skipif(HAS_CUDA, reason="CPU-tensor triton needs the interpreter")
def test_prerotated_bwd_is_bitwise_the_default_bf16(interpreter_bf16_dots):
    """The pre-rotated copies are rounded to bf16 exactly as the default kernel rounds q and k
    after rotating them, so on the same tiles the gradients are the same bits."""
    from dinov3_fast.ops.attention import triton as attn_triton

    heads, head_dim, n = 2, 64, 37
    qkv = torch.randn(2 * n, 3 * heads * head_dim).bfloat16()
    sin, cos = dinov3_rope(4, 8, head_dim, rescale=random_rescale())
    out, lse = attn_triton.rope_attention_fwd_triton(qkv, sin, cos, None, heads, n)
    dout = torch.randn_like(out)
    args = (dout, qkv, out, lse, sin, cos, None, heads, n)
    assert torch.equal(attn_triton.rope_attention_bwd_triton(*args),
                       attn_triton.rope_attention_bwd_triton(*args, prerotate=True))


@pytest.fixture
def sweep(monkeypatch):
    """benchmarks/attention_sweep.py as a module (it is a script, not part of the package)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_sweep.py"
    spec = importlib.util.spec_from_file_location("attention_sweep", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_sweep_route_decision(sweep):
    """The rule between our schedules and the SDPA route: the fastest forward plus the fastest
    backward schedule within TOL (a faster wrong one, an SDPA bar or a failed row never counts)
    against the route's two passes (a wrong route neither); no verdict where a pass is missing on
    either side, and `partial` where some of the shape's rows were skipped for time."""
    def row(shape, candidate, ms=None, ok=True):
        return {"shape": shape, "N": 261 if shape == "a" else 54, "candidate": candidate,
                **({"ms": ms, "ok": ok} if ms is not None else {"error": "RuntimeError: x"})}

    rows = [row("a", "fwd:default", 1.0), row("a", "fwd:fast", 0.7), row("a", "fwd:wrong", 0.1, ok=False),
            row("a", "fwd:sdpa:flash", 0.05, ok=True), row("a", "fwd:route", 0.6),
            row("a", "bwd:default", 2.0), row("a", "bwd:broken"), row("a", "bwd:route", 1.2),
            row("b", "fwd:default", 1.0), row("b", "bwd:default", 1.0), row("b", "fwd:route", 0.1),
            row("b", "bwd:route", 0.1, ok=False)]
    decision = sweep.route_decision(rows, skipped=["b bwd:sdpa:flash"])
    assert decision["a"] == {"N": 261, "faster": "route", "partial": False, "fused_fwd": "fast",
                             "fused_bwd": "default", "fused_ms": 2.7, "route_ms": 1.8, "route_over_fused": 0.667}
    assert decision["b"] == {"N": 54, "faster": None, "partial": True}  # its route's backward is wrong
    rows[4]["ms"], rows[7]["ms"] = 0.8, 2.2  # the route at 3.0 ms against the schedules' 2.7
    assert sweep.route_decision(rows, skipped=[])["a"]["faster"] == "fused"


@pytest.mark.skipif(HAS_CUDA, reason="the dry run needs the interpreter (TRITON_INTERPRET set before triton loads)")
def test_sweep_dry_run(sweep, tmp_path, capsys):
    """benchmarks/attention_sweep.py: without a GPU one line and exit 0; --dry-run times every
    forward and backward candidate on a tiny shape under the interpreter, each within TOL of its
    pass's default, with SDPA's flash kernel as the bar (the CPU has no cuDNN: an error row) and
    the SDPA route's two passes, and decides between the fastest schedules and the route."""
    assert sweep.main([]) == 0
    assert capsys.readouterr().out.count("\n") == 1
    out = tmp_path / "sweep.json"
    assert sweep.main(["--dry-run", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["candidate"]: r for r in report["rows"]}
    first, rest = [], []
    for direction in ("fwd", "bwd"):  # both defaults and routes first: the decision needs them
        default, *others = [c.label for c in sweep.candidates_for(32) if c.direction == direction]
        first += [default, f"{direction}:route"]
        rest += [*others, f"{direction}:sdpa:cudnn", f"{direction}:sdpa:flash"]
    expected = first + rest
    assert list(rows) == expected and first == ["fwd:default", "fwd:route", "bwd:default", "bwd:route"]
    assert "error" in rows.pop("fwd:sdpa:cudnn") and "error" in rows.pop("bwd:sdpa:cudnn") and not report["skipped"]
    assert all(r["ok"] and r["ms"] > 0 and r["wall_ms"] > 0 for r in rows.values()), rows
    for name, r in rows.items():  # the probe runs on our forward kernels only
        fused = name.startswith("fwd:") and ":sdpa:" not in name and name != "fwd:route"
        assert r["probe_ok"] is (True if fused else None), name
    (shape,) = sweep.DRY_RUN_SHAPES
    verdict = report["decision"][shape.name]
    fastest = {d: min((r["ms"], n) for n, r in rows.items() if n.startswith(d + ":") and ":sdpa:" not in n
                      and n != f"{d}:route") for d in ("fwd", "bwd")}
    assert verdict["fused_fwd"] == fastest["fwd"][1].split(":", 1)[1]
    assert verdict["fused_bwd"] == fastest["bwd"][1].split(":", 1)[1]
    route_ms = rows["fwd:route"]["ms"] + rows["bwd:route"]["ms"]
    assert verdict["faster"] == ("route" if route_ms < fastest["fwd"][0] + fastest["bwd"][0] else "fused")
    assert verdict["partial"] is False


@pytest.fixture
def sdpa_route_on_cpu(monkeypatch):
    """The long-sequence route (fused rotation + SDPA), which default dispatch takes on a GPU for
    crops of N >= SDPA_ROUTE_MIN_TOKENS with a gradient, enabled on the CPU from 20 tokens; counts
    the crops it takes in `attention.routed_calls`, and the single-form reference (the CPU's
    default otherwise) raises, so a test cannot pass without the route."""
    import dinov3_fast.ops.attention as attention

    monkeypatch.setattr(attention, "SDPA_ROUTE_DEVICES", ("cpu",))
    monkeypatch.setattr(attention, "SDPA_ROUTE_MIN_TOKENS", 20)
    monkeypatch.delenv("DINOV3_FAST_BACKEND", raising=False)
    calls = []
    route = attention._rope_then_sdpa

    def counted(qkv, *args):
        calls.append(tuple(qkv.shape[:2]))
        return route(qkv, *args)

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference ran where the SDPA route was due")

    monkeypatch.setattr(attention, "_rope_then_sdpa", counted)
    monkeypatch.setattr(attention, "rope_attention_ref", no_reference)
    attention.routed_calls = calls
    yield attention
    del attention.routed_calls


def _oracle_out_and_grad(qkv, rope, heads, grad):
    q64 = qkv.detach().double().requires_grad_()
    out = dinov3_compute_attention(q64, None if rope is None else tuple(t.double() for t in rope), heads)
    (g,) = torch.autograd.grad(out, q64, grad.double())
    return out, g


def test_long_sequences_with_gradients_take_the_sdpa_route(sdpa_route_on_cpu):
    heads, head_dim = 2, 64
    rope = dinov3_rope(4, 4, head_dim, rescale=random_rescale())
    qkv = torch.randn(2, 21, 3 * heads * head_dim, requires_grad=True)
    out = rope_attention(qkv, rope, num_heads=heads)
    assert sdpa_route_on_cpu.routed_calls == [(2, 21)]
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, qkv, grad)
    want, want_g = _oracle_out_and_grad(qkv, rope, heads, grad)
    assert rel_err(out, want) < 1e-5 and rel_err(got, want_g) < 1e-5


@pytest.mark.parametrize("short_backend", ["reference", "cpu"])
def test_list_form_routes_its_long_crops_and_packs_the_short_ones(sdpa_route_on_cpu, monkeypatch, short_backend):
    """A mixed list (DINOv3's student at high resolution: long global crops, short local ones):
    the long crops go through the route one by one, the short ones keep one launch (the CPU's
    default reference, or the packed cpu kernel with a sequence table of the short crops alone);
    every output and gradient in packing order."""
    monkeypatch.setitem(sdpa_route_on_cpu.PREFERENCE, "cpu", (short_backend,))
    heads, head_dim = 2, 64
    crops = [(2, 21, 16), (3, 6, 1), (1, 26, 21), (2, 9, None)]  # (B, N, HW or no rope)
    qkv_list = [torch.randn(b, n, 3 * heads * head_dim, requires_grad=True) for b, n, _ in crops]
    rope_list = [None if hw is None else dinov3_rope(*grid_for(hw), head_dim) for _, _, hw in crops]
    outs = rope_attention_list(qkv_list, rope_list, num_heads=heads)
    assert sdpa_route_on_cpu.routed_calls == [(2, 21), (1, 26)]
    grads = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, qkv_list, grads)
    for o, g, q, r, up in zip(outs, got, qkv_list, rope_list, grads):
        want, want_g = _oracle_out_and_grad(q, r, heads, up)
        assert rel_err(o, want) < 1e-5 and rel_err(g, want_g) < 1e-5


def test_sdpa_route_only_with_gradients_and_default_dispatch(sdpa_route_on_cpu, monkeypatch):
    may_route = sdpa_route_on_cpu._may_route_to_sdpa
    qkv = torch.randn(2, 21, 3 * 2 * 64, requires_grad=True)
    assert may_route(qkv, None)
    assert not may_route(qkv.detach(), None)         # no gradient: the fused forward is the faster one
    with torch.no_grad():
        assert not may_route(qkv, None)
    assert not may_route(qkv, "triton")              # a forced backend is obeyed
    monkeypatch.setenv("DINOV3_FAST_BACKEND", "triton")
    assert not may_route(qkv, None)
    monkeypatch.setenv("DINOV3_FAST_BACKEND", "cuda")  # a backend this op lacks: its default stands
    assert may_route(qkv, None)
    monkeypatch.delenv("DINOV3_FAST_BACKEND")
    monkeypatch.setattr(sdpa_route_on_cpu, "SDPA_ROUTE_DEVICES", ("cuda",))
    assert not may_route(qkv, None)                  # CPU tensors never take it by default


def test_simulated_gpu_dispatch_takes_the_route_so_the_planner_plans_it(monkeypatch):
    """The memory planner's meta-device forward dispatches as on a GPU (simulate_cuda_dispatch):
    it must take the route where a GPU run would, or it plans the fused op's smaller saved set."""
    import dinov3_fast.ops.attention as attention
    from dinov3_fast.ops._dispatch import simulate_cuda_dispatch

    monkeypatch.delenv("DINOV3_FAST_BACKEND", raising=False)
    routed = []
    route = attention._rope_then_sdpa
    monkeypatch.setattr(attention, "_rope_then_sdpa", lambda qkv, *a: routed.append(qkv.shape[1]) or route(qkv, *a))
    n = attention.SDPA_ROUTE_MIN_TOKENS + 5
    qkv = [torch.empty(2, n, 3 * 128, device="meta", requires_grad=True),
           torch.empty(4, 54, 3 * 128, device="meta", requires_grad=True)]
    ropes = [dinov3_rope(32, 32, 64, device="meta"), dinov3_rope(7, 7, 64, device="meta")]
    with simulate_cuda_dispatch():
        outs = rope_attention_list(qkv, ropes, num_heads=2)
    assert routed == [n] and [tuple(o.shape) for o in outs] == [(2, n, 128), (4, 54, 128)]
    routed.clear()
    rope_attention_list(qkv, ropes, num_heads=2)  # meta tensors, no simulated GPU: no route
    assert routed == []


def test_sequence_table_is_built_once_per_crop_layout():
    """The list form's sequence table is cached per (layout, device): built fresh, each call would
    copy it from pageable host memory, which on a GPU makes the host wait for the device in every
    attention call and cannot be captured in a CUDA graph."""
    from dinov3_fast.ops.attention import _cached_sequence_table, _sequence_table

    like = torch.empty(0)
    layout = ((2, 54, 49), (3, 6, 1), (1, 21, 0))
    table = _sequence_table(layout, like)
    assert table.dtype == torch.int32 and table.tolist() == [
        [0, 54, 0, 49], [54, 54, 0, 49], [108, 6, 49, 1], [114, 6, 49, 1], [120, 6, 49, 1], [126, 21, 50, 0]]
    hits = _cached_sequence_table.cache_info().hits
    assert _sequence_table(layout, like) is table
    assert _cached_sequence_table.cache_info().hits == hits + 1
    assert _sequence_table(layout[:2], like).shape == (5, 4)


def test_sequence_table_first_made_in_inference_mode_serves_training():
    """A layout first seen under inference_mode (feature extraction) must not cache an inference
    tensor: a later autograd call saves the table for its backward."""
    from dinov3_fast.ops.attention import _cached_sequence_table

    _cached_sequence_table.cache_clear()
    heads, head_dim = 2, 64
    qkv = torch.randn(3 * 17, 3 * heads * head_dim)
    with torch.inference_mode():
        rope_attention_list([qkv.view(3, 17, -1)], None, num_heads=heads, backend="cpu")
    q = qkv.view(3, 17, -1).clone().requires_grad_()
    (out,) = rope_attention_list([q], None, num_heads=heads, backend="cpu")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def dinov3_self_attention_forward(m, x, rope):
    """DINOv3's SelfAttention.forward with m's parameters (LinearKMaskedBias included)."""
    p = {k: v.to(x.dtype) for k, v in m.state_dict().items()}
    bias = p["qkv.bias"] * p["qkv.bias_mask"] if "qkv.bias_mask" in p else p.get("qkv.bias")
    qkv = F.linear(x, p["qkv.weight"], bias)
    return F.linear(dinov3_compute_attention(qkv, rope, m.num_heads), p["proj.weight"], p.get("proj.bias"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_k_bias", [False, True])
def test_self_attention_dropin(backend, mask_k_bias):
    dim, heads = 128, 2
    m = dinov3_fast.SelfAttention(dim, heads, qkv_bias=True, mask_k_bias=mask_k_bias, backend=backend)
    names = {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"} | ({"qkv.bias_mask"} if mask_k_bias else set())
    assert set(m.state_dict()) == names
    with torch.no_grad():
        m.qkv.bias.normal_()
    x = torch.randn(2, 54, dim)
    rope = dinov3_rope(7, 7, dim // heads)
    with torch.no_grad():
        want = dinov3_self_attention_forward(m, x.double(), tuple(t.double() for t in rope))
        assert rel_err(m(x, rope=rope), want) < 1e-5
        xs = [x, torch.randn(3, 6, dim)]
        ropes = [rope, dinov3_rope(1, 1, dim // heads)]
        for got, xi, ri in zip(m.forward_list(xs, rope_list=ropes), xs, ropes):
            assert rel_err(got, dinov3_self_attention_forward(m, xi.double(), tuple(t.double() for t in ri))) < 1e-5
    # a DINOv3 checkpoint (same names) loads strictly
    m2 = dinov3_fast.SelfAttention(dim, heads, qkv_bias=True, mask_k_bias=mask_k_bias, backend=backend)
    m2.load_state_dict(m.state_dict(), strict=True)


def test_gradcheck_cpu_float64():
    qkv = torch.randn(2, 7, 3 * 2 * 4, dtype=torch.float64, requires_grad=True)
    rope = dinov3_rope(2, 2, 4, rescale=1.7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: rope_attention(t, rope, num_heads=2, backend="cpu"), (qkv,))
    a = torch.randn(1, 9, 3 * 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, 3 * 4, dtype=torch.float64, requires_grad=True)
    ropes = [dinov3_rope(2, 2, 4, dtype=torch.float64), None]
    assert torch.autograd.gradcheck(
        lambda x, y: rope_attention_list([x, y], ropes, num_heads=1, backend="cpu"), (a, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    qkv = torch.randn(2 * 6, 3 * 2 * 32, requires_grad=True)
    sin, cos = dinov3_rope(1, 4, 32)
    torch.library.opcheck(_rope_attention_fwd, (qkv, sin, cos, None, 2, 6, backend))
    seqinfo = torch.tensor([[0, 6, 0, 4], [6, 4, 4, 4], [10, 2, 0, 0]], dtype=torch.int32)
    tables = (torch.cat([sin, sin]), torch.cat([cos, cos]))
    torch.library.opcheck(_rope_attention_fwd, (qkv, *tables, seqinfo, 2, 6, backend))


def test_torch_compile_fullgraph():
    heads = 2
    rope = dinov3_rope(2, 3, 32)
    qkv = torch.randn(2, 11, 3 * heads * 32, requires_grad=True)
    small = torch.randn(3, 6, 3 * heads * 32, requires_grad=True)

    def f(a, b):
        x = rope_attention(a, rope, num_heads=heads, backend="cpu")
        y = rope_attention_list([a, b], [rope, None], num_heads=heads, backend="cpu")
        return x.sum() + y[0].square().sum() + y[1].sum()

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(qkv, small)
    ga = torch.autograd.grad(out, (qkv, small))
    want = f(qkv, small)
    gw = torch.autograd.grad(want, (qkv, small))
    assert rel_err(out, want) < 1e-6
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(ga, gw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    qkv = torch.randn(1, 9, 3 * 64)
    qkv[0, 3, 70] = float("nan")  # one key element: every query row sees it
    out = rope_attention(qkv, dinov3_rope(2, 2, 64), num_heads=1, backend=backend)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_nan_in_a_query_reaches_its_row(backend):
    """A NaN confined to one query (token 2, head 1) makes that row's output in that head NaN and
    nothing else, on every backend: torch's CPU flash SDPA, behind the reference (the CPU
    default), writes 0 for such a row."""
    qkv = torch.randn(1, 6, 3 * 2 * 32)
    qkv[0, 2, 32 + 5] = float("nan")  # q of head 1
    out = rope_attention(qkv, dinov3_rope(1, 4, 32), num_heads=2, backend=backend)
    want = torch.zeros_like(out, dtype=torch.bool)
    want[0, 2, 32:] = True
    assert torch.equal(torch.isnan(out), want)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_large_finite_half_query_stays_finite(backend):
    """fp16 with a query row whose sum exceeds fp16's range (2100 in each of 32 dims: 67200 >
    65504) is finite input with a finite result, as DINOv3's SDPA gives. The reference's NaN-row
    term (above) summed the row in fp16, and the overflow (inf * 0.0) made the row NaN."""
    qkv = torch.randn(1, 6, 3 * 2 * 32)
    qkv[0, 1, :32] = 2100.0  # q of prefix token 1, head 0 (not rotated)
    qkv = qkv.half()
    rope = dinov3_rope(1, 4, 32)
    out = rope_attention(qkv, rope, num_heads=2, backend=backend)
    assert torch.isfinite(out).all()
    assert rel_err(out, rope_attention_ref(qkv.double(), tuple(t.double() for t in rope), 2)) < 1e-2


def test_nan_in_a_query_reaches_its_row_compiled():
    """The same through inductor, which simplifies arithmetic identities (0 * y -> 0) that would
    drop the NaN."""
    qkv = torch.randn(1, 6, 3 * 2 * 32)
    qkv[0, 2, 32 + 5] = float("nan")
    rope = dinov3_rope(1, 4, 32)
    out = torch.compile(lambda t: rope_attention(t, rope, num_heads=2, backend="reference"), fullgraph=True)(qkv)
    assert torch.equal(torch.isnan(out), torch.isnan(rope_attention(qkv, rope, num_heads=2, backend="cpu")))
    assert torch.isnan(out[0, 2, 32:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_tables_agree_to_their_dtype(backend):
    """fp32 qkv with bf16 tables: the reference rotates in bf16 (DINOv3 casts q and k to the
    tables' dtype), the fused backends in fp32. They agree to bf16's tolerance, not fp32's: the
    effective input precision is the lowest of qkv's and the tables'. The fused result is the one
    within fp32's tolerance of the float64 oracle on the same (bf16-valued) tables."""
    qkv = torch.randn(2, 21, 3 * 2 * 32)
    rope = tuple(t.bfloat16() for t in dinov3_rope(4, 4, 32, rescale=random_rescale()))
    out = rope_attention(qkv, rope, num_heads=2, backend=backend)
    err = rel_err(out, rope_attention(qkv, rope, num_heads=2, backend="reference"))
    assert 1e-5 < err < 1e-2
    assert rel_err(out, rope_attention_ref(qkv.double(), tuple(t.double() for t in rope), 2)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_tables_requiring_grad_need_the_reference(backend):
    """The fused backends treat the tables as constants: tables that require grad are refused in
    grad mode (their gradient would be dropped); the reference gives them theirs."""
    qkv = torch.randn(2, 21, 3 * 2 * 32, requires_grad=True)
    rope = tuple(t.requires_grad_() for t in dinov3_rope(4, 4, 32))
    with pytest.raises(ValueError, match=r"rope sin/cos require grad.*backend='reference'"):
        rope_attention(qkv, rope, num_heads=2, backend=backend)
    with pytest.raises(ValueError, match=r"rope_list\[0\] sin/cos require grad"):
        rope_attention_list([qkv], [rope], num_heads=2, backend=backend)
    with torch.no_grad():
        rope_attention(qkv, rope, num_heads=2, backend=backend)
    rope_attention(qkv, rope, num_heads=2, backend="reference").sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in rope)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused(backend):
    qkv = torch.randn(1, 9, 3 * 2 * 32, requires_grad=True)
    out = rope_attention(qkv, dinov3_rope(2, 2, 32), num_heads=2, backend=backend)
    with pytest.raises(RuntimeError, match="rope_attention has no double backward.*backend='reference'"):
        torch.autograd.grad(out.sum(), qkv, create_graph=True)


def test_self_attention_bad_input():
    with pytest.raises(ValueError, match="num_heads must be a positive int, got 0"):
        dinov3_fast.SelfAttention(64, num_heads=0)
    m = dinov3_fast.SelfAttention(64, num_heads=2)
    with pytest.raises(ValueError, match=r"x must be 3-D \[B, N, dim=64\], got shape \(7, 64\)"):
        m(torch.randn(7, 64))
    with pytest.raises(ValueError, match=r"x_list\[1\] must be 3-D \[B, N, dim=64\], got shape \(5, 64\)"):
        m.forward_list([torch.randn(1, 7, 64), torch.randn(5, 64)])


def test_bad_input():
    rope = dinov3_rope(7, 7, 64)
    qkv = torch.randn(2, 54, 3 * 2 * 64)
    with pytest.raises(ValueError, match=r"qkv last dim must be divisible by 3 \* num_heads = 9"):
        rope_attention(qkv, rope, num_heads=3)
    with pytest.raises(ValueError, match=r"every crop needs B >= 1 sequences"):
        rope_attention_list([qkv, qkv[:0]], [rope, rope], num_heads=2)
    with pytest.raises(ValueError, match="HW = 49 rows but the sequence has only N = 40"):
        rope_attention(qkv[:, :40], rope, num_heads=2)
    with pytest.raises(ValueError, match="rope last dim must equal head_dim = 64"):
        rope_attention(qkv, dinov3_rope(7, 7, 32), num_heads=2)
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope_attention(torch.randn(1, 5, 3 * 7), (torch.zeros(4, 7), torch.zeros(4, 7)), num_heads=1)
    with pytest.raises(ValueError, match="num_prefix_tokens = 4 but N - HW"):
        rope_attention(qkv, rope, num_heads=2, num_prefix_tokens=4)
    with pytest.raises(ValueError, match="qkv must be 3-D"):
        rope_attention(qkv[0], rope, num_heads=2)
    with pytest.raises(TypeError, match="qkv must be a floating-point tensor"):
        rope_attention(qkv.long(), rope, num_heads=2)
    with pytest.raises(TypeError, match=r"qkv must be a floating-point tensor \(float16, bfloat16, float32 or "
                                        r"float64\), got torch.float8_e4m3fn"):
        rope_attention(qkv.to(torch.float8_e4m3fn), rope, num_heads=2)
    with pytest.raises(TypeError, match=r"rope must be a \(sin, cos\) pair"):
        rope_attention(qkv, rope[0], num_heads=2)
    with pytest.raises(ValueError, match="sin and cos must have the same shape"):
        rope_attention(qkv, (rope[0], rope[1][:10]), num_heads=2)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        rope_attention(qkv, rope, num_heads=0)
    with pytest.raises(ValueError, match="triton backend needs"):
        rope_attention(qkv.double().to("cuda" if HAS_CUDA else "cpu"), None, num_heads=2, backend="triton")
    with pytest.raises(ValueError, match="rope_list must have one entry per crop"):
        rope_attention_list([qkv, qkv], [rope], num_heads=2)
    with pytest.raises(ValueError, match=r"qkv_list\[1\] must match qkv_list\[0\]"):
        rope_attention_list([qkv, qkv.half()], [rope, rope], num_heads=2)
    with pytest.raises(TypeError, match=r"qkv_list\[1\] must be a torch.Tensor, got str"):
        rope_attention_list([qkv, "qkv"], [rope, rope], num_heads=2)
    with pytest.raises(TypeError, match=r"qkv_list\[0\] must be a floating-point tensor .*got torch.int64"):
        rope_attention_list([qkv.long()], [rope], num_heads=2)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,heads", [(64, 16), (128, 4)])
@pytest.mark.parametrize("n,prefix,batch", [(6, 5, 4), (54, 5, 8), (261, 5, 4), (1029, 5, 1), (4101, 5, 1), (100, 0, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_matches_oracle(head_dim, heads, n, prefix, batch, dtype):
    qkv = torch.randn(batch, n, 3 * heads * head_dim, device="cuda", dtype=dtype)
    rope = dinov3_rope(*grid_for(n - prefix), head_dim, rescale=random_rescale(), device="cuda")
    check_against_oracle(qkv, rope, heads, "triton", "half")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,heads", [(64, 16), (128, 4)])
def test_gpu_long_sequences_train_through_rotation_and_sdpa(head_dim, heads, monkeypatch):
    """Default dispatch at N >= SDPA_ROUTE_MIN_TOKENS with a gradient: the fused rotation, then
    SDPA; no fused attention kernel runs, and the oracle's half-precision bounds hold."""
    import dinov3_fast.ops.attention as attention

    monkeypatch.delenv("DINOV3_FAST_BACKEND", raising=False)
    n = attention.SDPA_ROUTE_MIN_TOKENS + 5
    qkv = torch.randn(2, n, 3 * heads * head_dim, device="cuda", dtype=torch.bfloat16)
    rope = dinov3_rope(*grid_for(n - 5), head_dim, rescale=random_rescale(), device="cuda")

    def no_kernel(*args, **kwargs):
        raise AssertionError("the fused attention kernel ran on the SDPA route")

    monkeypatch.setattr(attention, "_rope_attention_fwd", no_kernel)
    check_against_oracle(qkv, rope, heads, None, "half")


@pytest.mark.gpu
def test_gpu_list_form_routes_its_long_crops_bf16(monkeypatch):
    """DINOv3's student at high resolution, default dispatch with a gradient: the 1029-token crops
    through the rotation + SDPA, the 54-token ones in one fused launch; outputs and gradients
    against float64."""
    import dinov3_fast.ops.attention as attention

    monkeypatch.delenv("DINOV3_FAST_BACKEND", raising=False)
    routed = []
    route = attention._rope_then_sdpa
    monkeypatch.setattr(attention, "_rope_then_sdpa", lambda qkv, *a: routed.append(qkv.shape[1]) or route(qkv, *a))
    crops = [(2, 1029, 1024), (8, 54, 49)]
    qkv_list = [torch.randn(b, n, 3 * 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for b, n, _ in crops]
    rope_list = [dinov3_rope(*grid_for(hw), 64, rescale=random_rescale(), device="cuda") for *_, hw in crops]
    outs = rope_attention_list(qkv_list, rope_list, num_heads=16)
    assert routed == [1029]
    grads = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, qkv_list, grads)
    for o, g, q, r, up in zip(outs, got, qkv_list, rope_list, grads):
        q64 = q.detach().double().requires_grad_()
        want = rope_attention_ref(q64, tuple(t.double() for t in r), 16)
        (want_g,) = torch.autograd.grad(want, q64, up.double())
        assert rel_err(o, want) < 1e-2 and rel_err(g, want_g) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,heads", [(64, 4), (128, 2)])
@pytest.mark.parametrize("n", [54, 261])
def test_gpu_fp32_is_exact_fp32(head_dim, heads, n):
    """fp32 inputs get fp32 (not TF32) dots unless torch allows TF32: the 1e-5 contract."""
    assert not torch.backends.cuda.matmul.allow_tf32
    qkv = torch.randn(2, n, 3 * heads * head_dim, device="cuda")
    rope = dinov3_rope(*grid_for(n - 5), head_dim, rescale=random_rescale(), device="cuda")
    check_against_oracle(qkv, rope, heads, "triton", 1e-5)


@pytest.mark.gpu
def test_gpu_list_form_bf16():
    crops = [(4, 261, 256), (8, 54, 49)]
    qkv_list = [torch.randn(b, n, 3 * 1024, device="cuda", dtype=torch.bfloat16) for b, n, _ in crops]
    rope_list = [dinov3_rope(*grid_for(hw), 64, rescale=random_rescale(), device="cuda") for *_, hw in crops]
    outs = rope_attention_list(qkv_list, rope_list, num_heads=16)
    for o, q, r in zip(outs, qkv_list, rope_list):
        assert rel_err(o, rope_attention_ref(q.double(), tuple(t.double() for t in r), 16)) < 1e-2
