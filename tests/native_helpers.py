"""The native CUDA kernels in tests: the library pip install built (or a fresh build through the
same CMake recipe), and, without a GPU, the same kernel sources compiled as C++ and run on the CPU
(tests/native_emulation), so CI checks the kernels' logic and not only that they compile."""

import atexit
import contextlib
import functools
import os
import runpy
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from fastdit.ops import _native

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"


build = SimpleNamespace(**runpy.run_path(str(KERNELS / "build.py")))  # kernels/build.py: outside the package


def _session_dir(prefix):
    """A temporary folder removed when the test session's process exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.cache
def built_library():
    """The library built from the current sources: $FASTDIT_NATIVE_LIB's where set (taken as is),
    fastdit/_native's when it is newer than every kernel source (pip install or the device check
    built it), else a fresh CMake build in a temporary folder (once per session and process); None,
    with the reason, where nvcc or cmake is missing."""
    if os.environ.get(_native.ENV_LIB):
        return _native.library_path(), None
    if build.up_to_date(_native.PACKAGED_LIB):
        return _native.PACKAGED_LIB, None
    tools, why = build.decide()
    if tools is None:
        return None, why
    out = _session_dir("fastdit-native-")
    return build.build(out / "lib", out / "build", *tools), None


@functools.cache
def emulated_library():
    """kernels/*.cu compiled with g++ against tests/native_emulation (once per session); None, with
    the reason, where g++ or the CUDA headers are missing. -Bsymbolic binds the emulation's CUDA runtime
    functions to its own definitions, not to the libcudart a CUDA build of torch has loaded globally."""
    cxx, include = shutil.which("g++"), build.cuda_include_dir()
    if cxx is None or include is None:
        return None, "g++ or the CUDA toolkit's headers not found"
    emulation = Path(__file__).resolve().parent / "native_emulation"
    out = _session_dir("fastdit-emulated-") / "libfastdit_kernels_emulated.so"
    subprocess.run(
        [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-Wl,--no-undefined", "-Wl,-Bsymbolic", "-include", str(emulation / "emulation.h"),
         "-I", str(KERNELS), "-I", str(include), "-x", "c++", *(str(KERNELS / f) for f in ("api.cu", "rows.cu", "layout.cu")),
         "-x", "none", str(emulation / "emulation.cpp"), "-o", str(out), "-lpthread"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return out, None


def require(found):
    """The library path of built_library() / emulated_library(), or skip saying why there is none."""
    path, why = found
    if path is None:
        pytest.skip(why)
    return path


def use_built_native(monkeypatch):
    """Until monkeypatch undoes it, the cuda backend runs built_library() (skip if there is none)."""
    lib = _native.load(require(built_library()))
    monkeypatch.setattr(_native, "library", lambda: lib)


def use_emulated_native(monkeypatch):
    """Until monkeypatch undoes it, the cuda backend runs the emulated kernels on CPU tensors."""
    lib = _native.load(require(emulated_library()))
    monkeypatch.setattr(_native, "library", lambda: lib)
    monkeypatch.setattr(_native, "check_device", lambda name, device: None)
    monkeypatch.setattr(_native, "_launch_context", lambda *tensors: contextlib.nullcontext())
    monkeypatch.setattr(_native, "_stream", lambda: None)
