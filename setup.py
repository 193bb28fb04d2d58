"""Builds the optional CUDA extension ``ippo._C`` (csrc/, via CMakeLists.txt); all metadata lives in pyproject.toml.

IPPO_BUILD_CUDA=auto (default): build when nvcc is found; if the build fails, warn and install without it
                                (the torch and triton backends still work).
IPPO_BUILD_CUDA=1:              the build must succeed (no nvcc / cmake / a compile error fails the install).
IPPO_BUILD_CUDA=0:              never build.
TORCH_CUDA_ARCH_LIST:           targets, e.g. "8.0;9.0+PTX" (default: sm_80 and sm_90 machine code + compute_90 PTX).
CMAKE_BUILD_PARALLEL_LEVEL:     compile jobs (default: min(4, CPUs)).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
MODE = (os.environ.get("IPPO_BUILD_CUDA", "auto").strip().lower() or "auto")
DEFAULT_ARCHS = "80-real;90"


def _log(msg: str) -> None:
    print(f"ippo setup: {msg}", file=sys.stderr, flush=True)


def find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def cuda_architectures() -> str:
    """CMAKE_CUDA_ARCHITECTURES from TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX" -> "80-real;90-real;90-virtual")."""
    spec = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not spec:
        return DEFAULT_ARCHS
    out: list[str] = []
    for item in re.split(r"[;\s,]+", spec):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", item, flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot parse {item!r} (expected e.g. '8.0;9.0+PTX')")
        arch = f"{m.group(1)}{m.group(2)}{m.group(3).lower()}"
        out.append(f"{arch}-real")
        if m.group(4):
            out.append(f"{arch}-virtual")
    return ";".join(dict.fromkeys(out))


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extensions(self) -> None:
        built = []
        for ext in self.extensions:
            try:
                self._build_cmake(ext)
                built.append(ext)
            except Exception as err:  # noqa: BLE001 - auto mode must not fail the install
                if MODE == "1":
                    raise
                _log("WARNING: building the CUDA extension ippo._C failed; installing without it "
                     f"(the torch and triton backends still work). Reason: {err}. "
                     "Set IPPO_BUILD_CUDA=1 to make this an error, IPPO_BUILD_CUDA=0 to skip the build.")
        self.extensions[:] = built

    def _build_cmake(self, ext: Extension) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake (>= 3.24) not found on PATH; pip install cmake")
        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found (set CUDACXX or CUDA_HOME, or put nvcc on PATH)")
        import pybind11

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = cuda_architectures()
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DIPPO_OUTPUT_DIR={ext_path.parent}",
            f"-DIPPO_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
        ]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(min(4, os.cpu_count() or 1))
        start = time.monotonic()
        _log(f"building ippo._C with {nvcc} for CUDA architectures {archs} ({jobs} jobs)")
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)
        if not ext_path.exists():
            raise RuntimeError(f"cmake finished but {ext_path} was not produced")
        _log(f"built {ext_path} in {time.monotonic() - start:.0f} s")


def ext_modules() -> list[Extension]:
    if MODE not in ("auto", "0", "1"):
        sys.exit(f"ippo setup: IPPO_BUILD_CUDA must be auto, 0 or 1; got {MODE!r}")
    if MODE == "0":
        _log("IPPO_BUILD_CUDA=0: not building the CUDA extension ippo._C")
        return []
    if find_nvcc() is None:
        if MODE == "1":
            sys.exit("ippo setup: IPPO_BUILD_CUDA=1 but nvcc was not found (put it on PATH or set CUDA_HOME/CUDACXX)")
        _log("nvcc not found: not building the CUDA extension ippo._C (the torch and triton backends still work)")
        return []
    return [CMakeExtension("ippo._C")]


setup(ext_modules=ext_modules(), cmdclass={"build_ext": CMakeBuild})
