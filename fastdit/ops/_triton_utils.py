"""Triton setup shared by the op modules: interpreter choice, launch helpers, op registration.

Imported by each op module before it defines kernels. Triton decides at decoration time
whether a kernel is compiled or interpreted, from TRITON_INTERPRET: with a CPU-only torch
build fastdit.ops sets it on import, and a process without a GPU sets it here, so the `triton`
backend runs on CPU tensors; set TRITON_INTERPRET=1 yourself, before importing triton, to
interpret on a machine that has a GPU.
"""

import functools
import os

import torch

from ._dispatch import get_backend, resolve

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")
# Triton's own library (tl.sum, ...) is interpreted only if TRITON_INTERPRET was set when it loaded.
_LIBRARY_INTERPRETED = type(tl.sum).__name__ == "InterpretedFunction"


def _squeeze_interpreted_indices():
    """Triton 3.6's interpreter turns a scalar into a Python index (a loop bound, an int argument)
    with int() of a shape-(1,) array, which numpy >= 2.4 refuses: every kernel then fails with
    "only 0-dimensional arrays can be converted to Python scalars" (triton-lang/triton#9171). Triton
    3.7 squeezes the array first; this gives 3.6 the same conversion, in the scope it patches and
    restores around each interpreted launch."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


if INTERPRET and triton.__version__.startswith("3.6."):
    _squeeze_interpreted_indices()


def check_device(name, t):
    """Raise if the kernels cannot run on `t`'s device in this process."""
    if t.device.type == "cpu" and not (INTERPRET and _LIBRARY_INTERPRETED):
        why = (
            "Triton was imported before TRITON_INTERPRET=1 was set (import fastdit first, or set it in the environment)"
            if INTERPRET
            else "fastdit's Triton kernels were compiled for the GPU (set TRITON_INTERPRET=1 before they load)"
        )
        raise RuntimeError(
            f"{name} is a CPU tensor, and the Triton kernels cannot run on the CPU in this process: {why}; "
            "or use FASTDIT_BACKEND=reference"
        )
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{name} is on {t.device}; fastdit's Triton kernels run on CUDA (and CPU, interpreted)")


def row_major(t):
    """`t` with a unit stride in its last dimension (the kernels take the other strides as given)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def empty(shape, dtype, device):
    """Every buffer a kernel fills: one place, so tests can poison them (NaN) before the kernels write."""
    return torch.empty(shape, dtype=dtype, device=device)


def gpu_launch(device):
    """Whether launches on `device` take the GPU's launch configuration: CUDA, or meta (the listing
    of the GPU's launches without a GPU, fastdit/ops/_codegen.py)."""
    return device.type in ("cuda", "meta")


@functools.cache
def sm_count(device):
    """Streaming multiprocessors of a CUDA device, asked once per device (at first launch, not import)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def capability(device):
    """(major, minor) compute capability of a CUDA device, asked once per device."""
    return torch.cuda.get_device_capability(device)


REGISTERS_PER_SM = 65536  # sm_80 and sm_90


def register_cap(programs_per_sm, num_warps):
    """The most registers a thread may take for programs_per_sm programs to fit on an SM: the launch's
    `maxnreg`. Left alone, ptxas may cap itself lower and spill (seen at 128), or take more than the
    grid assumes; tests/test_codegen.py checks that nothing spills under the cap."""
    return min(255, REGISTERS_PER_SM // (programs_per_sm * num_warps * 32) // 8 * 8)


def launch_options(num_warps, programs_per_sm=None, num_stages=3):
    """A kernel launch's compile options: warps, pipeline stages (Triton's default 3), the register
    cap for `programs_per_sm` programs per SM (None: ptxas chooses), and fused multiply-adds.

    FMAs are asked for, not left to Triton's default: every kernel was checked and compiled with
    them, as Triton up to 3.9 compiles by default, and Triton 3.10 turns that default off (3.9 warns
    at each process's first compile that it will)."""
    return dict(
        num_warps=num_warps,
        num_stages=num_stages,
        maxnreg=None if programs_per_sm is None else register_cap(programs_per_sm, num_warps),
        enable_fp_fusion=True,
    )


@triton.jit
def offset64(i, stride_i, j, stride_j):
    """i * stride_i + j * stride_j in 64 bits: tensors past 2**31 elements index correctly."""
    return i.to(tl.int64) * stride_i + j.to(tl.int64) * stride_j


def implementation(name, t, *others):
    """What an op runs on its input `name` = t and its other inputs: 'reference', 'triton' or 'cuda'
    (raising where the kernels cannot run there). The custom ops take it as their `impl` argument.

    The kernels compute in float32: float64 inputs (a model.double(), say, for a gradient check) run the
    reference, in float64, under `auto`; the kernel backends, asked for by name, refuse them.

    An empty batch (t of B = 0, `model(x[mask], ...)` with an empty mask) runs the reference on every backend,
    once the backend has accepted the inputs: there is nothing to compute, and a kernel launched over no
    programs is an error or undefined on some Triton and CUDA versions. PyTorch's ops return the empty outputs
    and gradients, and the kernels, their launchers and custom ops never see B = 0."""
    impl = resolve(t.device, name)
    if impl != "reference" and any(u.dtype == torch.float64 for u in (t, *others)):
        if get_backend() == "auto":
            return "reference"
        raise TypeError(
            f"{name} or another input is float64, which the {impl} backend's kernels do not take (they compute "
            "in float32): float64 runs on the reference backend, which `auto` picks for it"
        )
    if impl == "triton":
        check_device(name, t)
    return "reference" if t.shape[0] == 0 else impl


# Tile sizes (elements of a BLOCK_T x BLOCK_COLS program tile). On the GPU, 4096 elements over 8
# warps is 16 per thread per live tensor. Compiled for sm_90 ahead of time (ptxas resource usage,
# no GPU needed), the heaviest kernel, the fused op's backward, takes 128 registers at D = 384,
# 768, 1024 and 1152 without spilling (2 programs, 16 warps, per SM), the forward at most 77.
# Reasoned and compile-checked, not yet timed on a GPU. The interpreter
# runs programs one after another, paying per operation, not per element: there, bigger tiles
# and fewer programs are simply faster.
GPU_TILE = 4096
INTERPRET_TILE = 1 << 15


def tile_rows(rows, block_cols, device):
    """BLOCK_T: how many rows of `block_cols` columns one tile holds (a power of two)."""
    budget = GPU_TILE if gpu_launch(device) else INTERPRET_TILE
    return min(max(1, budget // block_cols), triton.next_power_of_2(rows))


def num_warps(tile_elems):
    """Warps for a tile: about 16 elements per thread, 4 to 16 warps."""
    return min(16, max(4, tile_elems // 512))
