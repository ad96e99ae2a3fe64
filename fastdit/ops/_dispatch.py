"""Which implementation an op runs: FASTDIT_BACKEND, use_backend(), and the tensors' device.

auto       Triton kernels on CUDA tensors, the pure-PyTorch reference on CPU tensors (default)
reference  fastdit.reference everywhere
triton     the Triton kernels everywhere; on CPU tensors through Triton's interpreter
cuda       fastdit's native CUDA kernels (kernels/, fastdit/ops/_native.py) on CUDA tensors; an error
           naming what is missing where they cannot run (no library built, a CPU tensor)
"""

import contextlib
import os
import threading

BACKENDS = ("auto", "reference", "triton", "cuda")
ENV_VAR = "FASTDIT_BACKEND"

_local = threading.local()


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run these inputs here: a package not installed, the native library not
    built, or tensors on a device it does not run on. Bad input to a command, not a bug."""


def _check_name(name, source):
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def get_backend():
    """The backend in force: the innermost use_backend(...), else $FASTDIT_BACKEND, else 'auto'."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


@contextlib.contextmanager
def use_backend(name):
    """Run the ops inside the block with backend `name` (one of BACKENDS); nests, per thread."""
    _check_name(name, "backend")
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


def kernels(impl, triton_launchers):
    """The launchers an op's custom ops call for `impl`: the native kernels' (fastdit.ops._native)
    for 'cuda', else `triton_launchers` (_rows or _layout); both offer the same functions."""
    if impl == "cuda":
        from . import _native

        return _native
    return triton_launchers


def resolve(device, name="the input"):
    """The implementation ('reference', 'triton' or 'cuda') an op runs for its input `name` on `device`."""
    backend = get_backend()
    if backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if backend == "cuda":
        from . import _native  # the library loads on the cuda backend's first use, not on import

        _native.check_device(name, device)
        _native.library()
    return backend
