"""Test setup: without CUDA, fastdit's Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before Triton decorates a kernel; on a GPU machine it stays unset
so the same tests run the compiled kernels on CUDA tensors.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
