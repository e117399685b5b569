"""`dinov3-fast` command line: `bench` runs the microbenchmarks (the main job); `train`, `plan` and
`export` drive the lean DINOv3 trainer (dinov3_fast.train)."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dinov3_fast._json import write_json_atomically


def _cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _bench(args: argparse.Namespace) -> int:
    from dinov3_fast.bench.cases import all_cases
    from dinov3_fast.bench.environment import git_revision, triton_version
    from dinov3_fast.bench.roofline import measure_roofline
    from dinov3_fast.bench.runner import HARNESS, format_table, run_cases

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda requested but no CUDA GPU is present", file=sys.stderr)
        return 2
    cases = [c for c in all_cases() if c.device == device.type]
    if args.op:
        cases = [c for c in cases if c.op in args.op]
    if args.preset:
        cases = [c for c in cases if c.preset in args.preset]
    # Whole-block cases run only with --model; the default run is the ops.
    cases = [c for c in cases if c.is_model == args.model]
    if args.skip_impl:
        baselines = sorted({next(iter(c.impls)) for c in cases} & set(args.skip_impl))
        if baselines:
            print(f"error: --skip-impl cannot leave out a baseline (every ratio is against it): {baselines}",
                  file=sys.stderr)
            return 2
        cases = [dataclasses.replace(c, impls={k: v for k, v in c.impls.items() if k not in args.skip_impl})
                 for c in cases]
    if not cases:
        print(f"error: no benchmark case matches (device={device.type}, op={args.op}, preset={args.preset})",
              file=sys.stderr)
        return 2
    roofline = measure_roofline(device)
    meta = {"device_type": device.type, "device": roofline.device_name if device.type == "cuda" else _cpu_name(),
            "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "threads": torch.get_num_threads(),
            "roofline": roofline.as_dict(), "python": platform.python_version(),
            "triton": triton_version(), "harness": HARNESS, **git_revision()}

    def write_json(rows, failures) -> None:  # after every case: a run stopped early keeps its rows
        write_json_atomically(args.json, {"meta": {**meta, "failed_cases": failures},
                                          "rows": [r.as_dict() for r in rows]})

    rows, failures = run_cases(cases, device, roofline, min_run_time=args.min_run_time,
                               on_case=write_json if args.json else None)
    print(f"dinov3-fast bench on {meta['device']} (torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads); speedup and mem x are relative to the first impl of each preset, measured in this run")
    print(format_table(rows))
    if any(r.graph_ms is not None for r in rows):
        print("  graph ms: device time of the compared pass (fwd+bwd, else fwd) replayed from a CUDA graph, "
              "L2 warm, no host time; graph x: its ratio to the baseline's")
    for note in dict.fromkeys(f"  {r.op}/{r.preset}: {r.note}" for r in rows if r.note):
        print(note)
    if args.json:
        print(f"wrote {args.json}")
    if args.plot and rows:
        from dinov3_fast.bench.plot import plot_rows
        plot_rows(rows, args.plot)
        print(f"wrote {args.plot}")
    for failure in failures:
        print(f"error: case failed, no rows: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _at_least_one(text: str) -> int:
    """argparse type of a count that must be >= 1 (an error naming the value, not a traceback)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _train_config(args: argparse.Namespace):
    """The run's Config: the preset or YAML file, then the flags, then `section.key=value` overrides.
    Flags are applied as the values argparse gave, not re-read as YAML: a path such as `runs/exp #2`,
    `0123` or `yes` stays that path."""
    from dinov3_fast.train.config import apply_overrides, arch_overrides, get_preset, load_config, update_config

    cfg = load_config(args.config, base=args.preset) if args.config else get_preset(args.preset)
    flags = {"dataset_path": args.data, "steps": args.steps, "batch_size_per_gpu": args.batch, "ops": args.ops,
             "ac": args.ac, "output_dir": args.output_dir, "log_every": args.log_every, "device": args.device,
             "profile_steps": args.profile_steps, "compile": args.compile}
    cfg = update_config(cfg, {"train": {k: v for k, v in flags.items() if v is not None}})
    overrides = arch_overrides(args.arch) if args.arch is not None else []
    return apply_overrides(cfg, overrides + list(args.opts or []))


def _check_device(cfg) -> None:
    """Refuse a train.device this machine cannot run (torch would fail deep inside, e.g. in
    torch.cuda.set_device without a GPU), before anything is built."""
    from dinov3_fast.train.config import ConfigError

    name = cfg.train.device
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device (--device) must be cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.device (--device) must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device (--device) {name}: no CUDA GPU is present; use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"train.device (--device) {name}: this machine has {torch.cuda.device_count()} GPU(s)")


def _check_paths(cfg) -> None:
    """Refuse, before anything is built (the run would fail only where it first reads or writes
    them, after the model is built), a train.dataset_path that is not a folder (nor "synthetic"),
    and a train.output_dir that cannot become a folder this process writes into: a file, a path
    under a file, a folder without write permission."""
    from dinov3_fast.train.config import ConfigError
    from dinov3_fast.train.data import IMAGE_SUFFIXES

    data = cfg.train.dataset_path
    if data != "synthetic" and not Path(data).is_dir():
        raise ConfigError(f"train.dataset_path (--data) {data} is not a folder: give a folder of "
                          f"{'/'.join(IMAGE_SUFFIXES)} images (searched recursively), or 'synthetic'")
    out = cfg.train.output_dir
    target = Path(out).absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"train.output_dir (--output-dir) {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir (--output-dir) {out}: {existing} is not writable")


def _check_json(path: str | None) -> None:
    """Refuse a --json file that cannot be written (its folder missing or read-only, or a folder
    itself) before the run: train writes it at its first logged interval and would stop there."""
    from dinov3_fast.train.config import ConfigError

    if path is None:
        return
    target = Path(path).absolute()
    if target.is_dir():
        raise ConfigError(f"--json {path} is a folder; give a file name")
    if not target.parent.is_dir() or not os.access(target.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--json {path}: {target.parent} is not a folder this process can write into")


def _train(args: argparse.Namespace) -> int:
    """A configuration or input error (ConfigError, a missing config file, an unreadable --resume
    checkpoint) is one line and exit code 2; a stop on a signal (train.preemption: SIGTERM, SIGINT,
    SIGUSR1, after saving a checkpoint) is one line and 128 + the signal's number (143 for SIGTERM,
    130 for SIGINT), as a shell reports a process killed by it; any other error keeps its traceback."""
    from dinov3_fast.train.checkpoint import CheckpointError
    from dinov3_fast.train.config import ConfigError
    from dinov3_fast.train.loop import train
    from dinov3_fast.train.preemption import Preempted

    def write_json(history: dict) -> None:  # after every logged interval and at the end
        write_json_atomically(args.json, {"config": cfg.to_dict(), "steps": history["steps"], "knn": history["knn"],
                                          "checkpoint": history["checkpoint"], "torch": torch.__version__,
                                          "profile": history.get("profile"), "allocator": history.get("allocator")})

    had_group = dist.is_available() and dist.is_initialized()

    def destroy_own_group() -> None:
        """The process group train set up (torchrun's ranks, or one CUDA rank under FSDP2). Not
        after an unexpected error, where a rank would wait here for its peers' collectives; the
        errors below are raised on every rank alike (a checkpoint error is decided on rank 0)."""
        if not had_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    try:
        cfg = _train_config(args)
        _check_device(cfg)
        _check_paths(cfg)
        _check_json(args.json)
        history = train(cfg, resume=args.resume, progress=not args.no_progress,
                        on_log=write_json if args.json else None)
    except (ConfigError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        destroy_own_group()
        return 2
    except Preempted as exc:  # every rank stops at the same step
        print(f"stopped: {exc}", file=sys.stderr)
        destroy_own_group()
        if args.json and exc.history["state"].rank == 0:
            write_json(exc.history)  # with the checkpoint just saved
        return exc.exit_code
    destroy_own_group()
    if args.json and history["state"].rank == 0:
        write_json(history)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from dinov3_fast.train.config import ConfigError, apply_overrides, arch_overrides, get_preset, load_config
    from dinov3_fast.train.planner import format_plan, plan_memory

    try:
        cfg = load_config(args.config, base=args.preset) if args.config else get_preset(args.preset)
        flags = {"train.batch_size_per_gpu": args.batch, "train.ac": args.ac, "train.ops": args.ops}
        overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
        if args.arch is not None:
            overrides += arch_overrides(args.arch)
        cfg = apply_overrides(cfg, overrides + list(args.opts or []))
        _check_json(args.json)
        plan = plan_memory(cfg, world_size=args.gpus)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    if args.json:
        Path(args.json).write_text(json.dumps(plan.as_dict(), indent=1))
    return 0


def _export(args: argparse.Namespace) -> int:
    from dinov3_fast.train.checkpoint import CheckpointError, export_from_checkpoint
    from dinov3_fast.train.config import ConfigError

    try:
        out = export_from_checkpoint(args.checkpoint, args.out, which=args.which)
    except (CheckpointError, ConfigError, OSError) as exc:  # OSError: --out cannot be written
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dinov3-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time, memory and roofline of each fused op against its reference")
    bench.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if present, else cpu")
    bench.add_argument("--op", action="append", help="only these ops (repeatable), e.g. gram_loss")
    bench.add_argument("--preset", action="append", help="only these presets (repeatable)")
    bench.add_argument("--model", action="store_true", help="only the ViT block benchmarks")
    bench.add_argument("--skip-impl", action="append", default=[],
                       help="leave out these implementations (repeatable), e.g. reference+compile; not a baseline")
    bench.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per measurement")
    bench.add_argument("--json", help="write the table and run metadata to this JSON file")
    bench.add_argument("--plot", help="write a speed-up bar chart (PNG) to this path")
    bench.set_defaults(func=_bench)

    train = sub.add_parser("train", help="DINOv3 SSL training (FSDP2 under torchrun, AC, compile, fused losses)")
    train.add_argument("--preset", default="cpu", help="named config (debug, cpu, vitl16_h100, vit7b16)")
    train.add_argument("--config", help="a YAML file in DINOv3's layout, applied over the preset")
    train.add_argument("--arch", help="student.arch, e.g. vit_small, vit_large, vit_7b")
    train.add_argument("--data", help="'synthetic' (default) or a folder of JPEG/PNG images")
    train.add_argument("--steps", type=int, help="iterations to run")
    train.add_argument("--batch", type=int, help="train.batch_size_per_gpu")
    train.add_argument("--ops", choices=("fused", "reference"), help="fused ops, or every op's plain-PyTorch reference")
    train.add_argument("--ac", choices=("none", "full", "selective"), help="activation checkpointing per block")
    train.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="compile each block")
    train.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if present, else cpu; under torchrun "
                       "each rank takes cuda:LOCAL_RANK)")
    train.add_argument("--output-dir", help="train.output_dir (config, checkpoints)")
    train.add_argument("--resume", help="a checkpoint folder, a checkpoint root or a run's --output-dir "
                       "(the newest complete checkpoint there)")
    train.add_argument("--log-every", type=int)
    train.add_argument("--profile-steps", type=int,
                       help="profile the last this many steps (torch.profiler), an interval of their own "
                            "left out of img/s and MFU; the summary is logged and written to --json")
    train.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    train.add_argument("--json", help="write the logged history to this JSON file")
    train.add_argument("opts", nargs="*", help="DINOv3-style overrides section.key=value")
    train.set_defaults(func=_train)

    plan = sub.add_parser("plan", help="per-rank memory plan from the meta device and a fake process group")
    plan.add_argument("--preset", default="vit7b16")
    plan.add_argument("--config")
    plan.add_argument("--arch")
    plan.add_argument("--gpus", type=_at_least_one, default=8, help="world size")
    plan.add_argument("--batch", type=int, help="train.batch_size_per_gpu")
    plan.add_argument("--ac", choices=("none", "full", "selective"))
    plan.add_argument("--ops", choices=("fused", "reference"))
    plan.add_argument("--json")
    plan.add_argument("opts", nargs="*", help="overrides section.key=value")
    plan.set_defaults(func=_plan)

    export = sub.add_parser("export", help="write a checkpoint's backbone as a plain full state dict")
    export.add_argument("checkpoint", help="a checkpoint folder, a checkpoint root or a run's --output-dir")
    export.add_argument("--out", default=None, help="output file (.safetensors, or .pth)")
    export.add_argument("--which", choices=("teacher", "student"), default="teacher")
    export.set_defaults(func=_export)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
