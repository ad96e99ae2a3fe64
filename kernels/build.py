"""Build fastdit's native kernels (kernels/*.cu, CMakeLists.txt) with CMake: the one recipe that
`pip install` (setup.py) and the tests run.

    python kernels/build.py              # -> fastdit/_native/libfastdit_kernels.so (what fastdit loads)
    python kernels/build.py --out DIR    # elsewhere (point FASTDIT_NATIVE_LIB at it)

FASTDIT_BUILD_NATIVE decides whether an install builds them: unset, when nvcc and cmake are found;
1, always (a missing tool is an error); 0, never. Plain Python, no torch: setup.py imports it.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIB_NAME = "libfastdit_kernels.so"
PACKAGE_DIR = ROOT / "fastdit" / "_native"  # where fastdit looks for the library by default
ENV = "FASTDIT_BUILD_NATIVE"


def up_to_date(lib):
    """Whether the library at `lib` exists and is newer than every kernel source and CMakeLists.txt."""
    sources = [p for pattern in ("*.cu", "*.cuh", "*.h") for p in (ROOT / "kernels").glob(pattern)]
    newest = max(p.stat().st_mtime for p in [*sources, ROOT / "CMakeLists.txt"])
    return Path(lib).is_file() and Path(lib).stat().st_mtime >= newest


class BuildError(RuntimeError):
    """The kernels were asked for and could not be built."""


def find_nvcc(env=os.environ):
    """nvcc on PATH, else in $CUDA_HOME (or $CUDA_PATH, or /usr/local/cuda)/bin; None if neither."""
    found = shutil.which("nvcc", path=env.get("PATH"))
    if found:
        return found
    nvcc = Path(env.get("CUDA_HOME") or env.get("CUDA_PATH") or "/usr/local/cuda") / "bin" / "nvcc"
    return str(nvcc) if nvcc.is_file() else None


def cuda_include_dir(env=os.environ):
    """The CUDA toolkit's headers (cuda_runtime.h): next to nvcc, else in $CUDA_HOME (...)/include."""
    candidates = [Path(env.get("CUDA_HOME") or env.get("CUDA_PATH") or "/usr/local/cuda") / "include"]
    if find_nvcc(env):
        candidates.insert(0, Path(find_nvcc(env)).resolve().parent.parent / "include")
    return next((d for d in candidates if (d / "cuda_runtime.h").is_file()), None)


def decide(env=os.environ):
    """(nvcc, cmake) to build with, or None with the reason to skip; BuildError when forced and impossible."""
    setting = env.get(ENV, "").strip()
    if setting not in ("", "0", "1"):
        raise BuildError(
            f"{ENV} must be 0 (skip the native kernels), 1 (build them) or unset (build if nvcc is found); got {setting!r}"
        )
    if setting == "0":
        return None, f"{ENV}=0"
    nvcc, cmake = find_nvcc(env), shutil.which("cmake", path=env.get("PATH"))
    missing = [name for name, path in (("nvcc", nvcc), ("cmake", cmake)) if path is None]
    if missing:
        why = f"{' and '.join(missing)} not found (PATH, CUDA_HOME)"
        if setting == "1":
            raise BuildError(f"{ENV}=1 but {why}: install the CUDA toolkit and CMake, or unset {ENV}")
        return None, why
    return (nvcc, cmake), None


def build(out_dir, build_dir, nvcc, cmake, jobs=None):
    """Configure and build with CMake in build_dir; copy the library into out_dir; return its path."""
    out_dir, build_dir = Path(out_dir), Path(build_dir)
    configure = [
        cmake,
        "-S",
        str(ROOT),
        "-B",
        str(build_dir),
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_CUDA_COMPILER={nvcc}",
    ]
    compile_ = [cmake, "--build", str(build_dir), "--parallel", str(jobs or os.cpu_count() or 1)]
    for cmd in (configure, compile_):
        run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if run.returncode:
            raise BuildError(f"building fastdit's native kernels failed: {' '.join(cmd)}\n{run.stdout[-4000:]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(build_dir / LIB_NAME, out_dir / LIB_NAME))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR, help=f"folder for {LIB_NAME} (default: %(default)s)")
    parser.add_argument(
        "--build-dir", type=Path, default=ROOT / "build" / "native", help="CMake build folder (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    try:
        tools, _ = decide({**os.environ, ENV: "1"})
        start = time.perf_counter()
        lib = build(args.out, args.build_dir, *tools)
    except BuildError as e:
        sys.exit(f"error: {e}")
    print(f"built {lib} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
