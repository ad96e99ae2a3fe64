"""fastdit's native CUDA kernels without a GPU: the CMake build, the resource usage of the built
code (no spills, no local memory, on sm_80 and on sm_90), the build switches, and the loader's and
the cuda backend's errors. The kernels' results: the `cuda` cases of the op tests."""

import collections
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdit import ops
from fastdit.ops import _dispatch, _layout, _native, _rows
from tests.native_helpers import ROOT, build, built_library, emulated_library, require, use_emulated_native

# The ops with native kernels; every kernel carries its op's name (as the Triton kernels do).
ROW_OPS = tuple(_rows.OP_OF_FLAGS.values())
NATIVE_OPS = (*ROW_OPS, "patchify", "unpatchify")
KERNEL_NAME = re.compile(rf"({'|'.join(NATIVE_OPS)})_(fwd|bwd)_(\w+_)?kernel")
# Kernels the library must hold for each architecture, by name: the Triton kernels' names, and the
# row backwards' second stage (the deterministic sum of the partial sums).
KERNEL_COUNTS = {
    **{f"{op}_{way}_kernel": 6 for op in ROW_OPS for way in ("fwd", "bwd")},  # 3 dtypes x aligned or not
    **{f"{op}_bwd_reduce_kernel": 1 for op in ROW_OPS},
    **{name: 2 for name in _layout.KERNEL_NAMES.values()},  # 2- and 4-byte words
}
ARCHS = ("sm_80", "sm_90")


def kernel_name(symbol):
    """A kernel's unqualified C++ name from its mangled symbol, e.g.
    _ZN7fastdit41_GLOBAL__N__9f66f7de_9_layout_cu_355d937619patchify_fwd_kernelIjEEvNS0_12LayoutParamsEi
    -> patchify_fwd_kernel
    (the last of the <length><identifier> names after _ZN); an unmangled symbol as it is."""
    if not symbol.startswith("_ZN"):
        return symbol
    pos, name = 3, symbol
    while m := re.match(r"\d+", symbol[pos:]):
        pos += m.end()
        name, pos = symbol[pos : pos + int(m.group())], pos + int(m.group())
    return name


def cuobjdump():
    """cuobjdump from PATH, the CUDA toolkit, or the copy Triton's package carries; None if none."""
    triton_copy = None
    try:
        import triton

        triton_copy = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    except ImportError:
        pass
    cuda_copy = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump"
    return shutil.which("cuobjdump") or next((str(p) for p in (cuda_copy, triton_copy) if p and p.is_file()), None)


def resource_usage(lib):
    """{arch: {kernel: {"REG": n, "STACK": n, "SHARED": n, "LOCAL": n, ...}}} of the machine code in lib,
    and the architectures its PTX targets, from `cuobjdump --dump-resource-usage`."""
    tool = cuobjdump()
    if tool is None:
        pytest.fail(
            "the native library is built but no cuobjdump was found (CUDA toolkit, or Triton's copy) to check it"
        )
    text = subprocess.run([tool, "--dump-resource-usage", str(lib)], check=True, capture_output=True, text=True).stdout
    usage, ptx, arch, kind, kernel = {}, set(), None, None, None
    for line in text.splitlines():
        if line.startswith("Fatbin"):
            kind = line.split()[1]  # elf or ptx
        elif m := re.match(r"arch = (\w+)", line):
            arch = m.group(1)
            (usage.setdefault(arch, {}) if kind == "elf" else ptx.add(arch))
        elif m := re.match(r"\s*Function (\S+):", line):
            kernel = m.group(1)
        elif kernel and re.match(r"\s*REG:", line):
            usage[arch][kernel] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            kernel = None
    return usage, ptx


@pytest.fixture(scope="module")
def library():
    return require(built_library())


def test_built_code_has_no_spills_and_no_local_memory(library):
    usage, ptx = resource_usage(library)
    assert "sm_90" in ptx, f"no compute_90 PTX in {library} (newer GPUs compile it at load)"
    for arch in ARCHS:
        kernels = usage.get(arch, {})
        names = {symbol: kernel_name(symbol) for symbol in kernels}
        unnamed = sorted(name for name in names.values() if not KERNEL_NAME.fullmatch(name))
        assert not unnamed, f"{arch}: kernels not named <op>_fwd/bwd_...kernel for an op of {NATIVE_OPS}: {unnamed}"
        counts = collections.Counter(names.values())
        assert counts == KERNEL_COUNTS, f"{arch}: kernels by name {dict(counts)}, expected {KERNEL_COUNTS}"
        for symbol, u in kernels.items():
            name = names[symbol]
            assert u["STACK"] == 0 and u["LOCAL"] == 0, f"{arch} {name} spills or uses local memory: {u}"
            # the row kernels' launch bounds: 512 threads a block, one block at least: 128 registers
            assert u["REG"] <= (128 if name.startswith(ROW_OPS) else 255), f"{arch} {name}: {u['REG']} registers"


def test_library_loads_with_its_abi(library):
    assert _native.load(library).fastdit_abi_version() == _native.ABI_VERSION


def test_python_constants_match_the_c_header():
    header = (ROOT / "kernels" / "fastdit_kernels.h").read_text()
    defines = {k: int(v) for k, v in re.findall(r"#define (FASTDIT_\w+) (\d+)", header)}
    codes = {k: int(v) for k, v in re.findall(r"FASTDIT_(F32|F16|BF16) = (\d+)", header)}
    assert (defines["FASTDIT_ABI_VERSION"], defines["FASTDIT_ROWS_MAX_D"], defines["FASTDIT_LAYOUT_MAX_F"]) == (
        _native.ABI_VERSION,
        _native.MAX_D,
        _native.MAX_F,
    )
    assert codes == {
        "F32": _native.DTYPE_CODES[torch.float32],
        "F16": _native.DTYPE_CODES[torch.float16],
        "BF16": _native.DTYPE_CODES[torch.bfloat16],
    }


def run_setup(*args, **env):
    """python setup.py ARGS in the checkout, with env added to a PATH that holds python alone."""
    path = str(Path(sys.executable).parent)
    return subprocess.run(
        [sys.executable, "setup.py", *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PATH": path, "CUDA_HOME": "/nonexistent", **env},
    )  # fmt: skip


def test_install_without_nvcc_skips_the_kernels_and_says_so():
    run = run_setup("-q", "build_native", FASTDIT_BUILD_NATIVE="")
    assert run.returncode == 0, run.stderr
    assert re.search(r"not building the native CUDA kernels \(nvcc( and cmake)? not found", run.stderr), run.stderr


def test_forced_build_without_nvcc_is_an_error():
    run = run_setup("-q", "build_native", FASTDIT_BUILD_NATIVE="1")
    assert run.returncode != 0
    assert re.search(r"FASTDIT_BUILD_NATIVE=1 but nvcc( and cmake)? not found", run.stderr), run.stderr


@pytest.mark.parametrize(
    "setting, outcome",
    [("0", "skip: FASTDIT_BUILD_NATIVE=0"), ("", "skip: nvcc not found (PATH, CUDA_HOME)"),
     ("1", "error: FASTDIT_BUILD_NATIVE=1 but nvcc not found"), ("yes", "error: FASTDIT_BUILD_NATIVE must be 0")],
)  # fmt: skip
def test_build_switch(setting, outcome, tmp_path):
    """cmake on PATH, no nvcc anywhere: FASTDIT_BUILD_NATIVE decides between skipping and failing."""
    (tmp_path / "cmake").write_text("#!/bin/sh\n")
    (tmp_path / "cmake").chmod(0o755)
    env = {"PATH": str(tmp_path), "CUDA_HOME": str(tmp_path), build.ENV: setting}
    kind, message = outcome.split(": ", 1)
    if kind == "error":
        with pytest.raises(build.BuildError, match=re.escape(message)):
            build.decide(env)
    else:
        assert build.decide(env) == (None, message)


def test_import_fastdit_loads_no_library(library):
    # the ops run (the reference on CPU tensors) with a built library beside them: it stays unloaded
    code = """import sys, torch, fastdit
from fastdit import ops
x, v = torch.randn(2, 3, 8), torch.randn(2, 8)
ops.modulate_layer_norm(x, v, v)
print("fastdit.ops._native" in sys.modules, "libfastdit_kernels" in open("/proc/self/maps").read())"""
    env = {**os.environ, _native.ENV_LIB: str(library)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.stdout.split() == ["False", "False"], done.stderr[-2000:]


def test_missing_library_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.delenv(_native.ENV_LIB, raising=False)
    monkeypatch.setattr(_native, "PACKAGED_LIB", tmp_path / _native.LIB_NAME)
    with pytest.raises(
        _native.NativeUnavailable,
        match=r"not built: .*libfastdit_kernels.so does not exist; build them with pip install -e \.",
    ):
        _native.load(_native.library_path())


def test_bad_native_lib_env(monkeypatch, tmp_path):
    monkeypatch.setenv(_native.ENV_LIB, str(tmp_path / "nope.so"))
    with pytest.raises(_native.NativeUnavailable, match="FASTDIT_NATIVE_LIB=.*nope.so does not exist"):
        _native.load(_native.library_path())
    not_elf = tmp_path / "text.so"
    not_elf.write_text("not a library")
    monkeypatch.setenv(_native.ENV_LIB, str(not_elf))
    with pytest.raises(
        _native.NativeUnavailable, match="cannot load fastdit's native CUDA kernels from FASTDIT_NATIVE_LIB="
    ):
        _native.load(_native.library_path())


def test_foreign_or_stale_library_is_refused(monkeypatch):
    libm = next(
        Path(p)
        for p in ("/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6", "/lib64/libm.so.6")
        if Path(p).exists()
    )
    with pytest.raises(_native.NativeUnavailable, match="not fastdit's native kernel library"):
        _native.load(libm)
    monkeypatch.setattr(_native, "ABI_VERSION", _native.ABI_VERSION + 1)
    with pytest.raises(
        _native.NativeUnavailable, match=f"has ABI version {_native.ABI_VERSION - 1}, this fastdit needs"
    ):
        _native.load(require(emulated_library()))


def test_cuda_backend_rejects_cpu_tensors(monkeypatch):
    x, v = torch.randn(2, 3, 8), torch.randn(2, 8)
    monkeypatch.setenv("FASTDIT_BACKEND", "cuda")
    with pytest.raises(
        RuntimeError, match="x is on cpu, and the cuda backend .* runs fastdit's native kernels on CUDA tensors only"
    ):
        ops.modulate_layer_norm(x, v, v)


def test_cuda_backend_without_the_library_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setenv(_native.ENV_LIB, str(tmp_path / "missing.so"))
    _native.library.cache_clear()
    with ops.use_backend("cuda"), pytest.raises(_native.NativeUnavailable, match="not built.*pip install -e"):
        _dispatch.resolve(torch.device("cuda"))
    _native.library.cache_clear()


def test_cuda_backend_rejects_rows_wider_than_the_kernels(monkeypatch):
    use_emulated_native(monkeypatch)
    D = _native.MAX_D + 8
    x, v = torch.randn(1, 1, D), torch.randn(1, D)
    with (
        ops.use_backend("cuda"),
        pytest.raises(ValueError, match=f"D={D} exceeds the native CUDA row kernels' maximum of 4096"),
    ):
        ops.modulate_layer_norm(x, v, v)
