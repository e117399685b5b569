"""checkpoint.py on a tiny module (no training): crashes inside a save, garbage manifests and rank
files, pruning, fsync, and the export's atomic write."""
import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import dinov3_fast.train.checkpoint as ckpt
from dinov3_fast.train.checkpoint import (
    CheckpointError, complete_checkpoints, export_backbone, load_checkpoint, resolve_checkpoint, save_checkpoint,
)


def _model():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(1, 3)).sum().backward()
    opt.step()
    return m, opt


def _rank_state():
    return {"rng": {"torch": torch.get_rng_state(), "python": random.getstate()}, "gram_updates": 0}


def _save(root, step, m, opt, **kw):
    return save_checkpoint(root, step, m, opt, _rank_state(), "a: 1\n", **kw)


@pytest.mark.parametrize("garbage", ["[]", "null", '"text"', '{"files": []}', '{"files": {"rank0.pt": "big"}}'])
def test_a_garbage_manifest_is_a_checkpoint_error_and_the_previous_one_loads(tmp_path, garbage):
    m, opt = _model()
    first = _save(tmp_path, 1, m, opt)
    second = _save(tmp_path, 2, m, opt)
    (second / "MANIFEST.json").write_text(garbage)
    with pytest.raises(CheckpointError, match=rf"{second}.*MANIFEST.json"):
        load_checkpoint(second, m, opt)
    with pytest.warns(UserWarning, match="skipping"):
        assert resolve_checkpoint(tmp_path) == first
    with pytest.warns(UserWarning, match="skipping"):
        assert load_checkpoint(tmp_path, m, opt)["step"] == 1


def test_a_crash_between_the_renames_of_a_resave_leaves_a_complete_copy(tmp_path, monkeypatch):
    """Step 1 saved again: the old copy is moved aside, and the process dies before the new one
    takes its name. The old copy must still be found (and a fresh run must still see it)."""
    m, opt = _model()
    _save(tmp_path, 1, m, opt)
    rename = os.rename

    def dies_on_the_second_rename(src, dst):
        if Path(src).name.startswith(".tmp_step_"):
            raise KeyboardInterrupt  # a kill: nothing after it runs
        rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", dies_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 1, m, opt)
    monkeypatch.setattr(ckpt.os, "rename", rename)
    assert not (tmp_path / "step_00000001").exists()
    assert complete_checkpoints(tmp_path)  # a fresh run into this folder is refused
    assert load_checkpoint(tmp_path, m, opt)["step"] == 1
    _save(tmp_path, 1, m, opt)  # the next save of the step replaces the old copy
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]


def test_pruning_keeps_the_checkpoint_just_saved_when_the_clock_goes_back(tmp_path, monkeypatch):
    m, opt = _model()
    clock = iter([2000.0, 1000.0])  # an NTP step back, or the next job on a node whose clock is behind
    monkeypatch.setattr(ckpt, "time", SimpleNamespace(time=lambda: next(clock)))
    _save(tmp_path, 1, m, opt, max_to_keep=1)
    newest = _save(tmp_path, 2, m, opt, max_to_keep=1)
    assert newest.is_dir() and (tmp_path / "latest").read_text() == newest.name
    assert complete_checkpoints(tmp_path) == [newest]


def test_pruning_keeps_max_to_keep(tmp_path):
    m, opt = _model()
    for step in range(1, 6):
        _save(tmp_path, step, m, opt, max_to_keep=4)
    assert [p.name for p in complete_checkpoints(tmp_path)] == [f"step_{s:08d}" for s in (2, 3, 4, 5)]


def test_pruning_does_not_follow_a_symlink_out_of_the_root(tmp_path):
    m, opt = _model()
    outside = _save(tmp_path / "elsewhere", 1, m, opt)
    root = tmp_path / "root"
    root.mkdir()
    (root / "step_00000000").symlink_to(outside, target_is_directory=True)
    _save(root, 1, m, opt, max_to_keep=1)
    _save(root, 2, m, opt, max_to_keep=1)
    assert (outside / "MANIFEST.json").is_file() and len(list(outside.iterdir())) == 5


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (os.environ["CKPT_TEST_MARKER"],))


def test_rank_files_load_weights_only_and_a_bad_one_is_named(tmp_path, monkeypatch):
    m, opt = _model()
    path = _save(tmp_path, 1, m, opt)
    marker = tmp_path / "code_ran"
    monkeypatch.setenv("CKPT_TEST_MARKER", str(marker))

    def replace_rank_file(write):
        write(path / "rank0.pt")
        meta = json.loads((path / "MANIFEST.json").read_text())
        meta["files"]["rank0.pt"] = (path / "rank0.pt").stat().st_size
        (path / "MANIFEST.json").write_text(json.dumps(meta))

    replace_rank_file(lambda f: torch.save({"step": 1, "world_size": 1, "x": _Payload()}, f))
    with pytest.raises(CheckpointError, match=rf"{path}.*rank0.pt"):
        load_checkpoint(path, m, opt)
    assert not marker.exists()  # the pickle's code never ran
    replace_rank_file(lambda f: f.write_bytes(b"\x80\x02garbage"))
    with pytest.raises(CheckpointError, match=rf"{path}.*rank0.pt"):
        load_checkpoint(path, m, opt)


def test_a_save_fsyncs_every_file_and_both_folders(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync

    def spy(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    m, opt = _model()
    _save(tmp_path, 1, m, opt)
    for name in ("__0_0.distcp", "rank0.pt", "config.yaml", "MANIFEST.json", ".tmp_step_00000001", tmp_path.name):
        assert name in synced, (name, synced)


def test_the_export_is_written_atomically(tmp_path, monkeypatch):
    arch = torch.nn.Module()
    arch.teacher = torch.nn.Module()
    arch.teacher.backbone = torch.nn.Linear(3, 2)
    out = tmp_path / "teacher.safetensors"
    export_backbone(arch, out)
    before = out.read_bytes()
    import safetensors.torch

    def dies_half_way(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way)
    with torch.no_grad():
        arch.teacher.backbone.weight.add_(1)
    with pytest.raises(KeyboardInterrupt):
        export_backbone(arch, out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.safetensors"]


def test_a_checkpoint_from_another_world_size_says_its_random_streams_restart(tmp_path):
    """The per-rank RNG states do not map onto another number of ranks: they are dropped, which
    was silent (a resume that is not bitwise without saying so)."""
    m, opt = _model()
    saved = _save(tmp_path, 1, m, opt)
    state = torch.load(saved / "rank0.pt", weights_only=True)
    with pytest.warns(UserWarning, match="saved by 2 rank.*loads on 1.*random streams start afresh"):
        torch.save({**state, "world_size": 2}, saved / "rank0.pt")
        manifest = json.loads((saved / "MANIFEST.json").read_text())
        manifest["files"]["rank0.pt"] = (saved / "rank0.pt").stat().st_size
        (saved / "MANIFEST.json").write_text(json.dumps(manifest))
        loaded = load_checkpoint(saved, m, opt)
    assert "rng" not in loaded and loaded["step"] == 1
