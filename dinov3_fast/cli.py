"""`dinov3-fast` command line: `bench` runs the microbenchmarks (the main job)."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch


def _bench(args: argparse.Namespace) -> int:
    from dinov3_fast.bench.cases import all_cases
    from dinov3_fast.bench.roofline import measure_roofline
    from dinov3_fast.bench.runner import format_table, run_cases

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda requested but no CUDA GPU is present", file=sys.stderr)
        return 2
    cases = [c for c in all_cases() if c.device == device.type]
    if args.op:
        cases = [c for c in cases if c.op in args.op]
    if args.preset:
        cases = [c for c in cases if c.preset in args.preset]
    # Whole-block cases (op "vit_*") run only with --model; the default run is the ops.
    cases = [c for c in cases if c.op.startswith("vit_") == args.model]
    if not cases:
        print(f"error: no benchmark case matches (device={device.type}, op={args.op}, preset={args.preset})",
              file=sys.stderr)
        return 2
    roofline = measure_roofline(device) if device.type == "cuda" else None
    rows = run_cases(cases, device, roofline, min_run_time=args.min_run_time)
    print(f"dinov3-fast bench on {roofline.device_name if roofline else platform.processor() or 'cpu'} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads); speedup and mem x are "
          f"relative to the first impl of each preset, measured in this run")
    print(format_table(rows))
    for note in dict.fromkeys(f"  {r.op}/{r.preset}: {r.note}" for r in rows if r.note):
        print(note)
    if args.json:
        meta = {"device": roofline.device_name if roofline else "cpu", "torch": torch.__version__,
                "date": datetime.date.today().isoformat(), "threads": torch.get_num_threads(),
                "roofline": roofline.as_dict() if roofline else None, "python": platform.python_version()}
        try:
            import triton
            meta["triton"] = triton.__version__
        except ImportError:
            meta["triton"] = None
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": [r.as_dict() for r in rows]}, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        from dinov3_fast.bench.plot import plot_rows
        plot_rows(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dinov3-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time, memory and roofline of each fused op against its reference")
    bench.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if present, else cpu")
    bench.add_argument("--op", action="append", help="only these ops (repeatable), e.g. gram_loss")
    bench.add_argument("--preset", action="append", help="only these presets (repeatable)")
    bench.add_argument("--model", action="store_true", help="only the ViT block benchmarks")
    bench.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per measurement")
    bench.add_argument("--json", help="write the table and run metadata to this JSON file")
    bench.add_argument("--plot", help="write a speed-up bar chart (PNG) to this path")
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
