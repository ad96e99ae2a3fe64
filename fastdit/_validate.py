"""Argument checks shared across fastdit (ops, diffusion, models): each error names the argument."""

import torch


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def can_read_values(t):
    """Whether a check may read t's values: only on the CPU (on a GPU it is a device-to-host sync
    per forward, and not capturable in a CUDA graph) and not while torch.compile traces (a
    data-dependent branch breaks fullgraph)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()
