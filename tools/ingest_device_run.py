"""File one GPU session's output under benchmarks/results/, named as BENCHMARKS.md expects, then
regenerate BENCHMARKS.md. Nothing is committed: read `git status`, then commit.

    python tools/ingest_device_run.py FILES_AT             # the device tool's files_at folder
    python tools/ingest_device_run.py FILES_AT --dry-run   # only print where each file would go

FILES_AT holds benchmarks/gpu_session.sh's tarballs (device_check.tgz, train_check.tgz), or is
itself the $OUT folder of benchmarks/device_check.sh or benchmarks/train_check.sh. With
stem = <card>_torch<X.Y>_triton<X.Y>_<date>_run<N> (card and versions from the call's env.json,
the date from its bench.json, N one above the stems already filed for that card, versions and date):
  bench.json, bench_compiled.json, bench_model.json -> <stem>.json, <stem>_compiled.json, <stem>_model.json
  env.json, pytest.log                              -> device_logs/<stem>_env.json, device_logs/<stem>_pytest.log
  attn_sweep.json                                   -> attention_sweep/<stem>.json
  train_check's folder                              -> train/<card>_<date>[_run<N>].json (tools/train_results.py)
build.log and log.txt stay behind (the console of the call has their tails).
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import train_results  # noqa: E402

DEVICE_FILES = {"bench.json": "{stem}.json", "bench_compiled.json": "{stem}_compiled.json",
                "bench_model.json": "{stem}_model.json", "env.json": "device_logs/{stem}_env.json",
                "pytest.log": "device_logs/{stem}_pytest.log", "attn_sweep.json": "attention_sweep/{stem}.json"}
TARBALLS = ("device_check.tgz", "train_check.tgz")


def card_name(gpu: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100"; a name without an A/B/H/L model number -> its lowercase slug."""
    model = re.search(r"\b([ABHL]\d{2,3})\b", gpu)
    return model.group(1).lower() if model else re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_")


def major_minor(version: str) -> str:
    """"2.11.0+cu130" -> "2.11"."""
    return ".".join(version.split("+")[0].split(".")[:2])


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def device_check_stem(folder: Path, results: Path) -> str:
    """The stem for a device_check.sh folder: its env.json's card and versions, its bench.json's
    date (today, UTC, if the bench never wrote), and the next run number."""
    env, meta = _read_json(folder / "env.json"), _read_json(folder / "bench.json").get("meta", {})
    if not env.get("gpu") and not meta.get("device"):
        raise SystemExit(f"{folder}: neither env.json nor bench.json names the card; file it by hand")
    card = card_name(env.get("gpu") or meta["device"])
    torch_v, triton_v = major_minor(env.get("torch") or meta["torch"]), major_minor(env.get("triton") or meta["triton"])
    prefix = f"{card}_torch{torch_v}_triton{triton_v}_{meta.get('date') or today()}_run"
    numbers = (re.fullmatch(re.escape(prefix) + r"(\d+)", p.stem) for p in results.glob(f"{prefix}*.json"))
    return f"{prefix}{max((int(m.group(1)) for m in numbers if m), default=0) + 1}"


def train_record_path(folder: Path, results: Path) -> Path:
    """train/<card>_<date>.json for a train_check.sh folder (today, UTC), with _run<N> if that name
    is taken."""
    base = f"{card_name(_read_json(folder / 'env.json').get('gpu') or 'cpu')}_{today()}"  # a CPU dry run: cpu
    path, n = results / "train" / f"{base}.json", 1
    while path.exists():
        n += 1
        path = results / "train" / f"{base}_run{n}.json"
    return path


def folders(files_at: Path, scratch: Path) -> tuple[Path | None, Path | None]:
    """(device_check folder, train_check folder) in files_at: its tarballs unpacked into scratch,
    or files_at itself, told apart by the files each script writes."""
    found: dict[str, Path] = {}
    for name in TARBALLS:
        if (files_at / name).is_file():
            target = scratch / name.removesuffix(".tgz")
            with tarfile.open(files_at / name) as tar:
                tar.extractall(target, filter="data")
            found[name.removesuffix(".tgz")] = target
    if not found:
        if any((files_at / f"train_{ops}.json").is_file() for ops in train_results.OPS):
            found["train_check"] = files_at
        elif any((files_at / name).is_file() for name in ("bench.json", "pytest.log", "build.log")):
            found["device_check"] = files_at
    return found.get("device_check"), found.get("train_check")


def ingest(files_at: Path, results: Path, dry_run: bool = False) -> list[Path]:
    """File what files_at holds under results; the written (or, dry, planned) paths."""
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as scratch:
        device, train = folders(files_at, Path(scratch))
        if device is None and train is None:
            raise SystemExit(f"{files_at}: no device_check.tgz / train_check.tgz, and no device_check.sh or "
                             "train_check.sh output in it")
        if device is not None:
            stem = device_check_stem(device, results)
            for name, pattern in DEVICE_FILES.items():
                if (device / name).is_file():
                    target = results / pattern.format(stem=stem)
                    written.append(target)
                    if not dry_run:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(device / name, target)
        if train is not None:
            target = train_record_path(train, results)
            written.append(target)
            if not dry_run and train_results.main([str(train), "--save", str(target)]) != 0:
                print(f"{target}: the record misses files (listed above under `missing`)", file=sys.stderr)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files_at", type=Path, help="the device tool's files_at folder, or a script's $OUT")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                        help="where to file them (default: benchmarks/results; BENCHMARKS.md is regenerated only then)")
    parser.add_argument("--dry-run", action="store_true", help="print where each file would go; write nothing")
    args = parser.parse_args(argv)
    written = ingest(args.files_at, args.results, args.dry_run)
    print(("would write:\n  " if args.dry_run else "wrote:\n  ") + "\n  ".join(map(str, written)))
    if not args.dry_run and args.results.resolve() == (ROOT / "benchmarks" / "results").resolve():
        import benchmarks_md

        return benchmarks_md.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
