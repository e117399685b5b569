"""The GPU check scripts run their Python files from a bare checkout: on the device machine the
package is not installed (benchmarks/device_check.sh builds the extension in place; the machine
has no network for pip). A file run by path gets its own folder on sys.path, not the repository
root, so each file that benchmarks/*.sh runs that way must find `dinov3_fast` itself. Here the
package is installed in editable mode, which hid exactly that: `python -S` skips the site hooks
(the editable install's .pth finder) and PYTHONPATH keeps only the third-party packages. Before
the fix the attention sweep measured nothing on a GPU (every row "No module named 'dinov3_fast'",
exit 0) and tools/train_results.py failed on import at the end of train_check.sh."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# `"$PY" some/file.py ...` in the device scripts; `-m` and stdin (`-`) runs import from the cwd
RUN_BY_PATH = re.compile(r'"\$PY" ((?:benchmarks|tools)/[\w/]+\.py)')


def scripts_run_by_path() -> list[str]:
    found = set()
    for sh in sorted((ROOT / "benchmarks").glob("*.sh")):
        for line in sh.read_text().splitlines():
            if not line.lstrip().startswith("#"):
                found.update(RUN_BY_PATH.findall(line))
    return sorted(found)


def run_bare(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -S args` (from the repository root, as the device scripts run) with the
    site-packages on PYTHONPATH and nothing else: third-party packages import, an installed
    dinov3_fast does not."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    # this interpreter's package folders (the user site included), not an editable install's root
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if Path(p).name in ("site-packages", "dist-packages"))
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_package_is_hidden_from_a_bare_run(tmp_path):
    """The guard's premise: outside the repository, a bare run cannot import the package (else
    the tests below could not fail)."""
    proc = run_bare("-c", "import dinov3_fast", cwd=tmp_path)
    assert proc.returncode != 0 and "No module named 'dinov3_fast'" in proc.stderr, proc.stderr[-2000:]


def test_the_device_scripts_run_these_files():
    assert {"benchmarks/attention_sweep.py", "tools/train_probe.py", "tools/train_results.py"} <= set(
        scripts_run_by_path())


@pytest.mark.parametrize("script", scripts_run_by_path())
def test_each_file_finds_the_package_without_an_install(script, tmp_path):
    """The file's module body runs (not its main), then the package imports in that process: a
    file that imports the package lazily, as the sweep does, is held to it as well."""
    proc = run_bare("-c", "import runpy, sys; runpy.run_path(sys.argv[1]); import dinov3_fast", str(ROOT / script),
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_sweep_measures_without_an_install(tmp_path):
    """The sweep imports the package lazily (after --dry-run sets TRITON_INTERPRET), inside the
    rows, where an import error became an error row and exit 0: its dry run must measure."""
    out = tmp_path / "sweep.json"
    proc = run_bare("benchmarks/attention_sweep.py", "--dry-run", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "No module named" not in out.read_text()
