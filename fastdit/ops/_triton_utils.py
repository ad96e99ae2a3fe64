"""Triton setup shared by the op modules: interpreter choice, launch helpers, op registration.

Imported by each op module before it defines kernels. Triton decides at decoration time
whether a kernel is compiled or interpreted, from TRITON_INTERPRET: a process without CUDA
interprets (so the `triton` backend runs on CPU tensors); set TRITON_INTERPRET=1 yourself
before fastdit's kernels load to interpret on a machine that has a GPU.
"""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def check_device(name, t):
    """Raise if the kernels cannot run on `t`'s device in this process."""
    if t.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(
            f"{name} is a CPU tensor but fastdit's Triton kernels were compiled for the GPU; "
            "set TRITON_INTERPRET=1 before importing fastdit's kernels to run them on CPU, "
            "or use FASTDIT_BACKEND=reference"
        )
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{name} is on {t.device}; fastdit's Triton kernels run on CUDA (and CPU, interpreted)")


def row_major(t):
    """`t` with a unit stride in its last dimension (the kernels take the other strides as given)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()
