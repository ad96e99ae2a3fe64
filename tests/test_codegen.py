"""GPU readiness without a GPU: every kernel and configuration the launchers choose for the DiT
family (row, layout and attention kernels; three dtypes and bf16 autocast's mix; head counts with and
without 16 as a divisor, which Triton specialises on) compiled ahead of
time through Triton's whole pipeline (fastdit/ops/_codegen.py): for sm_80 and sm_90 with the
installed Triton, and for sm_90 with Triton 3.6, the GPU machine's (an H100 or H200; sm_80 there
would only double the gate's time). Each compiles, spills nothing, fits the programs per SM its
launcher sizes the grid for, and keeps what makes it fast: 16-byte loads, and for 16-bit attention
tensor-core dots and pipelined copies.

Triton 3.6 runs from .ci/triton-3.6, which .ci/run installs
(pip install --target .ci/triton-3.6 triton==3.6.0 --no-deps); without it that half is skipped.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TRITON_36

REPO = Path(__file__).resolve().parents[1]
ATTENTION_DOTS = ("attention_fwd_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel")


def compile_gate(pythonpath, archs, cache_dir):
    """The gate's JSON rows for `archs` (compute capabilities), compiled in a child process whose
    Triton comes first on `pythonpath`.

    Into an empty cache: Triton's cache key leaves out the name a kernel compiles under, so a warm
    cache would hand back a kernel compiled under an earlier name."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(cache_dir),
               PYTHONPATH=os.pathsep.join(filter(None, [pythonpath, str(REPO), os.environ.get("PYTHONPATH")])))  # fmt: skip
    env.pop("TRITON_DEFAULT_FP_FUSION", None)  # the launches ask for FMAs themselves: Triton's default must not matter
    check = "import triton, os; print(triton.__version__, os.path.exists(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump')))"
    found = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    assert found.returncode == 0, f"Triton from {pythonpath or 'site-packages'} does not import: {found.stderr[-2000:]}"
    version, has_cuobjdump = found.stdout.split()
    if has_cuobjdump != "True":
        pytest.skip(f"Triton {version} here cannot compile ahead of time for NVIDIA GPUs (no bundled cuobjdump)")
    cmd = [
        sys.executable,
        "-m",
        "fastdit.ops._codegen",
        "--gate",
        "--arch",
        ",".join(map(str, archs)),
        "--jobs",
        str(os.cpu_count() or 1),
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, f"Triton {version}: {done.stderr[-3000:]}"
    # Triton 3.9 warns at the first compile that leaves fused multiply-adds to its default
    assert "TRITON_DEFAULT_FP_FUSION" not in done.stderr, f"Triton {version}: {done.stderr[-3000:]}"
    return version, [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture(scope="module", params=["installed", "3.6"])
def gate(request, tmp_path_factory):
    if request.param == "3.6" and not (TRITON_36 / "triton").is_dir():
        pytest.skip(f"Triton 3.6 is not at {TRITON_36}: pip install --target {TRITON_36} triton==3.6.0 --no-deps")
    cache = tmp_path_factory.mktemp(f"triton-cache-{request.param}")
    archs = (90,) if request.param == "3.6" else (80, 90)  # the GPU machine's Triton: its GPUs' architecture only
    return (*compile_gate(str(TRITON_36) if request.param == "3.6" else None, archs, cache), archs)


def where(version, r):
    return f"Triton {version}, sm_{r['arch']}: {r['kernel']} for {r['workload']} ({r['num_warps']} warps, {r['constexprs']}): {r}"


def test_every_dit_kernel_compiles_for_each_architecture(gate):
    version, rows, archs = gate
    kernels = {(r["arch"], r["kernel"]) for r in rows}
    for arch in archs:
        for op in (
            "modulate_layer_norm",
            "gated_residual",
            "gated_residual_modulate_layer_norm",
            "patchify",
            "unpatchify",
        ):
            assert {(arch, f"{op}_fwd_kernel"), (arch, f"{op}_bwd_kernel")} <= kernels, (
                f"Triton {version}, sm_{arch}: {op}"
            )
        assert {(arch, k) for k in (*ATTENTION_DOTS, "attention_bwd_delta_kernel")} <= kernels


def test_no_spills_and_the_occupancy_the_launchers_assume(gate):
    version, rows, _ = gate
    for r in rows:
        assert r["stack_bytes"] == 0 and r["local_bytes"] == 0, f"spills: {where(version, r)}"
        assert r["programs_per_sm"] >= r["assumed_programs_per_sm"], (
            f"{r['programs_per_sm']} programs fit per SM, the launcher sizes its grid for {r['assumed_programs_per_sm']}: {where(version, r)}"
        )


def test_vector_loads_fused_multiply_adds_and_tensor_cores_survive(gate):
    version, rows, _ = gate
    for r in rows:
        if not r["kernel"].startswith(("patchify", "unpatchify")):  # a permutation: one side is strided
            assert r["vector_loads"] > 0, f"no 16-byte loads: {where(version, r)}"
        if r["workload"].startswith("rows"):  # LayerNorm's (x - mean) * rstd * (1 + scale) + shift, at least
            assert r["fused_multiply_adds"] > 0, f"no fused multiply-adds: {where(version, r)}"
        if r["kernel"] in ATTENTION_DOTS and "fp32" not in r["workload"]:
            assert r["tensor_core_ops"] > 0 and r["cp_async"] > 0, (
                f"no tensor-core dots or no cp.async: {where(version, r)}"
            )
