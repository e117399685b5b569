"""The benchmark machinery: memory accounting, the runner, the CLI and the BENCHMARKS.md generator."""
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from dinov3_fast import cli
from dinov3_fast.bench.case import BenchCase
from dinov3_fast.bench.memory import peak_extra_bytes
from dinov3_fast.bench.runner import format_table, run_case
from dinov3_fast.bench.timing import graph_median_seconds
from tools_loader import load_tool


def test_cpu_peak_memory_sees_temporaries_inside_a_call():
    x = torch.randn(512, 512)

    def two_live_temporaries():
        a = x @ x            # 1 MiB
        b = a * 2            # 1 MiB, while a is alive
        del a
        return b.sum()

    peak = peak_extra_bytes(two_live_temporaries, x.device)
    assert 2 * 2**20 <= peak < 3 * 2**20


def test_cpu_peak_below_the_known_floor_is_not_a_number():
    """A profiled peak below what the call is known to allocate and keep (the profiler missed
    allocations, as it now and then does for compiled graphs) is reported as None, not as a
    figure that would make a bogus memory ratio."""
    x = torch.randn(256, 256)
    kept = []
    assert peak_extra_bytes(lambda: kept.append(x * 2), x.device, floor=x.numel() * 4) >= x.numel() * 4
    assert peak_extra_bytes(lambda: kept.append(x * 2), x.device, floor=10 * x.numel() * 4) is None


def test_cpu_peak_does_not_net_out_the_previous_gradient():
    """A training step frees the last step's gradient as it starts: freed inside the profiled
    window, it would net out against the new one (a peak of ~0 for a step that keeps a 256 KiB
    gradient). The runner frees it in `setup`, before the window."""
    from dinov3_fast.bench.memory import _profiled_peak
    from dinov3_fast.bench.runner import fwd_bwd_step

    x = torch.randn(256, 256, requires_grad=True)
    grad_bytes = x.numel() * 4
    step = fwd_bwd_step(lambda t: (t * 2).sum(), (x,), {})
    step()
    _profiled_peak(step)  # its gradient was allocated under the profiler: the next run sees it freed
    clear = lambda: setattr(x, "grad", None)  # noqa: E731
    assert peak_extra_bytes(step, x.device, floor=grad_bytes, setup=clear) >= grad_bytes


def test_fwd_bwd_step_backpropagates_every_output_and_draws_its_upstream_gradient_once(monkeypatch):
    """A tuple of outputs (RoPE's q_rot and k_rot) is back-propagated whole, not through an added
    sum; the random upstream gradients are drawn on the first call only, so a measured call (the
    peak-memory run reuses the timed step) allocates none."""
    from dinov3_fast.bench.runner import fwd_bwd_step

    x = torch.randn(8, 4, requires_grad=True)
    draws = []
    monkeypatch.setattr(torch, "randn_like", lambda t: draws.append(t.shape) or torch.full_like(t, 0.5))
    step = fwd_bwd_step(lambda t: (2 * t, (3 * t).sum()), (x,), {})
    for _ in range(2):
        step()
        # d/dx (<g, 2x> + 3 sum(x)) = 2 g + 3 with g = 0.5: both outputs, cleared between calls
        torch.testing.assert_close(x.grad, torch.full_like(x, 4.0))
    assert draws == [x.shape]  # the non-scalar output's, once; the scalar's is 1


def test_case_parameters_get_fresh_gradients_every_run():
    """A whole-block case names its weights: each run writes their gradient afresh, as the first
    step of a training run does, instead of accumulating into the last run's."""
    w = torch.randn(16, 16, requires_grad=True)

    def make(device):
        return (torch.randn(4, 16, device=device, requires_grad=True),), {}

    case = BenchCase(op="toy", preset="cpu_param", device="cpu", make_inputs=make,
                     impls={"reference": lambda x: (x @ w).square().sum()}, parameters=lambda device: [w])
    run_case(case, torch.device("cpu"), roofline=None, min_run_time=0.01)
    args, _ = make("cpu")
    from dinov3_fast.bench.runner import fwd_bwd_step
    step = fwd_bwd_step(case.impls["reference"], args, {}, [w])
    step()
    once = w.grad.clone()
    step()
    torch.testing.assert_close(w.grad, once)


def test_rows_count_each_impls_own_flops_and_the_minimal_traffic():
    """TFLOP/s is the work each impl executes (impl_flops), and a schedule-counted bandwidth
    (bytes) comes with the minimal traffic's fraction (min_bytes)."""
    from dinov3_fast.bench.roofline import Roofline

    case = _tiny_case()
    case = BenchCase(**{**case.__dict__, "impl_flops": {"reference": 4 * case.flops}, "min_bytes": case.bytes / 2})
    roof = Roofline("cpu", copy_bytes_per_s=1e10, bf16_flops_per_s=1e11, fp32_flops_per_s=1e11)
    rows = run_case(case, torch.device("cpu"), roofline=roof, min_run_time=0.01)
    for row, flops in zip(rows, (4 * case.flops, case.flops)):
        assert row.tflops == pytest.approx(flops / row.fwd_ms / 1e9)
        assert row.min_bw_frac == pytest.approx(row.bw_frac / 2)


def test_cpu_timing_takes_at_least_the_rep_floor():
    """A call much longer than min_run_time is still timed over MIN_REPS calls, not a handful."""
    import time

    from dinov3_fast.bench.timing import MIN_REPS, median_seconds

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.002)

    assert median_seconds(slow, torch.device("cpu"), min_run_time=0.001) >= 0.002
    assert len(calls) >= MIN_REPS


@pytest.mark.gpu
@pytest.mark.serial
def test_cuda_timing_counts_host_time_that_outlasts_the_device_work():
    """A call whose host work (300 us of Python here) outlasts its device work reads as at least
    that host time: the L2 flush before it is drained first, so none of the call hides behind it
    (triton's do_bench recorded the start event right behind the flush and read ~90 us less).
    Serial: with other processes' kernels on the GPU the start event can wait out the host work,
    and the call then reads a few us."""
    import time

    from dinov3_fast.bench.timing import median_seconds

    x = torch.ones(16, device="cuda")

    def host_bound():
        end = time.perf_counter() + 300e-6
        while time.perf_counter() < end:
            pass
        x.add_(1)

    assert median_seconds(host_bound, torch.device("cuda"), min_run_time=0.05) >= 290e-6


def _tiny_case():
    def make(device):
        return (torch.randn(64, 32, device=device, requires_grad=True),), {}

    def slow(x):
        return (x @ x.T).pow(2).mean()

    def fast(x):
        return (x.T @ x).pow(2).mean()  # the same value by the Gram identity

    return BenchCase(op="toy", preset="cpu_tiny", device="cpu", make_inputs=make,
                     impls={"reference": slow, "fused": fast}, flops=2 * 64 * 64 * 32, bytes=64 * 32 * 4)


def test_run_case_rows_and_ratios():
    rows = run_case(_tiny_case(), torch.device("cpu"), roofline=None, min_run_time=0.01)
    assert [r.impl for r in rows] == ["reference", "fused"]
    assert rows[0].speedup == pytest.approx(1.0)
    assert all(r.fwd_ms > 0 and r.fwd_bwd_ms > 0 and r.tflops > 0 for r in rows)
    assert rows[1].speedup == pytest.approx(rows[0].fwd_bwd_ms / rows[1].fwd_bwd_ms)
    # measured with the last run's gradients freed first: a value, the same on a second call
    again = run_case(_tiny_case(), torch.device("cpu"), roofline=None, min_run_time=0.01)
    assert all(r.peak_mb is not None and r.peak_mb > 0 for r in rows)
    assert [r.peak_mb for r in again] == [r.peak_mb for r in rows]
    table = format_table(rows)
    assert "cpu_tiny" in table and "fused" in table


def test_cli_table_shows_a_cpus_rates_in_units_that_do_not_round_to_zero():
    """A 2-core CPU runs at tens of GFLOP/s and a few GB/s: the table says so instead of printing
    every row as 0.00 TFLOP/s and 0 GB/s; a GPU's rates stay in TFLOP/s."""
    from dinov3_fast.bench.runner import BenchRow

    cpu = BenchRow("toy", "cpu_tiny", "fused", 1.0, 2.0, 1.0, 1.0, 1.0, 0.0345, None, 0.19, None)
    table = format_table([cpu])
    assert "GFLOP/s" in table and "TFLOP/s" not in table
    assert "34.50" in table and "0.19" in table
    gpu = BenchRow("toy", "big", "fused", 1.0, 2.0, 1.0, 1.0, 1.0, 250.0, 0.35, 1500.0, 0.5)
    table = format_table([gpu])
    assert "TFLOP/s" in table and "250.00" in table and "1500" in table
    # BENCHMARKS.md's run tables follow the same rule (they printed a CPU's GB/s as 0 and 1)
    md = load_tool("benchmarks_md")
    fast_copy = BenchRow("toy", "cpu_copy", "fused", 1.0, 2.0, 1.0, 1.0, 1.0, None, None, 12.5, None)
    run = {"meta": {"device_type": "cpu", "device": "toy CPU"}, "rows": [asdict(cpu), asdict(fast_copy)]}
    section = "\n".join(md._run_section(Path("cpu_toy.json"), run, md.RunInfo(None, None, 2)))
    assert "fwd GFLOP/s" in section and "| 34.5 |" in section and "| 0.19 |" in section and "| 12 |" in section
    assert "0.19" in format_table([cpu, fast_copy])  # per figure: a faster row beside it does not round it to 0


def test_graph_times_on_cpu_are_absent_and_not_shown():
    """CUDA-graph device times exist only on CUDA; a CPU table shows no graph columns."""
    rows = run_case(_tiny_case(), torch.device("cpu"), roofline=None, min_run_time=0.01)
    assert all(r.graph_ms is None and r.graph_speedup is None for r in rows)
    assert graph_median_seconds(lambda: None, torch.device("cpu")) is None
    assert "graph" not in format_table(rows)


def test_graph_speedup_compares_the_same_pass_and_needs_both_times(monkeypatch):
    """graph x is baseline / impl device time of the pass `speedup` compares (fwd+bwd here: only
    that pass is replayed), and None where either side could not be captured; the graph columns
    then appear in the table."""
    device_ms = {"reference": 6.0, "fused": 2.0}
    labels = []

    def fake_graph(fn, device, min_run_time=0.5, label=""):
        labels.append(label)
        return device_ms[label.split("/")[-1].split(" ")[0]] / 1e3

    monkeypatch.setattr("dinov3_fast.bench.runner.graph_median_seconds", fake_graph)
    rows = run_case(_tiny_case(), torch.device("cpu"), roofline=None, min_run_time=0.01)
    assert labels == ["toy/cpu_tiny/reference fwd+bwd", "toy/cpu_tiny/fused fwd+bwd"]
    assert [r.graph_ms for r in rows] == pytest.approx([6.0, 2.0])
    assert [r.graph_speedup for r in rows] == pytest.approx([1.0, 3.0])
    assert "graph x" in format_table(rows)
    monkeypatch.setattr("dinov3_fast.bench.runner.graph_median_seconds",
                        lambda fn, device, min_run_time=0.5, label="":
                        None if label.startswith("toy/cpu_tiny/fused") else fake_graph(fn, device, min_run_time, label))
    rows = run_case(_tiny_case(), torch.device("cpu"), roofline=None, min_run_time=0.01)
    assert rows[1].graph_speedup is None and rows[1].graph_ms is None and rows[0].graph_ms == pytest.approx(6.0)


@pytest.mark.gpu
def test_graph_timing_on_cuda_times_device_work_and_survives_an_uncapturable_call():
    device = torch.device("cuda")
    x = torch.randn(2048, 2048, device=device)
    seconds = graph_median_seconds(lambda: x @ x, device, min_run_time=0.05)
    assert seconds is not None and 0 < seconds < 1.0
    w = torch.randn(256, 256, device=device, requires_grad=True)

    def fwd_bwd():
        w.grad = None
        (x[:, :256] @ w).square().mean().backward()

    assert graph_median_seconds(fwd_bwd, device, min_run_time=0.05) is not None
    with pytest.warns(UserWarning, match="not capturable"):
        assert graph_median_seconds(lambda: (x @ x).sum().item(), device, min_run_time=0.05, label="sync") is None
    torch.testing.assert_close((x @ x)[0, :4], (x.double() @ x.double())[0, :4].float(), rtol=1e-2, atol=1e-1)


def _traced_or_eager(x: torch.Tensor) -> torch.Tensor:
    """2 x when run from a dynamo-compiled graph, 3 x when run eagerly."""
    return x * (2.0 if torch.compiler.is_compiling() else 3.0)


def test_compiled_references_are_compiled_in_every_case():
    """Compiled references share one code object across presets; without a reset per case they
    ran into dynamo's recompile limit and later cases timed eager code under the compiled label."""
    import torch._dynamo.config as dynamo_config

    compiled = torch.compile(_traced_or_eager, backend="eager")
    # one case compiles with grad mode on and off: 2 entries; no shape generalisation
    try:
        with dynamo_config.patch(recompile_limit=2, automatic_dynamic_shapes=False):
            for n in (3, 4, 5):
                case = BenchCase(op="t", preset=f"cpu_{n}", device="cpu", backward=False,
                                 make_inputs=lambda device, n=n: ((torch.randn(n, device=device),), {}),
                                 impls={"reference": _traced_or_eager, "reference+compile": compiled})
                run_case(case, torch.device("cpu"), roofline=None, min_run_time=0.001)
                x = torch.randn(n)
                assert torch.equal(compiled(x), 2.0 * x), f"preset {n} ran eagerly"
    finally:
        torch.compiler.reset()


def test_cli_bench_writes_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr("dinov3_fast.bench.cases.all_cases", lambda: [_tiny_case()])
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    assert cli.main(["bench", "--device", "cpu", "--min-run-time", "0.01", "--json", str(out_json),
                     "--plot", str(out_png)]) == 0
    data = json.loads(out_json.read_text())
    assert data["meta"]["device_type"] == "cpu" and {r["impl"] for r in data["rows"]} == {"reference", "fused"}
    assert out_png.stat().st_size > 0
    # the CPU's own roofline is measured too, and every rate gets its fraction of it
    roof = data["meta"]["roofline"]
    assert roof["copy_bytes_per_s"] > 0 and roof["fp32_flops_per_s"] > 0
    assert all(r["flops_frac"] > 0 and r["bw_frac"] > 0 for r in data["rows"])


def test_cli_bench_goes_on_past_a_failing_case(tmp_path, monkeypatch, capsys):
    """A case that raises (an out-of-memory on the GPU) costs that case only: the later cases are
    measured, the failure is in the JSON and on stderr, and the exit status is 1."""
    import dataclasses

    def out_of_memory(x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    tiny = _tiny_case()
    failing = dataclasses.replace(tiny, preset="cpu_oom", impls={**tiny.impls, "reference": out_of_memory})
    monkeypatch.setattr("dinov3_fast.bench.cases.all_cases", lambda: [failing, tiny])
    out_json = tmp_path / "b.json"
    assert cli.main(["bench", "--device", "cpu", "--min-run-time", "0.01", "--json", str(out_json)]) == 1
    data = json.loads(out_json.read_text())
    assert {(r["preset"], r["impl"]) for r in data["rows"]} == {("cpu_tiny", "reference"), ("cpu_tiny", "fused")}
    assert data["meta"]["failed_cases"] == ["toy/cpu_oom: OutOfMemoryError: CUDA out of memory. Tried to allocate "
                                            "80.00 GiB"]
    assert "error: case failed, no rows: toy/cpu_oom" in capsys.readouterr().err


def test_plot_label_names_the_pass_its_speedups_compare():
    """Sinkhorn-Knopp has no backward: its bars are forward speed-ups, and the axis says so."""
    from dinov3_fast.bench.plot import speedup_label
    from dinov3_fast.bench.runner import BenchRow

    def row(fwd_bwd_ms):
        return BenchRow("toy", "p", "fused", 1.0, fwd_bwd_ms, 1.0, 1.0, 1.0, None, None, None, None)

    assert speedup_label([row(2.0)]) == "speed-up over baseline (fwd+bwd)"
    assert speedup_label([row(None)]) == "speed-up over baseline (fwd)"
    assert speedup_label([row(2.0), row(None)]) == "speed-up over baseline (fwd+bwd; fwd if no bwd)"


def test_cli_bench_skip_impl(tmp_path, monkeypatch, capsys):
    """--skip-impl leaves an implementation out of every case, and refuses to leave out a baseline."""
    monkeypatch.setattr("dinov3_fast.bench.cases.all_cases", lambda: [_tiny_case()])
    out_json = tmp_path / "b.json"
    assert cli.main(["bench", "--device", "cpu", "--min-run-time", "0.01", "--skip-impl", "fused",
                     "--json", str(out_json)]) == 0
    assert {r["impl"] for r in json.loads(out_json.read_text())["rows"]} == {"reference"}
    assert cli.main(["bench", "--device", "cpu", "--skip-impl", "reference"]) == 2
    assert "cannot leave out a baseline" in capsys.readouterr().err


def test_cli_bench_unknown_preset_is_a_clear_error(capsys):
    assert cli.main(["bench", "--device", "cpu", "--preset", "no_such_preset"]) == 2
    assert "no benchmark case matches" in capsys.readouterr().err


def test_goal_evaluation():
    md = load_tool("benchmarks_md")
    from dinov3_fast.bench.runner import BenchRow

    def row(impl, fwd_bwd_ms, peak_mb):
        return BenchRow("rope_attention", "vitl_261tok", impl, 1.0, fwd_bwd_ms, peak_mb,
                        None, None, None, None, None, None).as_dict()

    rows = [row("reference", 3.0, 8.0), row("dinov3:flash", 2.0, 8.0), row("fused", 1.0, 4.0)]
    goal = next(g for g in md.GOALS if g.preset == "vitl_261tok" and g.op == "rope_attention")
    assert md.evaluate(goal, rows) == pytest.approx(2.0)  # against the fastest baseline, not the eager one
    text = md.render([(Path("gpu_run.json"), {"meta": {"device_type": "cuda", "device": "NVIDIA H100"}, "rows": rows})])
    assert ("| 5 | N=261 fwd+bwd >= 1.25x best SDPA path | vitl_261tok | 2.00x (device time not measured) | met "
            "| gpu_run.json (git unknown, harness 1) |") in text
    # a goal on the Triton kernels reads "fused:kernels" where default dispatch routes to SDPA, and
    # "fused" in runs from before the route (whose fused row was the kernels)
    bwd = next(g for g in md.GOALS if g.metric == "bwd_tflops")
    kernels = BenchRow("rope_attention", bwd.preset, "fused", 1.0, 2.0, 4.0, None, None, None, None, None, None,
                       bwd_tflops=100.0).as_dict()
    assert md.evaluate(bwd, [kernels]) == 100.0
    routed = dict(kernels, bwd_tflops=500.0)
    assert md.evaluate(bwd, [routed, dict(kernels, impl="fused:kernels")]) == 100.0
    # a routed run whose fused:kernels row was left out (--skip-impl) does not judge the route instead
    from dinov3_fast.bench.cases import attention
    note = next(c.note for c in attention.cases() if c.op == bwd.op and c.preset == bwd.preset)
    assert "fused:kernels" in note
    assert md.evaluate(bwd, [dict(routed, note=note)]) is None


def test_goals_show_the_device_time_ratio_beside_the_judged_one():
    """A run with CUDA-graph times shows the goal's ratio on device time next to the judged
    (per-call) figure, and the graph columns in its tables; older runs without them show neither."""
    md = load_tool("benchmarks_md")
    from dinov3_fast.bench.runner import BenchRow

    def row(impl, fwd_bwd_ms, graph_ms):
        return BenchRow("soft_cross_entropy", "dino_student_7b", impl, 0.5, fwd_bwd_ms, 8.0, None, None, None,
                        None, None, None, graph_ms=graph_ms).as_dict()

    rows = [row("reference", 1.2, 0.9), row("fused", 1.0, 0.3)]
    goal = next(g for g in md.GOALS if g.op == "soft_cross_entropy" and g.metric == "speedup")
    assert md.device_speedup(goal, rows) == pytest.approx(3.0)
    text = md.render([(Path("h100_run3.json"), {"meta": {"device_type": "cuda", "device": "NVIDIA H100 80GB HBM3"}, "rows": rows})])
    assert "| 1.20x (device time: 3.00x) | not met | h100_run3.json (git unknown, harness 1) |" in text
    assert "graph ms | graph x |" in text and "| 0.300 | - |" in text
    for r in rows:
        del r["graph_ms"], r["graph_speedup"]
    text = md.render([(Path("h100_run1.json"), {"meta": {"device_type": "cuda", "device": "NVIDIA H100 80GB HBM3"}, "rows": rows})])
    assert "| 1.20x (device time not measured) | not met | h100_run1.json (git unknown, harness 1) |" in text
    assert "graph ms | graph x |" not in text


ROOFLINE = {"device_name": "NVIDIA H100", "copy_bytes_per_s": 3e12, "bf16_flops_per_s": 7e14, "fp32_flops_per_s": 5e13}


def test_bandwidth_goal_shows_the_minimal_traffic_beside_the_schedule_figure():
    md = load_tool("benchmarks_md")
    from dinov3_fast.bench.runner import BenchRow

    goal = next(g for g in md.GOALS if g.metric == "bw_frac")
    rows = [BenchRow(goal.op, goal.preset, "fused", 1.0, None, 1.0, None, None, None, None, 2000.0, 0.62,
                     min_bw_frac=0.08).as_dict()]
    assert md.minimal_traffic_fraction(goal, rows) == pytest.approx(0.08)
    meta = {"device_type": "cuda", "device": "NVIDIA H100", "roofline": ROOFLINE}
    (row,) = md.rederive(rows, meta)  # today's byte counts at this run's 1 ms and 3 TB/s
    assert row["min_bw_frac"] < row["bw_frac"]
    text = md.render([(Path("h100_run4.json"), {"meta": meta, "rows": rows})])
    assert (f"| {100 * row['bw_frac']:.0f}% (minimal traffic: {100 * row['min_bw_frac']:.0f}%) | not met "
            "| h100_run4.json (git unknown, harness 1) |") in text


def test_rates_are_rederived_with_todays_counts_and_the_impls_compute_dtype():
    """A committed row's TFLOP/s and % peak come from its time and today's case counts, whatever it
    recorded; an impl that upcasts (the Gram reference) is a fraction of the fp32 rate."""
    md = load_tool("benchmarks_md")
    from dinov3_fast.bench.runner import BenchRow

    rows = [BenchRow("gram_loss", "crop512_b16_d1024", impl, 2.0, 4.0, 1.0, None, None, 999.0, 9.99, None, None).as_dict()
            for impl in ("reference", "fused")]
    ref, fused = md.rederive(rows, {"roofline": ROOFLINE})
    case, half = md._current_cases()[("gram_loss", "crop512_b16_d1024")]
    assert half
    assert ref["tflops"] == pytest.approx(case.impl_flops["reference"] / 2e-3 / 1e12)
    assert ref["flops_frac"] == pytest.approx(ref["tflops"] * 1e12 / ROOFLINE["fp32_flops_per_s"])
    assert fused["tflops"] == pytest.approx(case.flops / 2e-3 / 1e12)
    assert fused["flops_frac"] == pytest.approx(fused["tflops"] * 1e12 / ROOFLINE["bf16_flops_per_s"])
    # the fused tiled forward forms only the tiles on and above the diagonal: 136 of 16 x 16 at P=1024
    assert case.flops == pytest.approx(case.impl_flops["reference"] * 136 / 256)
    unknown = dict(rows[0], preset="retired_preset")
    assert md.rederive([unknown], {"roofline": ROOFLINE}) == [unknown]


def test_goal_figures_never_round_onto_the_other_side_of_the_threshold():
    """2.996x against a 3x goal is not met, and reads 2.996x, not 3.00x; likewise 74.96% of copy
    bandwidth against 75% and 449.6 TFLOP/s against 450."""
    md = load_tool("benchmarks_md")

    def goal(metric):
        return next(g for g in md.GOALS if g.metric == metric)

    assert md._goal_value(goal("speedup"), goal("speedup").threshold - 0.004) == \
        f"{goal('speedup').threshold - 0.004:.3f}x"
    assert md._goal_value(goal("bw_frac"), 0.7496) == "74.96%"
    assert md._goal_value(goal("tflops"), goal("tflops").threshold - 0.4) == f"{goal('tflops').threshold - 0.4:.1f} TFLOP/s"
    assert md._goal_value(goal("speedup"), 5.123) == "5.12x"


def test_koleo_cpu_fused_counts_the_tiles_its_search_forms():
    """The extension's search forms the tiles of y y^T on and above the block diagonal, each whole:
    not n^2 D (half of 2 n^2 D) but 2 D sum_{I <= J} n_I n_J, all of y y^T at n <= one tile. Its
    tile edge is csrc/koleo_cpu.cpp's kBlock."""
    import re

    from dinov3_fast.bench.cases import koleo

    kblock = re.search(r"constexpr int64_t kBlock = (\d+);",
                       (Path(__file__).resolve().parents[1] / "csrc" / "koleo_cpu.cpp").read_text())
    assert kblock and int(kblock.group(1)) == koleo.CPU_TILE
    cases = {c.preset: c for c in koleo.cases() if c.device == "cpu"}
    for preset, n, D in (("cpu_n4096_d384", 4096, 384), ("cpu_n1024_d384_top4", 1024, 384),
                         ("cpu_cls_n32_d1024", 32, 1024)):
        edges = range(0, n, koleo.CPU_TILE)
        tiles = sum(min(koleo.CPU_TILE, n - i) * min(koleo.CPU_TILE, n - j) for i in edges for j in edges if j >= i)
        assert cases[preset].impl_flops["fused"] == 2 * D * tiles, preset
    assert cases["cpu_cls_n32_d1024"].impl_flops["fused"] == 2 * 32 * 32 * 1024  # one tile: all of y y^T


def test_earlier_goal_figures_name_their_run_and_code(tmp_path):
    """The figures of earlier runs beside a goal say which run (machine, date) and which code and
    harness they come from, like the judged one."""
    md = load_tool("benchmarks_md")
    from dinov3_fast.bench.runner import BenchRow

    goal = next(g for g in md.GOALS if g.op == "koleo_loss" and g.device == "cpu")

    def run(fused_ms, meta):
        rows = [BenchRow(goal.op, goal.preset, impl, 1.0, ms, 4.0, None, None, None, None, None, None).as_dict()
                for impl, ms in (("reference", 3.0), ("fused", fused_ms))]
        return {"meta": {"device_type": "cpu", "device": "AMD EPYC", **meta}, "rows": rows}

    text = md.render([(Path("cpu_xeon_2026-12-01.json"), run(1.0, {"date": "2026-12-01"})),
                      (Path("cpu_epyc_2026-12-02.json"), run(2.0, {"time": "2026-12-02T10:00:00", "git": "abcdef0123",
                                                                  "git_dirty": False, "harness": 2}))],
                     logs=tmp_path)
    assert ("| 1.50x (earlier runs: 3.00x in cpu_xeon_2026-12-01 (git unknown, harness 1)) | met "
            "| cpu_epyc_2026-12-02.json (abcdef0, harness 2) |") in text


def test_figures_of_an_op_running_a_failed_ops_kernels_are_marked(tmp_path):
    """The head loss runs the soft-CE kernels and a ViT block the attention kernels: a failed GPU
    test of those marks their figures too, as the op's own would."""
    md = load_tool("benchmarks_md")
    from dinov3_fast.bench.runner import BenchRow

    (tmp_path / "h100_run9_pytest.log").write_text(
        "FAILED tests/test_attention.py::test_gpu_matches_oracle[x] - AssertionError\n"
        "================== 1 failed, 9 passed in 1.00s ===================\n")
    goal = next(g for g in md.GOALS if g.op == "vit_block")
    rows = [BenchRow(goal.op, goal.preset, impl, 1.0, ms, 8.0, None, None, None, None, None, None).as_dict()
            for impl, ms in (("reference", 2.0), ("fused", 1.0))]
    text = md.render([(Path("h100_run9_model.json"), {"meta": {"device_type": "cuda", "device": "NVIDIA H100"},
                                                      "rows": rows})], logs=tmp_path)
    assert "| 2.00x † (device time not measured) | met |" in text
    assert "- † vit_block runs rope_attention, which failed 1 GPU test(s) in this run" in text
    info = md.run_info(Path("h100_run9.json"), {}, tmp_path)
    assert info.failed_for("linear_soft_cross_entropy") == {} and "rope_attention" in info.failed_for("vit_block")


def test_run_info_reads_the_device_calls_logs(tmp_path):
    """Runs from before the meta fields get their revision from the call's env.json and their GPU
    test results from its pytest log; a goal figure of an op that failed a test there is marked."""
    md = load_tool("benchmarks_md")
    from dinov3_fast.bench.runner import BenchRow

    (tmp_path / "h100_run7_env.json").write_text(json.dumps({"git": "abcdef0123", "git_dirty": True}))
    (tmp_path / "h100_run7_pytest.log").write_text(
        "FAILED tests/test_soft_ce.py::test_gpu_dino_shape[dtype0] - AssertionError: (...\n"
        "FAILED tests/test_gram.py::test_gpu_triton_matches_oracle[True-2x2048x384-dtype2-1e-05]\n"
        "================== 2 failed, 78 passed, 2 warnings in 48.29s ===================\n"
        "============================== 1 passed in 3.10s ===============================\n")  # the serial session
    info = md.run_info(Path("h100_run7_compiled.json"), {"time": "2026-11-26T10:00:00"}, tmp_path)
    assert (info.git, info.dirty, info.harness) == ("abcdef0123", True, 1)
    assert info.code() == "abcdef0*, harness 1"
    assert info.tests == "2 failed, 78 passed, 2 warnings in 48.29s; 1 passed in 3.10s"
    (tmp_path / "h100_run6_pytest.log").write_text(  # the parallel session killed at its cap
        "============================= test session starts ==============================\n"
        "tests/test_gram.py::test_gpu_triton_matches_oracle[x] PASSED\n"
        "============================= test session starts ==============================\n"
        "============================== 1 passed in 3.10s ===============================\n")
    assert md.run_info(Path("h100_run6.json"), {}, tmp_path).tests == \
        "1 passed in 3.10s (1 of 2 sessions ended without a summary: killed?)"
    assert set(info.failed) == {"soft_cross_entropy", "gram_loss"}
    recorded = md.run_info(Path("h100_run8.json"), {"git": "1234567890", "git_dirty": False, "harness": 2}, tmp_path)
    assert recorded.code() == "1234567, harness 2" and recorded.tests is None
    goal = next(g for g in md.GOALS if g.op == "soft_cross_entropy" and g.metric == "speedup")
    rows = [BenchRow(goal.op, goal.preset, impl, 0.5, ms, 8.0, None, None, None, None, None, None).as_dict()
            for impl, ms in (("reference", 2.0), ("fused", 1.0))]
    text = md.render([(Path("h100_run7.json"), {"meta": {"device_type": "cuda", "device": "NVIDIA H100"}, "rows": rows})],
                     logs=tmp_path)
    assert "| 2.00x † (device time not measured) | met | h100_run7.json (abcdef0*, harness 1) |" in text
    assert "GPU tests of the same device call: 2 failed, 78 passed" in text


def test_attention_sweep_section():
    """A committed attention sweep shows its provenance, each shape's route decision (partial where
    candidates were skipped, no verdict where a pass is missing) and every row, wrong and failed
    ones marked."""
    md = load_tool("benchmarks_md")
    row = {"shape": "vitl_261tok", "N": 261, "wall_ms": 0.9, "tflops": 100.0}
    record = {"card": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "git": "abc1234", "elapsed_s": 41.0,
              "skipped": ["vitl_54tok bwd:sdpa:flash"],
              "rows": [{**row, "candidate": "fwd:default", "ms": 0.3, "rel_diff": 0.0, "ok": True, "probe_ok": True},
                       {**row, "candidate": "fwd:prerot", "ms": 0.1, "rel_diff": 0.5, "ok": False, "probe_ok": True},
                       {"shape": "vitl_261tok", "N": 261, "candidate": "bwd:sdpa:cudnn", "error": "RuntimeError: no"},
                       {"shape": "vitl_261tok", "N": 261, "candidate": "bwd:x", "error": "CompilationError: at 3:4:\na | b"}],
              "decision": {"vitl_261tok": {"N": 261, "faster": "route", "partial": False, "fused_fwd": "default",
                                           "fused_bwd": "prerot_128x64", "fused_ms": 0.82, "route_ms": 0.5,
                                           "route_over_fused": 0.61},
                           "vitl_54tok": {"N": 54, "faster": None, "partial": True}}}
    text = md.render([], sweeps=[("h100_2026-11-28", record)])
    assert "Card: NVIDIA H100 80GB HBM3; torch 2.11.0; triton 3.6.0; code abc1234; 4 rows in 41.0 s; " \
           "skipped for time: vitl_54tok bwd:sdpa:flash." in text
    assert "| vitl_261tok | 261 | default + prerot_128x64 | 0.820 | 0.500 | 0.61 | route |" in text
    assert "| vitl_54tok | 54 | - | - | - | - | no verdict (a pass is missing) (partial: candidates skipped) |" in text
    assert "| vitl_261tok | fwd:default | 0.300 | 0.900 | 100.0 | 0.0e+00 | ok, probe exact |" in text
    assert "| vitl_261tok | fwd:prerot | 0.100 | 0.900 | 100.0 | 5.0e-01 | WRONG, probe exact |" in text
    assert "| vitl_261tok | bwd:sdpa:cudnn | - | - | - | - | error: RuntimeError: no |" in text
    assert "| vitl_261tok | bwd:x | - | - | - | - | error: CompilationError: at 3:4: |" in text  # first line only
    assert "dry run" not in text and "No device sweep committed yet." in md.render([])
    text = md.render([], sweeps=[("cpu", {**record, "dry_run": True, "git": None})])
    assert "A dry run (CPU, Triton interpreter)" in text and "code git unknown;" in text


def test_committed_benchmarks_md_is_current():
    """BENCHMARKS.md is what tools/benchmarks_md.py makes of the committed runs (rerun it after
    adding a run or changing a case's counts)."""
    assert load_tool("benchmarks_md").main(["--check"]) == 0


def test_latest_run_judges_a_goal():
    """A run's companion files (`_compiled`, `_model`) are one run; the latest run judges the goal
    and the earlier runs' figures stand beside it."""
    md = load_tool("benchmarks_md")
    from dinov3_fast.bench.runner import BenchRow

    def run(fused_ms):
        rows = [BenchRow("rope_attention", "vitl_261tok", impl, 1.0, ms, 4.0, None, None, None, None, None,
                         None).as_dict() for impl, ms in (("reference", 3.0), ("fused", fused_ms))]
        return {"meta": {"device_type": "cuda", "device": "NVIDIA H100 80GB HBM3"}, "rows": rows}

    text = md.render([(Path("h100_run1.json"), run(1.0)), (Path("h100_run1_compiled.json"), run(0.5)),
                      (Path("h100_run2.json"), run(3.0))])
    assert ("| vitl_261tok | 1.00x (device time not measured; earlier runs: 3.00x in h100_run1 (git unknown, "
            "harness 1)) | not met (1 of 1 earlier: met) | h100_run2.json (git unknown, harness 1) |") in text
    # by start time, then run number -- not by name: run10 follows run9, a later torch follows an
    # earlier one whatever their version strings; a goal naming the H100 ignores other cards
    dated = [(Path("h100_torch2.9_run9.json"), dict(run(3.0), meta={**run(3.0)["meta"], "time": "2026-12-01T10:00:00"})),
             (Path("h100_torch2.11_run10.json"), dict(run(1.0), meta={**run(1.0)["meta"], "time": "2026-12-02T10:00:00"})),
             (Path("h200_run11.json"), dict(run(0.5), meta={"device_type": "cuda", "device": "NVIDIA H200",
                                                           "time": "2026-12-03T10:00:00"}))]
    text = md.render(dated)
    latest = ("| vitl_261tok | 3.00x (device time not measured; earlier runs: 1.00x in h100_torch2.9_run9 (git "
              "unknown, harness 2)) | met (1 of 1 earlier: not met) | h100_torch2.11_run10.json (git unknown, harness 2) |")
    assert latest in text
    # a run's companion file starts later than its main file: still the same run, not a later one
    companion = dict(run(0.5), meta={**run(0.5)["meta"], "time": "2026-12-02T10:05:00"})
    text = md.render([*dated[:2], (Path("h100_torch2.11_run10_compiled.json"), companion)])
    assert latest in text
    assert md._run_order(Path("x_run10.json"), {"date": "2026-12-01"}) > md._run_order(Path("x_run9.json"),
                                                                                       {"date": "2026-12-01"})
