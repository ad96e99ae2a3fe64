"""The `cuda` backend: fastdit's native CUDA kernels (kernels/, a shared library with a C ABI).

The library is loaded with ctypes on first use, never on `import fastdit`: from $FASTDIT_NATIVE_LIB,
else fastdit/_native/libfastdit_kernels.so, which `pip install` builds when nvcc is found
(kernels/build.py). A C ABI, not a torch extension: it works with any CUDA build of torch and
builds without torch headers. Each launch passes pointers, sizes, strides in elements, dtype codes
and torch's current stream; it neither synchronises nor allocates, so CUDA graphs capture it.

The launchers take the arguments and return what the Triton launchers return (_rows.forward,
_rows.backward, _layout.to_tokens, _layout.to_image), into buffers made the same way, so an op
runs either behind the same custom op.
"""

import contextlib
import ctypes
import functools
import os
from pathlib import Path

import torch

from . import _layout, _rows
from . import _triton_utils as tu
from ._dispatch import BackendUnavailable
from ._triton_utils import row_major

ENV_LIB = "FASTDIT_NATIVE_LIB"
LIB_NAME = "libfastdit_kernels.so"
PACKAGED_LIB = Path(__file__).resolve().parent.parent / "_native" / LIB_NAME
HOW_TO_BUILD = "pip install -e . with nvcc and cmake on PATH (FASTDIT_BUILD_NATIVE=1 makes a missing one an error), or python kernels/build.py"
ABI_VERSION = 2  # kernels/fastdit_kernels.h FASTDIT_ABI_VERSION
MAX_D = 4096  # FASTDIT_ROWS_MAX_D: a thread holds 8 columns, a block at most 512 threads
MAX_F = 16384  # FASTDIT_LAYOUT_MAX_F
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class NativeUnavailable(BackendUnavailable):
    """The native kernels cannot run here: the library is missing, unloadable or stale."""


class RowsTensor(ctypes.Structure):
    """fastdit_rows_tensor: a (B, T, D) or (B, D) tensor with a unit stride along D."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("stride_b", ctypes.c_int64),
        ("stride_t", ctypes.c_int64),
        ("dtype", ctypes.c_int32),
    ]


_T = ctypes.POINTER(RowsTensor)
_I64, _VOIDP = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {  # name -> (restype, argtypes)
    "fastdit_abi_version": (ctypes.c_int, []),
    "fastdit_error_string": (ctypes.c_char_p, [ctypes.c_int]),
    "fastdit_rows_forward": (ctypes.c_int, [_T] * 7 + [_VOIDP, _VOIDP, _I64, _I64, _I64, ctypes.c_float, _VOIDP]),
    "fastdit_rows_backward_chunks": (
        ctypes.c_int,
        [_I64, _I64, _I64, ctypes.c_int32, ctypes.c_int, ctypes.c_int, ctypes.POINTER(_I64)],
    ),
    "fastdit_rows_backward": (
        ctypes.c_int,
        [_T] * 3 + [_VOIDP, _VOIDP] + [_T] * 5 + [_VOIDP, _I64, _VOIDP, _I64, _I64, _I64, ctypes.c_int, _VOIDP],
    ),
    "fastdit_layout": (
        ctypes.c_int,
        [_VOIDP, ctypes.POINTER(_I64), _VOIDP, ctypes.POINTER(_I64)]
        + [_I64] * 5
        + [ctypes.c_int32, ctypes.c_int, ctypes.c_int, _VOIDP],
    ),
}


def library_path():
    """Where the library is looked for: $FASTDIT_NATIVE_LIB, else the one pip install builds."""
    return Path(os.environ[ENV_LIB]) if os.environ.get(ENV_LIB) else PACKAGED_LIB


def load(path):
    """The library at `path` with its C signatures declared; NativeUnavailable saying why not."""
    where = f"{ENV_LIB}={path}" if os.environ.get(ENV_LIB) else str(path)
    if not Path(path).is_file():
        raise NativeUnavailable(
            f"fastdit's native CUDA kernels are not built: {where} does not exist; build them with {HOW_TO_BUILD}"
        )
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeUnavailable(f"cannot load fastdit's native CUDA kernels from {where}: {e}") from None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name, None)
        if fn is None:
            raise NativeUnavailable(
                f"{where} is not fastdit's native kernel library (no {name}); rebuild it with {HOW_TO_BUILD}"
            )
        fn.restype, fn.argtypes = restype, argtypes
    if lib.fastdit_abi_version() != ABI_VERSION:
        raise NativeUnavailable(
            f"{where} has ABI version {lib.fastdit_abi_version()}, this fastdit needs {ABI_VERSION}: rebuild it with {HOW_TO_BUILD}"
        )
    return lib


@functools.cache
def library():
    """The loaded library (once per process; failures are not cached)."""
    return load(library_path())


def check_device(name, device):
    """Raise unless `device` is a CUDA device: the native kernels run on NVIDIA GPUs only."""
    if device.type != "cuda":
        raise BackendUnavailable(
            f"{name} is on {device}, and the cuda backend (FASTDIT_BACKEND=cuda) runs fastdit's native kernels "
            "on CUDA tensors only; use the auto, triton or reference backend for it"
        )


def check_width(D):
    if D > MAX_D:
        raise ValueError(
            f"x's last dimension D={D} exceeds the native CUDA row kernels' maximum of {MAX_D}; use the triton backend"
        )


def check_features(F):
    if F > MAX_F:
        raise ValueError(f"patch_size**2 * channels = {F} exceeds the native CUDA layout kernel's maximum of {MAX_F}")


def _call(name, *args):
    status = getattr(library(), name)(*args)
    if status:
        raise RuntimeError(f"fastdit's native kernel {name} failed: {library().fastdit_error_string(status).decode()}")


def _strides(t):
    """t's strides in elements, 0 along dimensions of size 1 (no element is reached through them)."""
    return [s if n > 1 else 0 for s, n in zip(t.stride(), t.shape)]


def _rows_tensor(t):
    """A pointer to t as a fastdit_rows_tensor (unit last stride), or NULL for None."""
    if t is None:
        return None
    stride_b, stride_t = (_strides(t) + [0])[:2]
    return ctypes.pointer(RowsTensor(t.data_ptr(), stride_b, stride_t, DTYPE_CODES[t.dtype]))


def _ptr(t):
    return None if t is None else t.data_ptr()


def _launch_context(*tensors):
    """Every tensor on one CUDA device, made current (kernels launch on the current device)."""
    present = [t for t in tensors if t is not None]
    device = present[0].device
    if device.type != "cuda" or any(t.device != device for t in present):
        where = sorted({str(t.device) for t in present})
        raise ValueError(
            f"fastdit's native CUDA kernels need every tensor on one CUDA device, got tensors on {', '.join(where)}"
        )
    return contextlib.nullcontext() if device.index == torch.cuda.current_device() else torch.cuda.device(device)


def _stream():
    return torch.cuda.current_stream().cuda_stream


def _same_dtype(*tensors):
    """The tensors in one dtype, torch's promotion of theirs (upcasts only: exact)."""
    present = [t for t in tensors if t is not None]
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in present))
    return [None if t is None else t.to(dtype) for t in tensors]


def forward(x, y=None, gate=None, shift=None, scale=None, eps=0.0):
    """_rows.forward on the native kernels: the same arguments, the same (r, out, mean, rstd)."""
    r, out, mean, rstd = outputs = _rows.forward_buffers(x, y, gate, shift, scale)
    B, T, D = x.shape
    x, y = _same_dtype(x, y)  # the kernels load x and y in one dtype
    x, y, gate, shift, scale = (None if t is None else row_major(t) for t in (x, y, gate, shift, scale))
    with _launch_context(x, y, gate, shift, scale):
        _call(
            "fastdit_rows_forward",
            *(_rows_tensor(t) for t in (x, y, gate, shift, scale, r, out)), _ptr(mean), _ptr(rstd),
            B, T, D, eps, _stream(),
        )  # fmt: skip
    return outputs


def backward(
    x_dtype, grad_out=None, r=None, scale=None, mean=None, rstd=None, grad_r=None, y=None, gate=None, recompute_r=False
):
    """_rows.backward on the native kernels: the same arguments, the same (dx, dy, sums)."""
    like = grad_out if grad_out is not None else grad_r
    B, T, D = like.shape
    dx, dy = _rows._grad_buffers(like, x_dtype, grad_out is not None, y)
    grad_out, r, grad_r, y = _same_dtype(grad_out, r, grad_r, y)  # the kernels load these in one dtype
    grad_out, r, scale, grad_r, y, gate = (
        None if t is None else row_major(t) for t in (grad_out, r, scale, grad_r, y, gate)
    )
    mean, rstd = (None if t is None else t.float().contiguous() for t in (mean, rstd))
    loaded = grad_out if grad_out is not None else grad_r
    n_sums = 2 * (grad_out is not None) + (y is not None)
    with _launch_context(grad_out, r, scale, mean, rstd, grad_r, y, gate):
        chunks = ctypes.c_int64()
        _call(
            "fastdit_rows_backward_chunks",
            B, T, D, DTYPE_CODES[loaded.dtype], y is not None, grad_out is not None, ctypes.byref(chunks),
        )  # fmt: skip
        partial = tu.empty((n_sums, B, chunks.value, D), torch.float32, like.device)
        sums = tu.empty((n_sums, B, D), torch.float32, like.device)
        _call(
            "fastdit_rows_backward",
            *(_rows_tensor(t) for t in (grad_out, r, scale)), _ptr(mean), _ptr(rstd),
            *(_rows_tensor(t) for t in (grad_r, y, gate, dx, dy)),
            partial.data_ptr(), chunks.value, sums.data_ptr(), B, T, D, recompute_r, _stream(),
        )  # fmt: skip
    return dx, dy, sums


def _move(img, tok, p, channels_last, to_image):
    """Move elements between img (B, C, H, W), any strides, and tok (B, T, C*p*p), unit feature stride."""
    B, C, H, W = img.shape
    image_strides = (ctypes.c_int64 * 4)(*_strides(img))
    token_strides = (ctypes.c_int64 * 2)(*_strides(tok)[:2])
    with _launch_context(img, tok):
        _call(
            "fastdit_layout",
            img.data_ptr(), image_strides, tok.data_ptr(), token_strides,
            B, C, H, W, p, DTYPE_CODES[img.dtype], channels_last, to_image, _stream(),
        )  # fmt: skip


def to_tokens(img, p, channels_last):
    """_layout.to_tokens on the native kernel: (B, C, H, W) -> (B, T, C*p*p)."""
    tok = _layout.tokens_like(img, p)
    _move(img, tok, p, channels_last, to_image=False)
    return tok


def to_image(tok, p, channels, h, w, channels_last):
    """_layout.to_image on the native kernel: (B, T = h*w, C*p*p) -> (B, C, h*p, w*p)."""
    img = _layout.image_like(tok, p, channels, h, w)
    _move(img, row_major(tok), p, channels_last, to_image=True)
    return img
