"""tools/train_results.py: issue #7's figures and goals from train_check.sh's JSON (synthetic dicts,
no training)."""
import json

import pytest
from tools_loader import load_tool

GIB = 2**30


@pytest.fixture(scope="module")
def tr():
    return load_tool("train_results")


def _train(ops, img_s, peak, *, batch=96, arch="vit_large", mfu_per_img_s=0.002, warmup_img_s=10.0, log_every=4,
           steps=12, compile=True):
    """A `dinov3-fast train --json` dict: logged steps every log_every, the first interval slow (warm-up)."""
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "total_loss": 10.0 - step * 0.1}
        if step % log_every == 0:
            rate = warmup_img_s if step == log_every else img_s
            row.update(img_per_s=rate, step_time=batch / rate, peak_mem_gib=peak,
                       mfu=None if mfu_per_img_s is None else rate * mfu_per_img_s)
        rows.append(row)
    cfg = {"student": {"arch": arch, "patch_size": 16}, "crops": {"global_crops_size": 224, "local_crops_size": 96,
                                                                   "local_crops_number": 8},
           "train": {"batch_size_per_gpu": batch, "ops": ops, "ac": "selective", "compile": compile},
           "compute_precision": {"param_dtype": "bf16"}}
    return {"config": cfg, "steps": rows, "knn": [], "checkpoint": None, "torch": "2.11.0"}


def _plan(ops, total_gib, batch=96, arch="vit_large"):
    return {"arch": arch, "world_size": 1, "batch_per_rank": batch, "ac": "selective", "ops": ops,
            "total": int(total_gib * GIB)}


def _out_dir(tmp_path, *, gpu="NVIDIA H100 80GB HBM3", fused=(240.0, 50.0), reference=(180.0, 66.0),
             plans=(52.0, 63.0), probe=None, ac_full=None, skip=()):
    env = {"gpu": gpu, "torch": "2.11.0", "triton": "3.6.0", "driver": "580", "git": "abc"}
    files = {"env.json": env,
             "train_fused.json": _train("fused", *fused), "train_reference.json": _train("reference", *reference),
             "plan_fused.json": _plan("fused", plans[0]), "plan_reference.json": _plan("reference", plans[1])}
    if probe is not None:
        files["probe.json"] = probe
    if ac_full is not None:
        files["probe_ac_full.json"] = ac_full
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if name not in skip:
            (tmp_path / name).write_text(json.dumps(data))
    return tmp_path


def _goal(tr, record, key):
    return tr.evaluate(next(g for g in tr.GOALS if g.key == key), record)


def test_steady_rate_leaves_out_the_warmup_interval(tr):
    s = tr.summarise_train(_train("fused", 240.0, 50.0))
    assert s["img_per_s"] == pytest.approx(240.0)  # the 10 img/s first interval is warm-up
    assert s["warmup_steps"] == 4 and s["steps"] == 12
    assert s["mfu"] == pytest.approx(0.48)
    assert s["step_time_ms"] == pytest.approx(1e3 * 96 / 240)
    assert s["peak_mem_gib"] == 50.0 and s["batch"] == 96 and s["crops"] == [224, 96, 8]


def test_steady_rate_is_time_weighted(tr):
    data = _train("fused", 100.0, 1.0, steps=12)
    data["steps"][11].update(img_per_s=300.0, step_time=96 / 300.0)  # intervals 5-8 at 100, 9-12 at 300 img/s
    s = tr.summarise_train(data)
    assert s["img_per_s"] == pytest.approx(2 * 96 / (96 / 100 + 96 / 300))  # 150, not the mean 200


def test_no_logged_step_is_a_clear_error(tr):
    data = _train("fused", 1.0, 1.0, log_every=100)
    with pytest.raises(ValueError, match="no logged step"):
        tr.summarise_train(data)


def test_goals_met_and_not_met(tr, tmp_path):
    record = tr.build_record(_out_dir(tmp_path))
    assert record["missing"] == []
    assert _goal(tr, record, "speedup") == (pytest.approx(240 / 180), "met")
    assert _goal(tr, record, "mem_saving") == (pytest.approx(1 - 50 / 66), "met")
    assert _goal(tr, record, "mfu") == (pytest.approx(0.48), "met")
    assert tr.planner_error(record, "fused") == pytest.approx(52 / 50 - 1)
    assert tr.planner_error(record, "reference") == pytest.approx(63 / 66 - 1)
    assert _goal(tr, record, "plan_error") == (pytest.approx(1 - 63 / 66), "met")  # the worse of the two
    assert _goal(tr, record, "largest")[1].startswith("not measured")

    slow = tr.build_record(_out_dir(tmp_path / "slow", fused=(200.0, 60.0), reference=(180.0, 66.0)))
    assert _goal(tr, slow, "speedup")[1] == "not met"
    assert _goal(tr, slow, "mem_saving")[1] == "not met"  # 9% less
    assert _goal(tr, slow, "plan_error") == (pytest.approx(1 - 52 / 60), "not met")


def test_a_figure_never_rounds_onto_the_other_side_of_its_threshold(tr, tmp_path):
    """19.96% less memory is "not met" against 20%: the row must not print it as 20.0%; a planner
    error of 10.04% is "not met" against at most 10%: not 10.0%."""
    record = tr.build_record(_out_dir(tmp_path, fused=(240.0, 0.8004 * 66.0), plans=(0.8004 * 66.0 * 1.1004, 63.0)))
    rows = {g.key: row for g, row in zip(tr.GOALS, tr.goal_rows([("run.json", record)]))}
    assert "| 19.96% (b96) | not met |" in rows["mem_saving"]
    assert "| 10.04% (b96) | not met |" in rows["plan_error"]
    assert tr.figure_text(0.1996, 0.2, scale=100, digits=1) == "19.96"
    assert tr.figure_text(0.0996, 0.1, higher_is_better=False, scale=100, digits=1) == "10.0"  # 9.96 is met: rounds freely
    assert tr.figure_text(2.996, 3.0) == "2.996" and tr.figure_text(3.004, 3.0) == "3.00"


def test_goals_not_measured(tr, tmp_path):
    h200 = tr.build_record(_out_dir(tmp_path, gpu="NVIDIA H200"))
    assert _goal(tr, h200, "mfu") == (None, "not measured (not an H100: NVIDIA H200)")
    assert _goal(tr, h200, "speedup")[1] == "met"  # the ratios need a GPU, not an H100

    cpu = tr.build_record(_out_dir(tmp_path / "cpu", gpu=None))
    assert all(_goal(tr, cpu, g.key) == (None, "not measured (no GPU in this run)") for g in tr.GOALS)

    noref = tr.build_record(_out_dir(tmp_path / "noref", skip=("train_reference.json",)))
    assert noref["missing"] == ["train_reference.json"]
    assert _goal(tr, noref, "speedup") == (None, "not measured (missing the reference run)")
    assert _goal(tr, noref, "mfu")[1] == "met"
    assert _goal(tr, noref, "plan_error")[1].startswith("not measured")


def test_runs_that_differ_in_more_than_ops_are_not_compared(tr, tmp_path):
    record = tr.build_record(_out_dir(tmp_path))
    record["runs"]["reference"]["batch"] = 64
    assert _goal(tr, record, "mem_saving") == (None, "not measured (the two runs differ in more than ops)")
    record["runs"]["reference"]["batch"] = 96
    record["runs"]["fused"]["arch"] = "vit_small"
    assert _goal(tr, record, "speedup")[1].startswith("not measured (the fused run is not ViT-L/16")


def test_largest_batch_from_the_probe(tr, tmp_path):
    def trials(*pairs):
        return {"trials": [{"batch": b, "ok": ok} for b, ok in pairs]}
    probe = {"fused": trials((104, True), (112, True), (120, False)), "reference": trials((104, False))}
    record = tr.build_record(_out_dir(tmp_path, probe=probe))
    assert tr.largest_batch(record, "fused") == "112 (120 OOM)"
    assert tr.largest_batch(record, "reference") == "96 (104 OOM)"  # the timed run at 96 trained
    assert _goal(tr, record, "largest") == ("fused 112 (120 OOM) / reference 96 (104 OOM)", "reported")
    record["probe"]["fused"] = trials((104, True))
    assert tr.largest_batch(record, "fused") == ">= 104 (no OOM)"


def test_memory_saving_under_full_ac_from_its_probe(tr, tmp_path):
    """The full-AC goal compares the two settings' peaks at the largest batch both trained under
    train.ac=full; it is not measured without both, at another AC, or with no common batch."""
    def entry(ac, *trials):
        return {"ac": ac, "trials": [{"batch": b, "ok": peak is not None, "peak_mem_gib": peak, "plan_gib": 1.0}
                                     for b, peak in trials]}
    ac_full = {"fused": entry("full", (128, 12.0), (256, 22.0)), "reference": entry("full", (128, 18.0), (256, 37.0))}
    record = tr.build_record(_out_dir(tmp_path, ac_full=ac_full))
    value, status = _goal(tr, record, "mem_saving_full_ac")
    assert value == pytest.approx(1 - 22 / 37) and status == "met"
    assert _goal(tr, record, "mem_saving")[1] == "met"  # the timed runs' own figure: 1 - 50 / 66
    row = next(r for r in tr.goal_rows([("h100.json", record)]) if "full AC probe" in r)
    assert "| 40.5% (b256, full AC, eager) | met |" in row
    assert any("| fused | full | 256 | yes | 22.00 |" in line for line in tr.record_lines("h100.json", record))
    record["ac_full"]["reference"] = entry("full", (128, 18.0), (256, None))  # the reference ran out of memory
    assert _goal(tr, record, "mem_saving_full_ac") == (pytest.approx(1 - 12 / 18), "met")
    record["ac_full"]["reference"] = entry("selective", (256, 37.0))
    assert _goal(tr, record, "mem_saving_full_ac") == (
        None, "not measured (the full-AC probe did not run with train.ac=full)")
    record["ac_full"] = {"fused": entry("full", (256, 22.0))}
    assert _goal(tr, record, "mem_saving_full_ac")[1].startswith("not measured (no full-AC probe of both")


def test_goal_rows_and_saved_record(tr, tmp_path):
    rows = tr.goal_rows([])
    assert len(rows) == len(tr.GOALS) and all("not measured (no GPU train run committed yet)" in r for r in rows)
    out = _out_dir(tmp_path)
    saved = tmp_path / "results" / "h100.json"
    assert tr.main([str(out), "--save", str(saved)]) == 0
    records = tr.load_records(saved.parent)
    assert [n for n, _ in records] == ["h100.json"]
    rows = tr.goal_rows(records)
    assert ("| 7 | ViT-L/16 training img/s, fused >= 1.2x reference | vitl16_h100 | 1.33x (b96) | met "
            "| h100.json (abc) |") in rows
    assert "| 7 | ViT-L/16 training MFU >= 40% on H100 (fused) | vitl16_h100 | 48.0% (b96) | met | h100.json (abc) |" in rows
    lines = tr.record_lines("h100.json", records[0][1])
    assert any(line.startswith("| fused | vit_large | 96 | 2x224 + 8x96 | selective | True | 240.0 |")
               for line in lines)
    (saved.parent / "bench.json").write_text(json.dumps({"meta": {}, "rows": []}))
    with pytest.raises(ValueError, match="not a train_check record"):
        tr.load_records(saved.parent)


def test_benchmarks_md_shows_issue_7_as_not_measured_without_records():
    md = load_tool("benchmarks_md")
    text = md.render([])
    assert "| 7 | ViT-L/16 training MFU >= 40% on H100 (fused) | vitl16_h100 | - | not measured" in text
    assert "No GPU training run committed yet." in text


def test_single_interval_and_unreadable_files_are_not_measured(tr, tmp_path):
    """A run with one logged interval has no steady rate (it would count the warm-up); an env.json
    or train JSON cut short by a time limit is listed as missing, not a crash."""
    one = tr.summarise_train(_train("fused", 240.0, 50.0, steps=4))
    assert one["img_per_s"] is None and one["mfu"] is None
    out = _out_dir(tmp_path)
    (out / "train_fused.json").write_text(json.dumps(_train("fused", 240.0, 50.0, steps=4)))
    assert _goal(tr, tr.build_record(out), "speedup") == (None, "not measured (a run has no interval after its warm-up)")
    (out / "env.json").write_text("")
    (out / "train_reference.json").write_text('{"config": ')
    record = tr.build_record(out)
    assert set(record["missing"]) == {"env.json", "train_reference.json"}
    assert _goal(tr, record, "mfu")[1].startswith("not measured")


def test_records_name_the_precision_path(tr):
    """A record says whether its one-GPU run had bf16 modules under 1-rank FSDP2 or fp32 modules
    under autocast; records made before the field read as the old autocast path."""
    assert tr.precision_path({"param_dtype": "bf16", "single_rank_fsdp": True}) == "bf16 modules under 1-rank FSDP2"
    assert tr.precision_path({"param_dtype": "bf16", "single_rank_fsdp": False}) == "fp32 modules under bf16 autocast"
    assert tr.precision_path({"param_dtype": "fp32"}) == "fp32"
    run = tr.summarise_train(_train("fused", 240.0, 50.0))
    assert run["precision"] == "fp32 modules under bf16 autocast"  # the fixture's config has no single_rank_fsdp
    del run["precision"]
    record = {"env": {"git": "abcdef123", "git_dirty": True}, "runs": {"fused": run}, "plans": {}}
    assert f"Precision path: {tr.OLD_PRECISION}." in tr.record_lines("old.json", record)
    assert "code abcdef1*." in tr.record_lines("old.json", record)[2]
