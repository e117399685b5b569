"""The training loop on the CPU: a synthetic-data smoke run, DCP save/kill/resume, corrupted and
partial checkpoints, and the backbone export."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinov3_fast.cli import main as cli_main
from dinov3_fast.train.checkpoint import (
    CheckpointError, check_run_start, complete_checkpoints, export_from_checkpoint, load_checkpoint, resolve_checkpoint,
)
from dinov3_fast.train.config import ConfigError, apply_overrides, get_preset
from dinov3_fast.train.data import source_image_size
from dinov3_fast.train.loop import build_state, train
from dinov3_fast.train.meta_arch import build_backbone


def _cfg(tmp_path, *extra):
    return apply_overrides(get_preset("debug"), [f"train.output_dir={tmp_path}", "train.batch_size_per_gpu=8",
                                                 "evaluation.knn_train_samples=64", "evaluation.knn_val_samples=32",
                                                 *extra])


def test_smoke_run_losses_finite_and_falling(tmp_path):
    """The synthetic-data smoke run: 50 steps of vit_small at 64 px (the `cpu` preset: 2 x 64 px
    global + 4 x 32 px local crops, 4096-prototype heads) with losses finite and falling.

    Batch 2, the smallest the recipe accepts (KoLeo needs two samples): the loss falls as at the
    preset's 16 (first/last-10 means 13.34 -> 12.42 at 2, 13.42 -> 12.52 at 16) while the 50 steps take
    ~20 s instead of ~70 s on 2 idle cores. The kNN probe is cut to 64/32 images (~1 s instead of ~12 s);
    with 32 validation images its accuracy is noise, so only its range is checked."""
    cfg = apply_overrides(get_preset("cpu"), [
        f"train.output_dir={tmp_path}", "student.arch=vit_small", "crops.global_crops_size=64",
        "crops.local_crops_size=32", "train.batch_size_per_gpu=2", "train.steps=50", "train.log_every=10",
        "checkpointing.period=-1", "evaluation.knn_train_samples=64", "evaluation.knn_val_samples=32"])
    hist = train(cfg, progress=False, log_fn=None)
    losses = [s["total_loss"] for s in hist["steps"]]
    assert len(losses) == 50 and all(torch.isfinite(torch.tensor(losses))), losses
    # Measured first-10 minus last-10 mean: 0.88-0.94 over seeds 0-3 and batches 2/4/16, and 0.04 with
    # optim.lr=0 (teacher temperature and EMA alone do not lower it). A 0.5 margin sits between the two,
    # far above the ~0.1 step-to-step noise on the plateau, so it fails only when training does not learn.
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.5, (first, last, losses)
    logged = [s for s in hist["steps"] if "img_per_s" in s]
    assert [s["step"] for s in logged] == [10, 20, 30, 40, 50]
    for k in ("lr", "teacher_temp", "step_time", "peak_mem_gib", "dino_local_crops_loss", "ibot_loss", "koleo_loss"):
        assert k in logged[-1]
    assert hist["checkpoint"] is None and [it for it, _ in hist["knn"]] == [50] and 0.0 <= hist["knn"][-1][1] <= 1.0


def test_resume_gives_identical_next_step_loss(tmp_path):
    cfg = _cfg(tmp_path / "a", "train.steps=4", "checkpointing.period=2", "train.log_every=1",
               "evaluation.knn_val_samples=0")
    full = train(cfg, progress=False, log_fn=None)
    ckpts = complete_checkpoints(tmp_path / "a" / "ckpt")
    assert [p.name for p in ckpts] == ["step_00000002", "step_00000004"]
    cfg_b = apply_overrides(cfg, [f"train.output_dir={tmp_path / 'b'}"])  # a fresh process would rebuild the same
    resumed = train(cfg_b, resume=ckpts[0], progress=False, log_fn=None)
    assert len(resumed["steps"]) == len(full["steps"]) - 2 == 2
    for a, b in zip(full["steps"][2:], resumed["steps"]):
        assert a["total_loss"] == b["total_loss"], (a, b)
        assert a["ibot_loss"] == b["ibot_loss"] and a["koleo_loss"] == b["koleo_loss"]
    s_full = full["state"].arch.state_dict()
    s_res = resumed["state"].arch.state_dict()
    for k in s_full:
        assert torch.equal(s_full[k], s_res[k]), k
    # a resumed run that saves nothing names the checkpoint it resumed from (it named None)
    no_saves = apply_overrides(cfg, [f"train.output_dir={tmp_path / 'c'}", "checkpointing.period=-1"])
    assert train(no_saves, resume=ckpts[0], progress=False, log_fn=None)["checkpoint"] == str(ckpts[0])


def test_resumes_that_would_lose_work_or_change_the_run_are_refused_before_building(tmp_path, monkeypatch):
    """Each refused before the models are built: resuming into an output_dir that holds another
    run's checkpoints (its saves would replace and prune them; the default output_dir made this
    easy), a checkpoint at the run's last step, and another run length (every schedule spans the
    run: the lr jumped ~2600x resuming a 100-step run's end with --steps 200)."""
    cfg = _cfg(tmp_path / "a", "train.steps=2", "checkpointing.period=1", "evaluation.knn_val_samples=0")
    train(cfg, progress=False, log_fn=None)
    first, last = complete_checkpoints(tmp_path / "a" / "ckpt")
    other = _cfg(tmp_path / "b", "train.steps=2", "checkpointing.period=1", "evaluation.knn_val_samples=0")
    train(other, progress=False, log_fn=None)
    monkeypatch.setattr("dinov3_fast.train.loop.build_state", lambda *a, **k: pytest.fail("built the models"))
    with pytest.raises(ConfigError, match=r"holds checkpoints .* would replace and prune them"):
        train(other, resume=first, progress=False, log_fn=None)
    # allowed: a run that saves nothing, and a link to one of the run's own checkpoints
    assert check_run_start(first, apply_overrides(other, ["checkpointing.period=-1"]), tmp_path / "b" / "ckpt") == first
    (tmp_path / "a" / "first").symlink_to(first)
    assert check_run_start(tmp_path / "a" / "first", cfg, tmp_path / "a" / "ckpt") == tmp_path / "a" / "first"
    with pytest.raises(ConfigError, match="is at step 2, and this run stops at step 2 .*nothing to train"):
        train(cfg, resume=last, progress=False, log_fn=None)
    longer = apply_overrides(cfg, ["train.steps=3"])
    with pytest.raises(ConfigError, match="comes from a run of 2 steps, and this run has 3 .* Resume with --steps 2"):
        train(longer, resume=first, progress=False, log_fn=None)
    saved = complete_checkpoints(tmp_path / "a" / "ckpt") + complete_checkpoints(tmp_path / "b" / "ckpt")
    assert [p.name for p in saved] == ["step_00000001", "step_00000002"] * 2  # nothing was touched


def test_corrupted_and_partial_checkpoints(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=2", "checkpointing.period=1", "evaluation.knn_val_samples=0")
    train(cfg, progress=False, log_fn=None)
    root = tmp_path / "ckpt"
    first, second = complete_checkpoints(root)
    assert (root / "latest").read_text() == second.name
    # a save that crashed half-way: a temporary folder, never picked
    partial = root / ".tmp_step_00000003"
    shutil.copytree(second, partial)
    (partial / "MANIFEST.json").unlink()
    assert resolve_checkpoint(root) == second
    with pytest.raises(CheckpointError, match="incomplete: no MANIFEST.json"):
        load_checkpoint(partial, build_state(cfg).arch)
    # a truncated data file in the newest checkpoint: a clear error, and the previous one still loads
    data = next(second.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    state = build_state(cfg)
    with pytest.raises(CheckpointError, match=r"corrupted: file __0_0.distcp has \d+ bytes"):
        load_checkpoint(second, state.arch, state.optimizer)
    with pytest.warns(UserWarning, match="skipping"):
        assert resolve_checkpoint(root) == first
    assert load_checkpoint(first, state.arch, state.optimizer)["step"] == 1
    # the manifest is consistent but DCP itself cannot parse the data
    meta = json.loads((second / "MANIFEST.json").read_text())
    meta["files"]["__0_0.distcp"] = data.stat().st_size
    (second / "MANIFEST.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(second, state.arch, state.optimizer)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope" / "step_00000001", state.arch)


def test_export_loads_into_a_dinov3_backbone(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=1", "evaluation.knn_val_samples=0")
    hist = train(cfg, progress=False, log_fn=None)
    out = export_from_checkpoint(tmp_path / "ckpt", tmp_path / "teacher.safetensors")
    from safetensors.torch import load_file
    sd = load_file(str(out))
    backbone = build_backbone(cfg, drop_path_rate=0.0)
    backbone.load_state_dict(sd, strict=True)
    ref = hist["state"].arch.teacher.backbone.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    pth = export_from_checkpoint(tmp_path / "ckpt", tmp_path / "student.pth", which="student")
    assert set(torch.load(pth)) == set(ref)


def test_cli_train_and_clear_errors(tmp_path, capsys, monkeypatch):
    """--json is rewritten after every logged interval (a run killed by a time limit keeps what it
    measured), and once more at the end."""
    import dinov3_fast.train.loop as loop

    seen = []
    original = loop.train

    def spy_train(cfg, **kwargs):
        def on_log(history):
            kwargs["on_log"](history)
            seen.append(len(json.loads((tmp_path / "h.json").read_text())["steps"]))
        return original(cfg, **{**kwargs, "on_log": on_log})

    monkeypatch.setattr(loop, "train", spy_train)
    rc = cli_main(["train", "--preset", "debug", "--steps", "2", "--batch", "4", "--ops", "reference",
                   "--output-dir", str(tmp_path), "--no-progress", "--json", str(tmp_path / "h.json"),
                   "--log-every", "1", "evaluation.knn_val_samples=0", "checkpointing.period=-1"])
    assert rc == 0 and seen == [1, 2]
    hist = json.loads((tmp_path / "h.json").read_text())
    assert len(hist["steps"]) == 2 and hist["config"]["train"]["ops"] == "reference"
    monkeypatch.undo()
    assert cli_main(["train", "--preset", "debug", "--arch", "vit_nope", "--steps", "1"]) == 2
    # configuration mistakes are one line too, before anything is built
    assert cli_main(["train", "--preset", "nope"]) == 2
    assert cli_main(["train", "--preset", "debug", "optim.lrr=1"]) == 2
    assert cli_main(["train", "--preset", "debug", "train.log_every=0"]) == 2
    assert cli_main(["plan", "--preset", "debug", "optim.lrr=1"]) == 2
    assert "unknown arch" in capsys.readouterr().err
    gram = ["gram.use_loss=true", "crops.gram_teacher_crops_size=64", "gram.it_load_ema_teacher=2",
            "train.image_size=null"]
    assert cli_main(["train", "--preset", "debug", "--steps", "1", "--output-dir", str(tmp_path / "g"), *gram]) == 2
    assert "must be this run's first step" in capsys.readouterr().err
    # DINOv3's asserts: an EMA-teacher Gram loss takes no Gram crops; the iBOT head is always separate
    ema_gram = ["gram.use_loss=true", "gram.ema_teacher=true", "gram.rep_update=false",
                "crops.gram_teacher_crops_size=64"]
    assert cli_main(["train", "--preset", "debug", "--steps", "1", "--output-dir", str(tmp_path / "e"),
                     *ema_gram]) == 2
    assert "crops.gram_teacher_crops_size must be null when gram.ema_teacher=true" in capsys.readouterr().err
    assert cli_main(["train", "--preset", "debug", "--steps", "1", "--output-dir", str(tmp_path / "i"),
                     "ibot.separate_head=false"]) == 2
    assert "ibot.separate_head must be true" in capsys.readouterr().err
    # the periodic kNN probe follows the final one's switch: off without validation images
    assert cli_main(["train", "--preset", "debug", "--steps", "2", "--batch", "4", "--no-progress",
                     "--output-dir", str(tmp_path / "k"), "evaluation.knn_val_samples=0",
                     "evaluation.eval_period_iterations=1", "checkpointing.period=-1"]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["train", "--preset", "debug", "--data", str(empty), "--steps", "1"]) == 2
    assert "contains no images" in capsys.readouterr().err


def test_a_fixed_gpu_under_torchrun_is_refused(monkeypatch):
    """train.device=cuda:N with several ranks would stack them all on GPU N; each rank takes
    cuda:LOCAL_RANK instead (refused before anything touches a GPU)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = apply_overrides(get_preset("debug"), ["train.device=cuda:0"])
    with pytest.raises(ConfigError, match=r"train.device=cuda:0 under torchrun.*here cuda:1"):
        build_state(cfg)


def test_cli_train_error_destroys_the_group_train_made(monkeypatch, capsys):
    """A checkpoint error after train set up its process group (torchrun's, or one CUDA rank's) is
    exit code 2 with the group destroyed: every rank raises it alike, so none waits for a peer."""
    import torch.distributed as dist

    import dinov3_fast.train.loop as loop

    def failing_train(cfg, **kwargs):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        raise CheckpointError("checkpoint /x: MANIFEST.json missing")

    monkeypatch.setattr(loop, "train", failing_train)
    assert cli_main(["train", "--preset", "debug", "--steps", "1", "--no-progress"]) == 2
    assert "MANIFEST.json missing" in capsys.readouterr().err
    assert not dist.is_initialized()


def test_cli_train_then_export_end_to_end(tmp_path):
    """The installed `dinov3-fast` console script in fresh processes: train writes a checkpoint,
    export turns it into a file that the DINOv3-named backbone loads with strict=True."""
    exe = shutil.which("dinov3-fast", path=str(Path(sys.executable).parent)) or shutil.which("dinov3-fast")
    cmd = [exe] if exe else [sys.executable, "-m", "dinov3_fast.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*cmd, "train", "--preset", "debug", "--steps", "2", "--batch", "4", "--log-every", "1",
                          "--output-dir", str(tmp_path / "run"), "--no-progress", "evaluation.knn_val_samples=0"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 2/2" in run.stdout and "total_loss=" in run.stdout, run.stdout
    root = tmp_path / "run" / "ckpt"
    assert (root / "latest").read_text() == "step_00000002"
    assert (root / "step_00000002" / "MANIFEST.json").is_file()
    out = tmp_path / "backbone.safetensors"
    run = subprocess.run([*cmd, "export", str(root), "--out", str(out)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"wrote {out}" in run.stdout
    from safetensors.torch import load_file
    cfg = get_preset("debug")
    backbone = build_backbone(cfg, drop_path_rate=0.0)
    sd = load_file(str(out))
    backbone.load_state_dict(sd, strict=True)
    assert "blocks.0.attn.qkv.weight" in sd and "storage_tokens" in sd and "rope_embed.periods" in sd
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    bad = subprocess.run([*cmd, "export", str(tmp_path / "nope")], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "error:" in bad.stderr


def test_gram_stage_continues_a_pretraining_checkpoint(tmp_path):
    """DINOv3's Gram anchoring continues a pretraining run: a checkpoint saved without a Gram
    teacher loads into a run with gram.use_loss (all but the Gram teacher), whose Gram teacher then
    starts as a copy of the EMA teacher at gram.it_load_ema_teacher = the resume step. A checkpoint
    that lacks other keys is a configuration mismatch, named as one (not as corruption)."""
    pre = train(_cfg(tmp_path / "pre", "train.steps=2", "evaluation.knn_val_samples=0"), progress=False, log_fn=None)
    gram = ["gram.use_loss=true", "crops.gram_teacher_crops_size=32", "gram.it_load_ema_teacher=2", "train.steps=3"]
    logs = []
    hist = train(_cfg(tmp_path / "gram", "evaluation.knn_val_samples=0", "train.log_every=1", *gram),
                 resume=pre["checkpoint"], progress=False, log_fn=logs.append)
    assert len(hist["steps"]) == 1 and math.isfinite(hist["steps"][0]["gram_loss"])
    assert any("holds no Gram teacher: the Gram teacher starts as a copy of the EMA teacher at step 2" in line
               for line in logs), logs
    ema = pre["state"].arch.teacher.backbone.state_dict()  # the checkpoint's EMA teacher, copied at step 2
    copied = hist["state"].arch.gram_teacher.backbone.state_dict()
    assert set(copied) == set(ema) and all(torch.equal(copied[k], ema[k]) for k in ema)
    deeper = _cfg(tmp_path / "deeper", "student.depth=3", "evaluation.knn_val_samples=0", *gram)
    with pytest.raises(ConfigError, match=r"does not match this run's configuration: it has no "
                                          r"model\.student\.backbone\.blocks\.2\."):
        train(deeper, resume=pre["checkpoint"], progress=False, log_fn=None)


def test_source_images_cover_the_gram_crop():
    """By default the source images are 1.25 x the largest crop taken from them, the Gram
    teacher's included; smaller images (set explicitly) still train, with a warning."""
    cfg = apply_overrides(get_preset("debug"), ["train.image_size=null"])
    gram = apply_overrides(cfg, ["crops.gram_teacher_crops_size=64"])
    assert source_image_size(cfg) == 40 and source_image_size(gram) == 80
    with pytest.warns(UserWarning, match=r"crops.gram_teacher_crops_size \(64\) is larger than the source "
                                         r"images \(48 px"):
        build_state(apply_overrides(gram, ["train.image_size=48", "gram.use_loss=true",
                                           "gram.it_load_ema_teacher=0"]))


def test_checkpoints_order_by_save_and_a_fresh_run_keeps_off_them(tmp_path):
    """A fresh run into a folder that holds checkpoints is refused (it would save and prune among
    them). A run resumed from an earlier step saves lower steps after higher ones: pruning and
    resolution go by save order, so its own newest checkpoint is kept and found."""
    cfg = _cfg(tmp_path, "train.steps=4", "checkpointing.period=2", "checkpointing.max_to_keep=2",
               "train.log_every=2", "evaluation.knn_val_samples=0")
    root = tmp_path / "ckpt"
    train(cfg, progress=False, log_fn=None)
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000002", "step_00000004"]
    with pytest.raises(ValueError, match=r"already holds checkpoints.*--resume"):
        train(cfg, progress=False, log_fn=None)
    seen = {}

    def after_step_3s_save(history):  # called when step 4's interval closes, before step 4 saves
        if history["steps"][-1]["step"] == 4:
            seen.update(names=[p.name for p in complete_checkpoints(root)], newest=resolve_checkpoint(root),
                        latest=(root / "latest").read_text())

    every_step = apply_overrides(cfg, ["checkpointing.period=1", "train.log_every=1"])
    hist = train(every_step, resume=root / "step_00000002", progress=False, log_fn=None, on_log=after_step_3s_save)
    assert seen == {"names": ["step_00000004", "step_00000003"], "newest": root / "step_00000003",
                    "latest": "step_00000003"}
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000003", "step_00000004"]
    assert resolve_checkpoint(root) == root / "step_00000004" == Path(hist["checkpoint"])


def test_non_finite_losses_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    """As DINOv3, the third non-finite loss in a row stops the run; a checkpoint step that follows
    a non-finite loss does not save (its weights may be NaN), so the last good checkpoint stays."""
    from dinov3_fast.train.meta_arch import SSLMetaArch
    forward_backward = SSLMetaArch.forward_backward

    def nan_from_the_third_step(self, batch, *, iteration=0, **kwargs):
        loss, logs = forward_backward(self, batch, iteration=iteration, **kwargs)
        return (loss * float("nan") if iteration >= 2 else loss), logs

    monkeypatch.setattr(SSLMetaArch, "forward_backward", nan_from_the_third_step)
    cfg = _cfg(tmp_path, "train.steps=8", "checkpointing.period=2", "train.log_every=4",
               "evaluation.knn_val_samples=0")
    with pytest.raises(RuntimeError, match=r"not finite for 3 steps in a row \(to step 5\).*step_00000002"):
        train(cfg, progress=False, log_fn=None)
    assert [p.name for p in complete_checkpoints(tmp_path / "ckpt")] == ["step_00000002"]
    # a non-finite last step ends the run without the final checkpoint, and says so
    cfg = _cfg(tmp_path / "last", "train.steps=3", "checkpointing.period=2", "evaluation.knn_val_samples=0")
    logs = []
    train(cfg, progress=False, log_fn=logs.append)
    assert [p.name for p in complete_checkpoints(tmp_path / "last" / "ckpt")] == ["step_00000002"]
    assert "step 3: no final checkpoint, the loss was not finite for the last 1 step(s)" in logs, logs


@pytest.mark.parametrize("user_setting", [None, "max_split_size_mb:512"])
def test_cuda_allocator_gets_expandable_segments_unless_the_user_set_it(user_setting):
    """In a fresh process, as the CLI runs it: the setting reaches the allocator's config after
    `import torch`, and a user's own setting is kept (read back through the config's getter; on a GPU
    the train JSON records the segments actually in use)."""
    if not hasattr(torch._C, "_accelerator_getAllocatorSettings"):
        pytest.skip("this torch has no allocator-settings getter to check the setting with (2.13 has one, 2.11 not)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    if user_setting:
        env["PYTORCH_ALLOC_CONF"] = user_setting
    code = ("import torch\nfrom dinov3_fast.train.loop import enable_expandable_segments_unless_configured\n"
            "enable_expandable_segments_unless_configured()\nprint(torch._C._accelerator_getAllocatorSettings())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == (user_setting or "expandable_segments:True")
