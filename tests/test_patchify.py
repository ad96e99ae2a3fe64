"""fastdit.ops.patchify's Triton and native CUDA layout kernels against fastdit.reference (tests/kernel_helpers.py: the backends)."""

import pytest
import torch

from fastdit import ops, reference
from tests.helpers import DTYPES
from tests.kernel_helpers import (  # noqa: F401 (fixtures)
    KERNEL_FIXTURES,
    check_empty_batch,
    check_exact,
    kernel_backend,
    poisoned,
)

pytestmark = KERNEL_FIXTURES

SHAPES = [(1, 4, 8, 8, 2), (3, 3, 6, 10, 2), (2, 4, 16, 16, 8), (1, 5, 3, 6, 3)]  # (B, C, H, W, p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, device):
    *bchw, p = shape
    check_exact(
        lambda x: ops.patchify(x, p), lambda x: reference.patchify(x, p), torch.randn(bchw, dtype=dtype, device=device)
    )


@pytest.mark.parametrize(
    "image",
    [
        lambda: torch.randn(2, 4, 8, 6).to(memory_format=torch.channels_last),
        lambda: torch.randn(2, 4, 6, 8).transpose(2, 3),
        lambda: torch.randn(1, 4, 1, 6).expand(3, 4, 8, 6),  # stride-0 batch and rows
    ],
    ids=["channels_last", "transposed", "expanded"],
)
@pytest.mark.parametrize("grad_kind", ["contiguous", "transposed", "expanded"])
def test_strided_images_and_gradients(image, grad_kind, device):
    check_exact(lambda x: ops.patchify(x, 2), lambda x: reference.patchify(x, 2), image().to(device), grad_kind)


def test_rejects_too_many_features(device):
    with pytest.raises(ValueError, match="patch_size\\*\\*2 \\* channels = 16400 exceeds"):
        ops.patchify(torch.randn(1, 16400, 1, 1, device=device), 1)


def test_empty_batch(device, monkeypatch):
    x = torch.randn(0, 3, 6, 4, dtype=torch.bfloat16, device=device)
    check_empty_batch(lambda x: ops.patchify(x, 2), lambda x: reference.patchify(x, 2), [x], monkeypatch)
