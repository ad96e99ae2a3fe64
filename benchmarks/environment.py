"""What a report must say about where it was measured: GPU, driver, CUDA, library versions, commit.

`python -m benchmarks.environment OUT.json` writes {"environment": ..., "ceilings": ...}; the
runner calls it in a child process so that the runner itself never holds GPU memory.
"""

import datetime
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
NVIDIA_SMI_FIELDS = (
    "driver_version",
    "clocks.max.sm",
    "clocks.max.memory",
    "power.limit",
)  # one query each: one unsupported field fails a query
OPTIONAL_PACKAGES = ("triton", "flash-attn", "xformers", "apex", "numpy", "matplotlib")


def _run(*cmd, cwd=None):
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit():
    """The checkout's commit, with '+dirty' when tracked files differ from it (None outside git)."""
    sha = _run("git", "rev-parse", "HEAD", cwd=REPO)
    if sha and _run("git", "status", "--porcelain", "--untracked-files=no", cwd=REPO):
        sha += "+dirty"
    return sha


def collect():
    """The environment of this process: GPU (or CPU for smoke runs), driver, versions, commit, date."""
    env = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "packages": {p: _version(p) for p in OPTIONAL_PACKAGES},
    }
    env["triton"] = env["packages"]["triton"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        smi = {
            f: _run("nvidia-smi", f"--query-gpu={f}", "--format=csv,noheader,nounits", "-i", "0")
            for f in NVIDIA_SMI_FIELDS
        }
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            compute_capability=f"{props.major}.{props.minor}",
            driver=smi["driver_version"],
            max_sm_clock_mhz=smi["clocks.max.sm"],
            max_memory_clock_mhz=smi["clocks.max.memory"],
            power_limit_w=smi["power.limit"],
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        env.update(gpu=None, driver=None)
    return env


def main(argv=None):
    from benchmarks import harness

    path = (argv or sys.argv[1:])[0]
    data = {"environment": collect(), "ceilings": harness.ceilings()}
    Path(path).write_text(json.dumps(data, indent=1))
    print(json.dumps(data["ceilings"]))


if __name__ == "__main__":
    main()
