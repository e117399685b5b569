"""Atomic torch.distributed.checkpoint (DCP) saves, verified loads, and the backbone export.

Layout under the run's checkpoint root:

    step_00000100/      a complete checkpoint: DCP files (model = student + teacher + Gram teacher
                        + loss buffers, optim), rank<r>.pt (step, RNG states of rank r),
                        config.yaml, and MANIFEST.json (every file's size) written last
    .tmp_step_00000200/ a save in progress (or one that crashed): never loaded
    .old_step_00000100/ the previous copy of a step being saved again, until the new one is in place
                        (a crash between the two renames leaves it as that step's copy: loads find it)
    latest              the name of the most recently saved complete checkpoint (for people and
                        scripts; loads order checkpoints by the manifest's `saved_at`)

A save writes everything into the temporary folder, then rank 0 writes the manifest and renames
the folder (an atomic rename on one filesystem), so a crash at any point leaves the previous
checkpoint loadable. Every file and both folders are fsynced before the rename is, and pruning
never removes the checkpoint just saved. A step that fails on one rank (rank 0's rename, one rank's
file) raises on every rank, not only there: the others would otherwise go on and wait in their next
collective until the process group timed out. A load checks the manifest (present, every file there with its size) before
DCP reads anything, and raises `CheckpointError` naming the folder and the problem; rank 0 resolves
and checks the folder for every rank, so all load the same one and fail together. It then
compares the checkpoint's entries with the model's: a checkpoint without a Gram teacher (a
pretraining run, which a Gram-anchoring stage continues, as in DINOv3) loads everything else and
leaves the Gram teacher uninitialised; any other missing entry, a model entry the run does not
have (another depth: DCP would load the rest and say nothing) or a tensor of another shape is a
`ConfigError` naming them (the run's configuration does not match the checkpoint's), not
corruption. Loads and exports also take a run's train.output_dir (its checkpoints are in ckpt/).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
)

from dinov3_fast.train.config import ConfigError

MANIFEST = "MANIFEST.json"
LATEST = "latest"
RUN_ROOT = "ckpt"  # the checkpoint root inside a run's train.output_dir (loop.py)
GRAM_TEACHER_PREFIX = "model.gram_teacher."  # the Gram teacher's keys in the checkpoint (DCP's flattened names)


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, incomplete or corrupted."""


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP without its warning that one process saves or loads alone: given no_dist=True on
    purpose, it warns at every call, so every checkpoint of a single-process run printed it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _check_all_ranks(error: Exception | None, what: str) -> None:
    """A synchronisation point after work that may fail on some ranks only (a write, a rename):
    every rank learns whether any rank failed and, if so, raises (the failing rank its own error,
    the others a CheckpointError naming it). Without it a rank whose peer failed would carry on,
    believing the step done, and wait in its next collective until the process group times out."""
    errors: list[str | None] = [None]
    if _dist_on() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        raise CheckpointError(f"{what} failed on rank {failed[0][0]}: {failed[0][1]}")


def _from_rank0(compute, what: str):
    """`compute()` on rank 0 only, its (picklable) result sent to every rank, so all ranks act on
    the same answer; an error there is raised on every rank (ConfigError stays a ConfigError,
    anything else is a CheckpointError on the other ranks)."""
    value, error = None, None
    if _rank_world()[0] == 0:
        try:
            value = compute()
        except Exception as exc:  # noqa: BLE001  (re-raised below, on every rank)
            error = exc
    if not (_dist_on() and dist.get_world_size() > 1):
        if error is not None:
            raise error
        return value
    box = [(value, None if error is None else (isinstance(error, ConfigError), type(error).__name__, str(error)))]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    value, failed = box[0]
    if failed is not None:
        is_config, kind, message = failed
        raise ConfigError(message) if is_config else CheckpointError(f"{what} failed on rank 0: {kind}: {message}")
    return value


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def save_checkpoint(root: str | Path, step: int, arch: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    rank_state: dict[str, Any], config_yaml: str | None = None, max_to_keep: int = 0) -> Path:
    """Save atomically to root/step_<step>; every rank calls it. Returns the final folder."""
    root = Path(root)
    rank, world = _rank_world()
    final, tmp = step_dir(root, step), root / f".tmp_step_{step:08d}"
    # Each step that may fail on some ranks only ends in _check_all_ranks (also the barrier the
    # next step needs): a failure anywhere raises on every rank, and the previous checkpoint stays.
    error = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except Exception as exc:  # noqa: BLE001  (raised on every rank by _check_all_ranks)
            error = exc
    _check_all_ranks(error, f"creating {tmp}")
    model_sd, optim_sd = get_state_dict(arch, optimizer)
    # DCP gathers every rank's write result and raises on all of them if one failed
    with _quiet_single_process():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), no_dist=not _dist_on())
    try:
        with open(tmp / f"rank{rank}.pt", "wb") as f:
            torch.save({**rank_state, "step": step, "world_size": world}, f)
            f.flush()
            os.fsync(f.fileno())
    except Exception as exc:  # noqa: BLE001
        error = exc
    _check_all_ranks(error, f"writing the rank state into {tmp}")
    if rank == 0:
        try:
            _finalise(root, tmp, final, step, world, config_yaml, max_to_keep)
        except Exception as exc:  # noqa: BLE001
            error = exc
    _check_all_ranks(error, f"completing checkpoint {final}")
    return final


def _finalise(root: Path, tmp: Path, final: Path, step: int, world: int, config_yaml: str | None,
              max_to_keep: int) -> None:
    """Rank 0, once every rank's files are in `tmp`: the manifest, the rename to `final`, `latest`, pruning."""
    if config_yaml is not None:
        _write_synced(tmp / "config.yaml", config_yaml)
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    _write_synced(tmp / MANIFEST, json.dumps({"step": step, "world_size": world, "saved_at": time.time(),
                                              "files": files}, indent=1))
    _fsync_dir(tmp)  # the files' names, before the rename makes them a checkpoint
    replaced = root / f".old_step_{step:08d}"
    if final.exists():  # a re-save of this step: the old copy stays complete until the new one is in place
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(tmp, final)
    _write_synced(root / f".{LATEST}.tmp", final.name)
    os.replace(root / f".{LATEST}.tmp", root / LATEST)
    _fsync_dir(root)  # the renames themselves survive a power loss
    shutil.rmtree(replaced, ignore_errors=True)
    if max_to_keep > 0:  # never `final` itself, whatever the clock said (saved_at is wall time)
        others = [p for p in complete_checkpoints(root) if p != final]
        for old in others[:max(0, len(others) - (max_to_keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint; CheckpointError if it is missing, partial or altered."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no {MANIFEST} (the save did not finish)")
    try:
        meta = json.loads(manifest.read_text())
        files = meta["files"]
        if not (isinstance(files, dict) and all(type(size) is int for size in files.values())):
            raise ValueError("'files' is not a map of names to sizes")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupted: unreadable {MANIFEST} ({exc})") from None
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupted: file {name} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path} is corrupted: file {name} has {f.stat().st_size} bytes, "
                                  f"the manifest says {size}")
    return meta


def _saved_at(path: Path) -> float:
    """When the checkpoint at `path` was saved: its manifest's `saved_at` (older manifests: the
    manifest file's mtime, written last)."""
    manifest = path / MANIFEST
    try:
        return float(json.loads(manifest.read_text())["saved_at"])
    except (ValueError, KeyError, TypeError):
        return manifest.stat().st_mtime


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Folders step_* under root that have a manifest, in the order they were saved, oldest first
    (not by step: a run resumed from an earlier step saves lower steps after higher ones). A
    .old_step_N with a manifest counts where step_N has none: a re-save of step N died between
    moving the old copy aside and renaming the new one, so it is that step's only copy."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / MANIFEST).is_file()]
    found += [p for p in root.glob(".old_step_*") if (p / MANIFEST).is_file()
              and not (root / p.name.removeprefix(".old_") / MANIFEST).is_file()]
    return sorted(found, key=lambda p: (_saved_at(p), p.name))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a checkpoint root, or a run's train.output_dir (whose root is its
    RUN_ROOT sub-folder) -> the root's most recently saved checkpoint that verifies."""
    path = Path(path)
    if (path / MANIFEST).exists() or path.name.startswith("step_") or path.name.startswith(".tmp_step_"):
        verify_checkpoint(path)
        return path
    found = complete_checkpoints(path) or complete_checkpoints(path / RUN_ROOT)
    for cand in reversed(found):
        try:
            verify_checkpoint(cand)
            return cand
        except CheckpointError as exc:
            warnings.warn(f"skipping {exc}", stacklevel=2)
    raise CheckpointError(f"no complete checkpoint under {path}" + ("" if path.exists() else " (it does not exist)"))


def check_run_start(source: str | Path | None, cfg, ckpt_root: str | Path) -> Path | None:
    """What a run of `cfg` saving under `ckpt_root` starts from: None for a fresh run, else the
    checkpoint it resumes from `source` (`train` loads the folder returned). Checked before any
    model is built (a ViT-7B takes minutes to build); rank 0 decides for every rank once a process
    group exists. ConfigError where the run would lose work or train on other numbers than the run
    it continues:
    - the run saves (checkpointing.period >= 0 and an output_dir) and `ckpt_root` holds checkpoints
      other than the one resumed from (a fresh run: any; else another run's, or this run's own after
      a preemption when the command still names its first source): its saves would replace and
      prune them;
    - the checkpoint is at or past this run's last step: nothing to train;
    - the checkpoint's run spans another number of steps (train.steps, or optim.epochs x
      OFFICIAL_EPOCH_LENGTH, read from its config.yaml): every schedule (lr, weight decay, teacher
      momentum and temperature, loss weights) spans the run, so each would jump to another point.
      A Gram-anchoring stage (its checkpoint's run had no Gram loss, this one has) is a new stage on
      its own schedules, as in DINOv3, and may differ; so may a checkpoint whose config.yaml
      lacks those keys."""
    root = Path(ckpt_root)
    saves = cfg.checkpointing.period >= 0 and cfg.train.output_dir
    if source is None:
        if saves and complete_checkpoints(root):
            raise ConfigError(f"train.output_dir {root.parent} already holds checkpoints ({root}): resume from them "
                              f"(--resume {root}) or choose another output_dir")
        return None

    def check() -> str:
        found = resolve_checkpoint(source)
        if saves and complete_checkpoints(root) and found.resolve().parent != root.resolve():
            raise ConfigError(f"train.output_dir {root.parent} holds checkpoints ({root}) and this run resumes from "
                              f"{found}: its saves would replace and prune them. If they are this run's own (a "
                              f"preempted run), resume from them: --resume {root}; else choose another output_dir")
        step, total = verify_checkpoint(found)["step"], cfg.total_steps
        if step >= total:
            raise ConfigError(f"checkpoint {found} is at step {step}, and this run stops at step {total} "
                              f"(train.steps, --steps): nothing to train")
        saved_total, saved_gram = _saved_run_length(found)
        gram_stage = cfg.gram.use_loss and not saved_gram
        if saved_total is not None and saved_total != total and not gram_stage:
            raise ConfigError(f"checkpoint {found} comes from a run of {saved_total} steps, and this run has "
                              f"{total} (train.steps, --steps): every schedule spans the run, so the lr, weight "
                              f"decay, teacher momentum and temperature would jump to other values at step {step}. "
                              f"Resume with --steps {saved_total}, or start a new run")
        return str(found)

    return Path(_from_rank0(check, f"checking the resume from {source}"))


def _saved_run_length(checkpoint: Path) -> tuple[int | None, bool]:
    """(run length, Gram loss on) of the run that saved `checkpoint`, read from the raw keys of its
    config.yaml (train.steps, else optim.epochs x train.OFFICIAL_EPOCH_LENGTH; gram.use_loss), not
    through load_config, so a key retired since does not stop a resume; None where they are missing."""
    import yaml
    try:
        saved = yaml.safe_load((checkpoint / "config.yaml").read_text()) or {}
        train, optim, gram = saved.get("train") or {}, saved.get("optim") or {}, saved.get("gram") or {}
        total = train.get("steps")
        if total is None:
            total = int(optim["epochs"]) * int(train["OFFICIAL_EPOCH_LENGTH"])
        return int(total), bool(gram.get("use_loss", False))
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError):
        return None, False


def _expected_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint entries (DCP's flattened names -> this run's tensors) that `state` = {"model":
    model state dict[, "optim": optimizer state dict]} reads: every model tensor and every
    per-parameter optimizer state (the optimizer's param_groups are left to DCP)."""
    out = {f"model.{fqn}": t for fqn, t in state["model"].items()}
    for fqn, per_param in state.get("optim", {}).get("state", {}).items():
        out |= {f"optim.state.{fqn}.{name}": t for name, t in per_param.items()}
    return out


def _saved_entries(path: Path) -> dict[str, Any]:
    """The checkpoint's entries (flattened name -> DCP storage metadata), from its DCP metadata."""
    try:
        return dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as exc:  # noqa: BLE001  (an unreadable .metadata file)
        raise CheckpointError(f"checkpoint {path} could not be read: {type(exc).__name__}: {exc}") from exc


def _shown(items: list[str]) -> str:
    """The first five of `items`, and how many there are in all if more."""
    return ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")


def _loads_without_gram_teacher(path: Path, state: dict[str, Any]) -> bool:
    """Whether the checkpoint at `path` lacks exactly the Gram teacher that `state` reads (saved by
    a run without one: the model loads the rest and the Gram teacher stays uninitialised); False
    when it holds everything. A checkpoint saved with another configuration is a ConfigError naming
    what differs, not corruption and never a partial load: entries `state` reads that it lacks
    (other than the Gram teacher's), model entries it holds that `state` does not read (but a Gram
    teacher's: a run may leave Gram anchoring off), and tensors of another shape."""
    saved, expected = _saved_entries(path), _expected_tensors(state)
    missing = sorted(k for k in expected if k not in saved)
    problems = []
    if others := [k for k in missing if not k.startswith(GRAM_TEACHER_PREFIX)]:
        problems.append(f"it has no {_shown(others)}")
    if extra := sorted(k for k in saved if k.startswith("model.") and k not in expected
                       and not k.startswith(GRAM_TEACHER_PREFIX)):
        problems.append(f"this run's model has no {_shown(extra)}")
    if shapes := [f"{k} is {list(saved[k].size)} there, {list(t.shape)} here" for k, t in expected.items()
                  if k in saved and hasattr(saved[k], "size") and tuple(saved[k].size) != tuple(t.shape)]:
        problems.append(_shown(shapes))
    if problems:
        raise ConfigError(f"checkpoint {path} does not match this run's configuration: {'; '.join(problems)}; "
                          f"resume with the configuration it was saved with (its config.yaml)")
    return bool(missing)


def load_checkpoint(path: str | Path, arch: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
                    ) -> dict[str, Any]:
    """Load model (and optimizer) state into `arch`, resharding as needed. Returns this rank's
    saved rank state (step, RNG states, "gram_initialized") and "checkpoint", the folder it loaded
    (a root or run folder resolves to its newest complete checkpoint); every rank calls it. A checkpoint
    without the Gram teacher `arch` has (saved by a pretraining run) loads the rest and returns
    "gram_initialized" False, so the loop's rule (copy the EMA teacher at
    gram.it_load_ema_teacher) starts it; other missing keys raise ConfigError."""
    rank, world = _rank_world()
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(arch, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    else:
        state = {"model": get_model_state_dict(arch)}

    def resolve() -> tuple[str, bool]:
        found = resolve_checkpoint(path)
        return str(found), _loads_without_gram_teacher(found, state)

    # Rank 0 picks and checks the checkpoint for all (the keys are the same on every rank): ranks that
    # resolved a root on their own could pick different folders (one being written or pruned, a lagging
    # view of a network filesystem), and one rank's CheckpointError would leave the others in DCP's collectives.
    found, without_gram_teacher = _from_rank0(resolve, f"resolving checkpoint {path}")
    path = Path(found)
    try:  # the Gram teacher's entries, if not in the checkpoint, keep their values
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path),
                     planner=DefaultLoadPlanner(allow_partial_load=without_gram_teacher), no_dist=not _dist_on())
    except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(f"checkpoint {path} could not be read: {type(exc).__name__}: {exc}") from exc
    if optimizer is not None:
        set_state_dict(arch, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_model_state_dict(arch, state["model"])
    rank_file = path / f"rank{rank}.pt"
    if not rank_file.is_file():
        rank_file = path / "rank0.pt"
    rank_state, error = None, None
    try:  # weights_only: tensors and plain Python values, never code a crafted file could run
        rank_state = torch.load(rank_file, weights_only=True)
        if not isinstance(rank_state, dict):
            raise TypeError(f"a {type(rank_state).__name__}, not a dict")
    except Exception as exc:  # noqa: BLE001  (raised on every rank by _check_all_ranks)
        error = CheckpointError(f"checkpoint {path} is corrupted: file {rank_file.name} could not be read: "
                                f"{type(exc).__name__}: {exc}")
    _check_all_ranks(error, f"reading the rank state of checkpoint {path}")
    if rank_state.get("world_size") != world:  # another world size: RNG streams do not map to ranks
        rank_state.pop("rng", None)
        if rank == 0:
            warnings.warn(f"checkpoint {path} was saved by {rank_state.get('world_size')} rank(s) and loads on "
                          f"{world}: the model, optimizer and step resume, the random streams start afresh "
                          f"(the run goes on, but not bitwise as it would have)", stacklevel=2)
    if without_gram_teacher:
        rank_state["gram_initialized"] = False
    return rank_state | {"checkpoint": str(path)}


def export_backbone(arch: torch.nn.Module, out: str | Path, which: str = "teacher") -> Path:
    """Write the full backbone state dict (DINOv3's DinoVisionTransformer keys) of the teacher or
    student to `out`, atomically (a temporary file, renamed): safetensors when its suffix is
    .safetensors (ImportError, with the install hint, without the package), else torch.save. Every
    rank calls it (FSDP gathers); rank 0 writes."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    backbone = getattr(arch, which).backbone
    sd = get_model_state_dict(backbone, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = Path(out)
    rank, _ = _rank_world()
    error = None
    if rank == 0:
        try:
            _write_backbone(sd, out)
        except Exception as exc:  # noqa: BLE001  (raised on every rank by _check_all_ranks)
            error = exc
    _check_all_ranks(error, f"writing {out}")
    return out


def _write_backbone(sd: dict[str, torch.Tensor], out: Path) -> None:
    """Write to a temporary file next to `out`, fsync, rename: `out` is the old file or the whole new one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        if out.suffix == ".safetensors":
            try:
                from safetensors.torch import save_file
            except ImportError as exc:
                raise ImportError("writing .safetensors needs safetensors: pip install 'dinov3-fast[train]', "
                                  "or export to a .pth file") from exc
            save_file(tensors, str(tmp))
        else:
            torch.save(tensors, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(out.parent)


def export_from_checkpoint(checkpoint: str | Path, out: str | Path | None = None, which: str = "teacher") -> Path:
    """Offline export: rebuild the run's models from the checkpoint's config.yaml on the CPU,
    load it (any saved world size) and write the backbone (see `export_backbone`) to `out`, or
    (`out` None or a folder) to a file named for the checkpoint, next to it or in that folder."""
    from dinov3_fast.train.config import load_config
    from dinov3_fast.train.meta_arch import SSLMetaArch
    path = resolve_checkpoint(checkpoint)
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no config.yaml to rebuild the model from")
    cfg = load_config(cfg_file, base="debug")
    arch = SSLMetaArch(cfg, device="cpu")
    load_checkpoint(path, arch)
    if out is None or Path(out).is_dir():  # a folder: the default name in it
        out = (path.parent if out is None else Path(out)) / _export_name(path, which)
    return export_backbone(arch, out, which)


def _export_name(checkpoint: Path, which: str) -> str:
    """The default export file name: <step folder>_<which>_backbone, .safetensors when the package is there."""
    try:
        import safetensors  # noqa: F401
        suffix = ".safetensors"
    except ImportError:
        suffix = ".pth"
    return f"{checkpoint.name}_{which}_backbone{suffix}"
