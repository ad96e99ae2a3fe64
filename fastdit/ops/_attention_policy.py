"""Which attention backend runs, and how: the names, the settings and what ran last.

Imports neither Triton nor any optional package, so fastdit.ops exports these on `import fastdit`.

Backends (ATTENTION_BACKENDS):
  auto            on CUDA the fastest installed backend for (Tq, Tk, Dh, dtype, device, training,
                  deterministic), measured once per process and cached; on CPU `math` (the oracle,
                  as every other op's `auto` runs the reference on CPU)
  triton          fastdit's FlashAttention-2 style Triton kernels (CPU tensors: interpreted)
  flash_attn      the flash-attn package: FlashAttention-3 (flash_attn_interface) when installed,
                  else FlashAttention-2
  xformers        xformers.ops.memory_efficient_attention
  sdpa            torch scaled_dot_product_attention, PyTorch choosing its kernel
  sdpa_flash, sdpa_efficient, sdpa_cudnn, sdpa_math
                  the same, forced to one SDPA kernel (FLASH_ATTENTION, EFFICIENT_ATTENTION,
                  CUDNN_ATTENTION, MATH)
  math            fastdit.reference.attention

The backend of a call: the `backend=` argument, else the innermost use_attention_backend(name),
else $FASTDIT_ATTENTION, else FASTDIT_BACKEND / use_backend mapped (reference -> math,
triton -> triton, auto and cuda -> auto). So `with use_backend("reference"),
use_attention_backend("triton"):` runs every other op on the reference and attention on Triton.
"""

import contextlib
import os
import threading

import torch

from ._dispatch import get_backend

ATTENTION_BACKENDS = (
    "auto", "triton", "flash_attn", "xformers",
    "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "math",
)  # fmt: skip
# Those whose backward can be made deterministic (use_deterministic(True): auto keeps only these in training).
DETERMINISTIC_ATTENTION_BACKENDS = ("triton", "flash_attn", "sdpa_math", "math")
ENV_VAR = "FASTDIT_ATTENTION"
_FROM_GLOBAL_BACKEND = {"auto": "auto", "reference": "math", "triton": "triton", "cuda": "auto"}

_local = threading.local()
# Process-wide, not per thread: the autograd engine runs CUDA backwards on its own threads.
_state = {"deterministic": False, "last": None}


def check_attention_backend(name, source="backend"):
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(ATTENTION_BACKENDS)}; got {name!r}")
    return name


def requested_attention_backend(backend=None):
    """The backend name asked for (possibly 'auto'), by the precedence in this module's docstring."""
    if backend is not None:
        return check_attention_backend(backend)
    name = getattr(_local, "name", None)
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env:
        return check_attention_backend(env, ENV_VAR)
    return _FROM_GLOBAL_BACKEND[get_backend()]


@contextlib.contextmanager
def use_attention_backend(name):
    """Run fastdit.ops.attention inside the block on backend `name` (one of ATTENTION_BACKENDS); nests, per thread."""
    check_attention_backend(name)
    previous, _local.name = getattr(_local, "name", None), name
    try:
        yield name
    finally:
        _local.name = previous


class use_deterministic:
    """Deterministic attention backward (no atomics; bitwise reproducible), off by default.

    `use_deterministic(True)` sets it for the process; `with use_deterministic(True): ...` sets it
    for the block and restores the previous setting after. torch.use_deterministic_algorithms(True)
    turns it on too. The setting in force at a forward decides that call's backward.
    """

    def __init__(self, enabled=True):
        self._previous = _state["deterministic"]
        _state["deterministic"] = bool(enabled)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _state["deterministic"] = self._previous


def deterministic():
    """Whether attention backwards must be deterministic (use_deterministic or torch's global flag)."""
    return _state["deterministic"] or torch.are_deterministic_algorithms_enabled()


def last_attention_backend():
    """The backend the last eager fastdit.ops.attention call ran (e.g. 'triton', 'sdpa_cudnn'), None
    before any; calls traced by torch.compile are not recorded (a traced region mutates no Python state)."""
    return _state["last"]


def note_ran(name):
    _state["last"] = name
