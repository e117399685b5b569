"""tools/ingest_device_run.py: a GPU session's tarballs (or a script's $OUT) filed under the
names tools/benchmarks_md.py reads, with the next free run number."""
import json
import tarfile

import pytest
from tools_loader import load_tool

ENV = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0", "git": "abc1234"}


def device_check_out(folder):
    """What device_check.sh leaves in $OUT (contents reduced to what the tool reads)."""
    folder.mkdir()
    (folder / "env.json").write_text(json.dumps(ENV))
    (folder / "bench.json").write_text(json.dumps({"meta": {"date": "2026-11-28", "time": str(folder)}, "rows": []}))
    (folder / "pytest.log").write_text("== 1 passed in 1.0s ==\n")
    (folder / "attn_sweep.json").write_text("{}")
    (folder / "build.log").write_text("built\n")
    return folder


def train_check_out(folder):
    folder.mkdir()
    (folder / "env.json").write_text(json.dumps(ENV))
    (folder / "train_fused.json").write_text("{}")
    return folder


def tarball(folder, path):
    with tarfile.open(path, "w:gz") as tar:
        for f in folder.iterdir():
            tar.add(f, arcname=f.name)


def fake_record(folder):
    """A record as tools/train_results.py builds it, naming the folder it was built from."""
    return {"kind": "dinov3_fast.train_check", "version": 1, "env": ENV, "runs": {}, "plans": {}, "probe": None,
            "ac_full": None, "missing": [], "folder": str(folder)}


@pytest.fixture
def ingest(monkeypatch):
    """The tool, and the folders it built train records from (train_results.build_record replaced:
    the fake train_check output has no real run in it)."""
    tool = load_tool("ingest_device_run")
    saved = []
    monkeypatch.setattr(tool.train_results, "build_record", lambda folder: saved.append(str(folder)) or fake_record(folder))
    monkeypatch.setattr(tool, "file_date", lambda path: "2026-11-28")
    return tool, saved


def test_tarballs_are_filed_with_the_next_run_number(ingest, tmp_path):
    tool, saved = ingest
    files_at, results = tmp_path / "files_at", tmp_path / "results"
    files_at.mkdir()
    tarball(device_check_out(tmp_path / "d"), files_at / "device_check.tgz")
    tarball(train_check_out(tmp_path / "t"), files_at / "train_check.tgz")
    (results / "train").mkdir(parents=True)
    (results / "h100_torch2.11_triton3.6_2026-11-28_run1.json").write_text("{}")
    (results / "h100_torch2.11_triton3.6_2026-11-28_run1_compiled.json").write_text("{}")
    (results / "train" / "h100_2026-11-28.json").write_text("{}")

    planned = tool.ingest(files_at, results, dry_run=True)
    assert not (results / "h100_torch2.11_triton3.6_2026-11-28_run2.json").exists()
    assert not (results / "train" / "h100_2026-11-28_run2.json").exists()
    assert tool.main([str(files_at), "--results", str(results)]) == 0
    stem = "h100_torch2.11_triton3.6_2026-11-28_run2"
    expected = [results / "train" / "h100_2026-11-28_run2.json", results / f"{stem}.json",
                results / "device_logs" / f"{stem}_env.json", results / "device_logs" / f"{stem}_pytest.log",
                results / "attention_sweep" / f"{stem}.json"]
    assert planned == expected
    assert all(p.is_file() for p in expected[1:]) and not list(results.glob("*build*"))
    assert json.loads(expected[2].read_text()) == ENV
    folder = saved[-1]  # tools/train_results.py's record of the unpacked train_check folder
    assert folder.endswith("train_check") and json.loads(expected[0].read_text()) == fake_record(folder)
    with pytest.raises(SystemExit, match=f"already filed as .*{stem}.json"):
        tool.ingest(files_at, results)


def test_a_scripts_own_out_folder(ingest, tmp_path):
    tool, saved = ingest
    results = tmp_path / "results"
    written = tool.ingest(device_check_out(tmp_path / "out"), results)
    assert written[0] == results / "h100_torch2.11_triton3.6_2026-11-28_run1.json" and written[0].is_file()
    assert tool.ingest(train_check_out(tmp_path / "t"), results) == [results / "train" / "h100_2026-11-28.json"]
    assert saved == [str(tmp_path / "t")]
    assert json.loads((results / "train" / "h100_2026-11-28.json").read_text()) == fake_record(tmp_path / "t")


def test_a_run_without_bench_json_keeps_its_number(ingest, tmp_path):
    """A device call killed before its bench wrote files its logs under run1 (dated by env.json);
    the next call with the same card and versions gets run2, not run1 again."""
    tool, _ = ingest
    results = tmp_path / "results"
    out = device_check_out(tmp_path / "killed")
    (out / "bench.json").unlink()
    (out / "attn_sweep.json").unlink()
    assert tool.ingest(out, results) == [results / "device_logs" / "h100_torch2.11_triton3.6_2026-11-28_run1_env.json",
                                         results / "device_logs" / "h100_torch2.11_triton3.6_2026-11-28_run1_pytest.log"]
    written = tool.ingest(device_check_out(tmp_path / "next"), results)
    assert written[0] == results / "h100_torch2.11_triton3.6_2026-11-28_run2.json"


def test_broken_input_files_nothing(ingest, tmp_path, monkeypatch):
    """A truncated tarball, or a train_check output that cannot be summarised, is a clear error and
    leaves results/ untouched."""
    tool, _ = ingest
    files_at, results = tmp_path / "files_at", tmp_path / "results"
    files_at.mkdir()
    tarball(device_check_out(tmp_path / "d"), files_at / "device_check.tgz")
    whole = (files_at / "device_check.tgz").read_bytes()
    (files_at / "device_check.tgz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(SystemExit, match="not a whole tarball"):
        tool.ingest(files_at, results)
    (files_at / "device_check.tgz").write_bytes(whole)
    tarball(train_check_out(tmp_path / "t"), files_at / "train_check.tgz")

    def unreadable(folder):
        raise ValueError("no logged step")

    monkeypatch.setattr(tool.train_results, "build_record", unreadable)
    with pytest.raises(SystemExit, match="cannot be summarised .*no logged step"):
        tool.ingest(files_at, results)
    assert not results.exists()


def test_nothing_to_file_is_a_clear_error(ingest, tmp_path):
    tool, _ = ingest
    with pytest.raises(SystemExit, match="no device_check.tgz / train_check.tgz"):
        tool.ingest(tmp_path, tmp_path / "results")


@pytest.mark.parametrize("gpu, name", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                       ("NVIDIA A100-SXM4-80GB", "a100"), ("Some GPU 9", "some_gpu_9")])
def test_card_name(gpu, name):
    assert load_tool("ingest_device_run").card_name(gpu) == name


def test_a_train_run_filed_twice_is_refused(ingest, tmp_path, monkeypatch):
    tool, _ = ingest
    record = fake_record(tmp_path / "t")
    monkeypatch.setattr(tool.train_results, "build_record", lambda folder: record)
    results = tmp_path / "results"
    (results / "train").mkdir(parents=True)
    out = train_check_out(tmp_path / "t")
    assert tool.ingest(out, results) == [results / "train" / "h100_2026-11-28.json"]
    with pytest.raises(SystemExit, match="already filed as .*h100_2026-11-28.json"):
        tool.ingest(out, results)
