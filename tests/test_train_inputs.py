"""What a user's inputs meet before and while training: image files, settings out of range,
DINOv3's own YAML keys, paths, and checkpoints saved with another configuration. Each bad input
is a ConfigError naming the argument and what was expected, not a crash deep inside, a wrong
number or lost work."""
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch

from dinov3_fast.cli import main as cli_main
from dinov3_fast.train.checkpoint import export_from_checkpoint, load_checkpoint, resolve_checkpoint
from dinov3_fast.train.config import (
    CheckpointingConfig, ConfigError, apply_overrides, get_preset, update_config, validate,
)
from dinov3_fast.train.data import ImageFolder
from dinov3_fast.train.loop import build_state, train


def _cfg(tmp_path, *extra):
    return apply_overrides(get_preset("debug"), [f"train.output_dir={tmp_path}", "train.batch_size_per_gpu=4",
                                                 "train.steps=1", "evaluation.knn_val_samples=0", *extra])


def _png16(path, gray: np.ndarray) -> None:
    """A 16-bit grayscale PNG (colour type 0), written by hand: Pillow cannot write one."""
    h, w = gray.shape
    raw = b"".join(b"\x00" + gray[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_png_keeps_its_brightness(tmp_path):
    """Pillow reads a 16-bit grayscale PNG in mode I;16 and its convert("RGB") clips at 255, so a
    mid-grey image came out white (1.0 instead of 0.46)."""
    _png16(tmp_path / "a.png", np.full((20, 30), 30000, np.uint16))
    images, _, _ = ImageFolder(tmp_path, 16).batch_with_extents(torch.arange(1))
    assert images.mean().item() == pytest.approx(30000 / 65535, abs=1 / 255)


def test_undecodable_images_are_named(tmp_path):
    """A truncated JPEG raised Pillow's "image file is truncated", naming no file; an empty or
    non-image .jpg an UnidentifiedImageError with a traceback. Both are ConfigErrors naming the
    file, and `dinov3-fast train` reports them in one line."""
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "truncated.JPG").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.jpeg").write_bytes(b"not an image")
    folder = ImageFolder(tmp_path, 16)
    assert [p.name for p in folder.files] == ["notes.jpeg", "ok.jpg", "truncated.JPG"]
    with pytest.raises(ConfigError, match=r"image .*notes\.jpeg could not be decoded"):
        folder.load(0)
    with pytest.raises(ConfigError, match=r"image .*truncated\.JPG could not be decoded \(OSError: image file is "
                                          r"truncated.*remove or replace it"):
        folder.load(2)
    (tmp_path / "notes.jpeg").unlink()
    assert cli_main(["train", "--preset", "debug", "--data", str(tmp_path), "--steps", "1", "--batch", "4",
                     "--no-progress", "--output-dir", str(tmp_path / "run"), "checkpointing.period=-1"]) == 2


@pytest.mark.parametrize("override, message", [
    ("student.patch_size=0", r"student.patch_size must be a positive integer, got 0"),  # was ZeroDivisionError
    ("student.embed_dim=66", r"student.embed_dim \(66\) must be divisible by student.num_heads \(4\)"),
    ("student.n_storage_tokens=-1", r"student.n_storage_tokens must be >= 0"),  # was an IndexError in the model
    ("student.ffn_layer=mlp2", r"student.ffn_layer must be one of \('mlp'"),  # was the model's error, no key
    ("student.in_chans=1", r"student.in_chans must be 3"),  # was a shape error in the patch embedding
    ("student.drop_path_rate=1.5", r"student.drop_path_rate must be in \[0, 1\)"),  # trained silently
    ("optim.lr=-1e-3", r"optim.lr must be >= 0, got -0.001"),  # trained silently, diverging
    ("optim.adamw_beta2=1.5", r"optim.adamw_beta2 must be in \[0, 1\)"),  # was AdamW's "index 1"
    ("teacher.teacher_temp=0", r"teacher.teacher_temp must be > 0"),  # failed in the loss once warmed up
    ("teacher.momentum_teacher=2", r"teacher.momentum_teacher must be in \[0, 1\]"),  # the EMA diverged
    ("dino.head_n_prototypes=0", r"dino.head_n_prototypes must be a positive integer"),
    ("crops.global_crops_scale=[0.9,0.1]", r"crops.global_crops_scale must be \(min, max\) with 0 < min <= max"),
    ("crops.rgb_std=[0,1,1]", r"crops.rgb_std must be three positive values"),  # NaN losses
    ("train.steps=0", r"train.steps must be a positive integer"),  # ran nothing, exit code 0
    ("train.steps=-3", r"train.steps must be a positive integer"),
    ("train.OFFICIAL_EPOCH_LENGTH=0", r"train.OFFICIAL_EPOCH_LENGTH must be a positive integer"),
    ("evaluation.knn_k=0", r"evaluation.knn_k must be a positive integer"),  # a kNN "accuracy" without votes
    ("evaluation.knn_train_samples=0", r"evaluation.knn_train_samples must be a positive integer"),  # failed at the end
])
def test_settings_out_of_range_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(apply_overrides(get_preset("debug"), [override]))


def test_knn_sizes_are_free_without_the_probe():
    validate(apply_overrides(get_preset("debug"), ["evaluation.knn_val_samples=0", "evaluation.knn_train_samples=0"]))


def test_dinov3_yaml_keys_for_features_left_off_load():
    """DINOv3's own recipe files (e.g. configs/train/vitl_im1k_lin834.yaml) carry keys for features
    this trainer does not have, at the value that leaves them off; they raised "unknown config
    section 'MODEL'". They load; the same keys set to turn a feature on are refused by name."""
    dinov3 = {"MODEL": {"META_ARCHITECTURE": "SSLMetaArch", "DEVICE": "cuda", "WEIGHTS": "", "DTYPE": "float32"},
              "dino": {"head_norm_last_layer": False, "koleo_distributed_replicas": 0, "force_weight_norm": False},
              "student": {"fp8_enabled": False, "pretrained_weights": "", "pos_embed_type": "rope", "patch_drop": 0.0},
              "distillation": {"enabled": False, "full_cfg_path": "", "checkpoint_path": ""},
              "hrft": {"enabled": False, "checkpoint_path": ""}, "multidistillation": {"enabled": False},
              "evaluation": {"eval_period_iterations": 12500, "low_freq_every": 5,
                             "config_files": {"high_freq": "benchmark_high_frequency.yaml"}},
              "checkpointing": {"period": 3750, "max_to_keep": 3}}
    cfg = update_config(get_preset("debug"), dinov3)
    assert cfg.evaluation.eval_period_iterations == 12500
    with pytest.raises(ConfigError, match=r"student.fp8_enabled=True: this DINOv3 option is not implemented here"):
        apply_overrides(cfg, ["student.fp8_enabled=true"])
    with pytest.raises(ConfigError, match=r"student.pretrained_weights='w.pth': .* not implemented"):
        apply_overrides(cfg, ["student.pretrained_weights=w.pth"])
    with pytest.raises(ConfigError, match="unknown config section 'schedules'"):
        update_config(cfg, {"schedules": {"lr": {}}})


def test_checkpoints_are_periodic_by_default():
    """DINOv3 saves every 3750 iterations (checkpointing.period); ours defaulted to 0, only at the
    end, so every preset's long run that failed lost all of its work."""
    assert CheckpointingConfig().period == 3750
    assert all(get_preset(name).checkpointing.period > 0 for name in ("cpu", "vitl16_h100", "vit7b16"))


def test_paths_that_cannot_work_are_refused_before_building(tmp_path, capsys):
    """An --output-dir that is a file was a FileExistsError traceback after the model was built; a
    --data that is no folder (DINOv3's "ImageNet:split=TRAIN") an error not naming the argument; a
    --json in a missing folder a NotADirectoryError at the first logged step, ending the run."""
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert cli_main(["train", "--preset", "debug", "--steps", "1", "--output-dir", str(out)]) == 2
        assert f"train.output_dir (--output-dir) {out}: {tmp_path / 'file'} is a file" in capsys.readouterr().err
    assert cli_main(["train", "--preset", "debug", "--steps", "1", "--data", "ImageNet:split=TRAIN",
                     "--output-dir", str(tmp_path / "run")]) == 2
    assert "train.dataset_path (--data) ImageNet:split=TRAIN is not a folder" in capsys.readouterr().err
    assert cli_main(["train", "--preset", "debug", "--steps", "1", "--output-dir", str(tmp_path / "run"),
                     "--json", str(tmp_path / "file" / "h.json")]) == 2
    assert f"--json {tmp_path / 'file' / 'h.json'}: {tmp_path / 'file'} is not a folder" in capsys.readouterr().err


def test_resume_with_another_depth_or_head_size_is_named(tmp_path):
    """A checkpoint of a deeper model loaded its first blocks into a shallower one and then failed
    in the optimizer with KeyError 'wd_multiplier'; another head size or embed_dim was reported as
    a checkpoint that "could not be read", with DCP's traceback inside the message."""
    ckpt = train(_cfg(tmp_path / "a", "student.depth=3"), progress=False, log_fn=None)["checkpoint"]
    cases = {"student.depth=2": r"this run's model has no model\.student\.backbone\.blocks\.2\.",
             "dino.head_n_prototypes=128": r"model\.student\.dino_head\.last_layer\.weight is \[256, 32\] there, "
                                           r"\[128, 32\] here",
             "student.embed_dim=128": r"model\.student\.backbone\.cls_token is \[1, 1, 64\] there, \[1, 1, 128\] here"}
    for override, message in cases.items():
        state = build_state(_cfg(tmp_path / "b", "student.depth=3", override))
        with pytest.raises(ConfigError, match=rf"does not match this run's configuration: .*{message}"):
            load_checkpoint(ckpt, state.arch, state.optimizer)


def test_resume_with_no_steps_left_is_named(tmp_path):
    """Resuming a step-2 checkpoint with --steps 2 (or fewer) trained nothing, saved step 2 again
    and exited 0, as if it had trained."""
    ckpt = train(_cfg(tmp_path, "train.steps=2"), progress=False, log_fn=None)["checkpoint"]
    for steps in (2, 1):
        with pytest.raises(ConfigError, match=rf"is at step 2, and this run stops at step {steps} .*nothing to train"):
            train(_cfg(tmp_path, f"train.steps={steps}"), resume=ckpt, progress=False, log_fn=None)


def test_runs_folder_loads_and_exports_quietly(tmp_path):
    """`--resume runs/x` and `export runs/x` (the --output-dir, whose checkpoints are in ckpt/) said
    "no complete checkpoint"; `export --out <folder>` failed in torch.save; and every save and load
    in one process printed DCP's "torch.distributed is disabled" warning."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(_cfg(tmp_path / "run"), progress=False, log_fn=None)
        assert resolve_checkpoint(tmp_path / "run") == tmp_path / "run" / "ckpt" / "step_00000001"
        (tmp_path / "out").mkdir()
        out = export_from_checkpoint(tmp_path / "run", tmp_path / "out")
    assert out.parent == tmp_path / "out" and out.name.startswith("step_00000001_teacher_backbone")
    assert not [w for w in seen if "torch.distributed is disabled" in str(w.message)]


def test_invalid_yaml_and_devices_are_named(tmp_path, capsys):
    """A YAML syntax error in --config or in an override, and a train.device this machine cannot
    run, were tracebacks (yaml's ScannerError; torch's AttributeError from torch.cuda.set_device
    without a GPU, RuntimeError for an unknown device type); now one line each, exit code 2."""
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: [1\n")
    assert cli_main(["train", "--preset", "debug", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert f"config file {tmp_path / 'bad.yaml'} is not valid YAML" in capsys.readouterr().err
    assert cli_main(["plan", "--preset", "debug", "optim.lr=[1"]) == 2
    assert "override 'optim.lr=[1' is not valid YAML" in capsys.readouterr().err
    assert cli_main(["train", "--preset", "debug", "--steps", "1", "train.device=tpu"]) == 2
    assert "train.device (--device) must be cpu, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli_main(["train", "--preset", "debug", "--steps", "1", "--device", "cuda"]) == 2
        assert "train.device (--device) cuda: no CUDA GPU is present" in capsys.readouterr().err
        assert cli_main(["train", "--preset", "debug", "--steps", "1", "--device", "cuda:1"]) == 2  # argparse took only cuda
        assert "train.device (--device) cuda:1: no CUDA GPU is present" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's one-line usage error, where planner raised a traceback
        cli_main(["plan", "--preset", "debug", "--gpus", "0"])
    assert "argument --gpus: must be at least 1, got 0" in capsys.readouterr().err
    assert cli_main(["plan", "--preset", "debug", "train.output_dir=a: b"]) == 2
    assert "train.output_dir must be a string, got {'a': 'b'} (quote it)" in capsys.readouterr().err


@pytest.mark.parametrize("path", ["runs/exp #2", "0123", "yes", "~", "[x]"])
def test_path_flags_are_taken_as_given(path):
    """--output-dir and --data were re-read as YAML: `#` began a comment, 0123 was octal 83, yes
    was True, ~ null and [x] a list."""
    import argparse

    from dinov3_fast.cli import _train_config
    args = argparse.Namespace(config=None, preset="debug", data=path, steps=None, batch=None, ops=None, ac=None,
                              output_dir=path, log_every=None, device=None, profile_steps=None, compile=None,
                              arch=None, opts=[])
    cfg = _train_config(args)
    assert cfg.train.output_dir == path and cfg.train.dataset_path == path
