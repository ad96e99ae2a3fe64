"""Test setup: without CUDA, fastdit's Triton kernels run on CPU tensors through the interpreter,
and the tests marked `gpu` are skipped (the device check runs them, compiled, on a GPU:
`python -m benchmarks --device-check`).

TRITON_INTERPRET must be set before Triton decorates a kernel; on a GPU machine it stays unset
so the same tests run the compiled kernels on CUDA tensors.
"""

import os
import sys
import types

import pytest
import torch

# `tests` is this folder (a namespace package: tests.helpers, tests.kernel_helpers), even where an installed
# distribution ships a top-level `tests` package of its own (torch-fidelity 0.4.0's wheel does), which
# Python would otherwise prefer.
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in list(getattr(sys.modules.get("tests"), "__path__", [])):
    sys.modules["tests"] = types.ModuleType("tests")
    sys.modules["tests"].__path__ = [HERE]

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    needs_gpu = pytest.mark.skip(
        reason="needs a CUDA GPU (the device check runs it: python -m benchmarks --device-check)"
    )
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(needs_gpu)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
