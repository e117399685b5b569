"""Build driver: setuptools hands the `dinov3_fast._C` extension to CMake.

CMake builds csrc/ (CPU kernels, OpenMP, pybind11 bindings) and, when nvcc is found, the CUDA
sources in kernels/ for pinned architectures. Each distinct build environment (interpreter,
pybind11 location, build isolation) gets its own build folder, because CMake caches absolute
paths and a folder left by an isolated build breaks the next non-isolated one.

Environment knobs:
  DINOV3_FAST_CUDA=0|1           force the CUDA sources off or on (default: on when nvcc is found)
  DINOV3_FAST_CUDA_ARCHS="80;90a" architectures passed to CMAKE_CUDA_ARCHITECTURES
  DINOV3_FAST_SKIP_EXT=1         skip the extension entirely (pure-Python install)
"""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        ext_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        key = f"{sys.executable}|{pybind11.get_cmake_dir()}|{sys.version}"
        build_dir = ROOT / "build" / f"cmake-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        build_dir.mkdir(parents=True, exist_ok=True)

        want_cuda = os.environ.get("DINOV3_FAST_CUDA")
        has_nvcc = shutil.which("nvcc") is not None
        cuda = has_nvcc if want_cuda is None else want_cuda == "1"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DDINOV3_FAST_CUDA={'ON' if cuda else 'OFF'}",
            f"-DDINOV3_FAST_CUDA_ARCHS={os.environ.get('DINOV3_FAST_CUDA_ARCHS', '80;90a')}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


ext_modules = [] if os.environ.get("DINOV3_FAST_SKIP_EXT") == "1" else [CMakeExtension("dinov3_fast._C")]
setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
