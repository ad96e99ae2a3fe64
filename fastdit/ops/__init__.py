"""fastdit's fused ops (contracts in DESIGN.md) and the choice of backend that runs them.

    from fastdit import ops
    r, h = ops.gated_residual_modulate_layer_norm(x, y, gate, shift, scale)
    with ops.use_backend("reference"):
        ...
    with ops.use_attention_backend("triton"), ops.use_deterministic(True):
        o = ops.attention(q, k, v)          # ops.last_attention_backend() == "triton"

Each op lives in the module of the same name (kernels, launchers, autograd, dispatch). Those
modules import Triton, so they load on first use of the op, not on `import fastdit`.
"""
import importlib
import os
import sys
import types

import torch

# A torch built without CUDA (or ROCm) can only run Triton kernels through Triton's interpreter.
# Triton reads TRITON_INTERPRET when it first defines its own library (triton.language), which
# torch.compile may import before any fastdit kernel loads: so decide here, from the build alone
# (no device query), and keep whatever the user set.
if torch.version.cuda is None and torch.version.hip is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ._attention_policy import (
    ATTENTION_BACKENDS,
    attention_backend,
    last_attention_backend,
    use_attention_backend,
    use_deterministic,
)
from ._dispatch import BACKENDS, get_backend, use_backend

OPS = (
    "modulate_layer_norm",
    "gated_residual",
    "gated_residual_modulate_layer_norm",
    "patchify",
    "unpatchify",
    "attention",
)
# Further public functions of an op's module: name -> module.
EXTRAS = {"attention_packed": "attention"}
__all__ = list(OPS) + list(EXTRAS) + [
    "BACKENDS", "get_backend", "use_backend",
    "ATTENTION_BACKENDS", "use_attention_backend", "use_deterministic", "attention_backend", "last_attention_backend",
]  # fmt: skip


def __getattr__(name):
    if name not in OPS and name not in EXTRAS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    fn = getattr(importlib.import_module(f"{__name__}.{EXTRAS.get(name, name)}"), name)
    globals()[name] = fn
    return fn


class _OpsPackage(types.ModuleType):
    # Importing submodule X makes Python set package attribute X to the module; for the ops,
    # `fastdit.ops.X` must stay the function of that name.
    def __setattr__(self, name, value):
        if name in OPS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _OpsPackage
