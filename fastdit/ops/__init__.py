"""fastdit's fused ops (contracts in DESIGN.md) and the choice of backend that runs them.

    from fastdit import ops
    r, h = ops.gated_residual_modulate_layer_norm(x, y, gate, shift, scale)
    with ops.use_backend("reference"):
        ...
    with ops.use_attention_backend("triton"), ops.use_deterministic(True):
        o = ops.attention(q, k, v)          # ops.last_attention_backend() == "triton"

One name per op: `fastdit.ops.<op>` is the public function, `fastdit/ops/_<op>.py` its module
(validation, dispatch, custom ops `fastdit::<op>_fwd` / `fastdit::<op>_bwd`, autograd), Triton
kernels compiled as `<op>_fwd_kernel` / `<op>_bwd_kernel`, `fastdit.reference.<op>` its oracle,
`tests/test_<op>.py` its tests and `benchmarks/bench_<op>.py` its benchmark suite. The op modules
import Triton, so they load on first use of the op, not on `import fastdit`.
"""

import importlib
import os

import torch

# A torch built without CUDA (or ROCm) can only run Triton kernels through Triton's interpreter.
# Triton reads TRITON_INTERPRET when it first defines its own library (triton.language), which
# torch.compile may import before any fastdit kernel loads: so decide here, from the build alone
# (no device query), and keep whatever the user set.
if torch.version.cuda is None and torch.version.hip is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ._attention_policy import (
    ATTENTION_BACKENDS,
    DETERMINISTIC_ATTENTION_BACKENDS,
    last_attention_backend,
    requested_attention_backend,
    use_attention_backend,
    use_deterministic,
)
from ._dispatch import BACKENDS, BackendUnavailable, get_backend, use_backend

OPS = (
    "modulate_layer_norm",
    "gated_residual",
    "gated_residual_modulate_layer_norm",
    "patchify",
    "unpatchify",
    "attention",
)
# Further public functions of an op's module: name -> op.
EXTRAS = {"attention_packed": "attention", "attention_backend": "attention"}
__all__ = list(OPS) + list(EXTRAS) + [
    "BACKENDS", "BackendUnavailable", "get_backend", "use_backend",
    "ATTENTION_BACKENDS", "DETERMINISTIC_ATTENTION_BACKENDS", "use_attention_backend", "use_deterministic", "last_attention_backend", "requested_attention_backend",
]  # fmt: skip


def __getattr__(name):
    """The op functions, imported on first use (their modules import Triton)."""
    if name not in OPS and name not in EXTRAS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    fn = getattr(importlib.import_module(f"{__name__}._{EXTRAS.get(name, name)}"), name)
    globals()[name] = fn
    return fn
