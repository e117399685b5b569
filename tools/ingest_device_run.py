"""File one GPU session's output under benchmarks/results/, named as BENCHMARKS.md expects, then
regenerate BENCHMARKS.md. Nothing is committed: read `git status`, then commit.

    python tools/ingest_device_run.py FILES_AT             # the device tool's files_at folder
    python tools/ingest_device_run.py FILES_AT --dry-run   # only print where each file would go

FILES_AT holds benchmarks/gpu_session.sh's tarballs (device_check.tgz, train_check.tgz), or is
itself the $OUT folder of benchmarks/device_check.sh or benchmarks/train_check.sh. With
stem = <card>_torch<X.Y>_triton<X.Y>_<date>_run<N> (card and versions from the call's env.json,
the date the run started, N one above the runs already filed for that card, versions and date):
  bench.json, bench_compiled.json, bench_model.json -> <stem>.json, <stem>_compiled.json, <stem>_model.json
  env.json, pytest.log                              -> device_logs/<stem>_env.json, device_logs/<stem>_pytest.log
  attn_sweep.json                                   -> attention_sweep/<stem>.json
  train_check's folder                              -> train/<card>_<date>[_run<N>].json (train_results's record)
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

from dinov3_fast._json import write_json_atomically  # noqa: E402

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


def file_date(path: Path) -> str:
    """A file's modification date, UTC (tar keeps the device's times)."""
    return datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc).date().isoformat()


def run_date(folder: Path) -> str:
    """The date a device_check.sh run started: its bench.json's, else its env.json's (the first file
    the script writes), not the day the run is filed."""
    return _read_json(folder / "bench.json").get("meta", {}).get("date") or file_date(folder / "env.json")


def device_check_stem(folder: Path, results: Path) -> str:
    """The stem for a device_check.sh folder: its env.json's card and versions, its run_date, and
    one above every run number already filed under that prefix (in any file: a run killed before
    its bench.json still filed its logs)."""
    env, meta = _read_json(folder / "env.json"), _read_json(folder / "bench.json").get("meta", {})
    if not env.get("gpu") and not meta.get("device"):
        raise SystemExit(f"{folder}: neither env.json nor bench.json names the card; file it by hand")
    card = card_name(env.get("gpu") or meta["device"])
    torch_v, triton_v = major_minor(env.get("torch") or meta["torch"]), major_minor(env.get("triton") or meta["triton"])
    prefix = f"{card}_torch{torch_v}_triton{triton_v}_{run_date(folder)}_run"
    numbers = (re.match(re.escape(prefix) + r"(\d+)(?![\d])", p.name) for p in results.rglob(f"{prefix}*"))
    return f"{prefix}{max((int(m.group(1)) for m in numbers if m), default=0) + 1}"


def already_filed(folder: Path, results: Path) -> Path | None:
    """The filed bench file of the same device call (same start time), if there is one."""
    started = _read_json(folder / "bench.json").get("meta", {}).get("time")
    for path in results.glob("*.json") if started else ():
        if _read_json(path).get("meta", {}).get("time") == started:
            return path
    return None


def train_record(folder: Path, files_at: Path, results: Path) -> dict:
    """tools/train_results.py's record of a train_check.sh folder; refused when it cannot be built
    (a file killed mid-run) or when a filed record has the same content."""
    try:
        record = train_results.build_record(folder)
    except Exception as exc:  # noqa: BLE001 - say which output is broken, file nothing
        raise SystemExit(f"{files_at}: train_check's output cannot be summarised "
                         f"({type(exc).__name__}: {exc}); nothing filed") from exc
    as_filed = json.loads(json.dumps(record))  # as it reads back from its file
    for path in sorted((results / "train").glob("*.json")):
        if _read_json(path) == as_filed:
            raise SystemExit(f"{files_at}: this train_check run is already filed as {path}")
    return record


def train_record_path(folder: Path, results: Path, date: str) -> Path:
    """train/<card>_<date>.json for a train_check.sh folder, with _run<N> if that name is taken."""
    base = f"{card_name(_read_json(folder / 'env.json').get('gpu') or 'cpu')}_{date}"  # a CPU dry run: cpu
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
            # Pythons before 3.10.12 / 3.11.4 have no extraction filter: the tarball is our own device call's
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            try:
                with tarfile.open(files_at / name) as tar:
                    tar.extractall(target, **safe)
            except (tarfile.TarError, EOFError) as exc:
                raise SystemExit(f"{files_at / name}: not a whole tarball ({exc}); nothing filed") from exc
            found[name.removesuffix(".tgz")] = target
    if not found:
        if any((files_at / f"train_{ops}.json").is_file() for ops in train_results.OPS):
            found["train_check"] = files_at
        elif any((files_at / name).is_file() for name in ("bench.json", "pytest.log", "build.log")):
            found["device_check"] = files_at
    return found.get("device_check"), found.get("train_check")


def ingest(files_at: Path, results: Path, dry_run: bool = False) -> list[Path]:
    """File what files_at holds under results; the written (or, dry, planned) paths. The train
    record is built before anything is written, so a train_check folder that cannot be summarised
    files nothing; a device call or train_check run already filed, or a target that exists, is
    refused."""
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as scratch:
        device, train = folders(files_at, Path(scratch))
        if device is None and train is None:
            raise SystemExit(f"{files_at}: no device_check.tgz / train_check.tgz, and no device_check.sh or "
                             "train_check.sh output in it")
        if device is not None and (filed := already_filed(device, results)):
            raise SystemExit(f"{files_at}: this device call is already filed as {filed}")
        record = train_record(train, files_at, results) if train is not None else None
        copies = []
        if device is not None:
            stem = device_check_stem(device, results)
            copies = [(device / name, results / pattern.format(stem=stem)) for name, pattern in DEVICE_FILES.items()
                      if (device / name).is_file()]
        if existing := [str(target) for _, target in copies if target.exists()]:
            raise SystemExit(f"refusing to overwrite {', '.join(existing)}")
        if record is not None:
            target = train_record_path(train, results, run_date(device) if device else file_date(train / "env.json"))
            print("\n".join(train_results.record_lines(target.name, record)) + "\n")
            if record["missing"]:
                print(f"{target}: the record misses files (listed above)", file=sys.stderr)
            if not dry_run:
                target.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomically(target, record)
            written.append(target)
        for source, target in copies:
            if not dry_run:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
            written.append(target)
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
