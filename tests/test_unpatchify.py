"""fastdit.ops.unpatchify's Triton and native CUDA layout kernels against fastdit.reference (tests/kernel_helpers.py: the backends)."""

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

CASES = [(1, 2, 8, (4, 4)), (3, 2, 4, (3, 5)), (2, 8, 8, (2, 2)), (1, 3, 5, (1, 1))]  # (B, p, C, (h, w))


def unpatchify_pair(p, C, grid):
    return (lambda x: ops.unpatchify(x, p, C, grid), lambda x: reference.unpatchify(x, p, C, grid))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case, dtype, device):
    B, p, C, (h, w) = case
    check_exact(*unpatchify_pair(p, C, (h, w)), torch.randn(B, h * w, p * p * C, dtype=dtype, device=device))


def test_square_grid_by_default(device):
    x = torch.randn(2, 16, 32, device=device)
    assert torch.equal(ops.unpatchify(x, 2, 8), reference.unpatchify(x, 2, 8))


@pytest.mark.parametrize(
    "tokens",
    [lambda: torch.randn(2, 32, 15).transpose(1, 2), lambda: torch.randn(2, 15, 40)[..., :32]],
    ids=["transposed", "sliced"],
)
@pytest.mark.parametrize("grad_kind", ["contiguous", "transposed", "expanded"])
def test_strided_tokens_and_gradients(tokens, grad_kind, device):
    check_exact(*unpatchify_pair(2, 8, (3, 5)), tokens().to(device), grad_kind)


def test_rejects_too_many_features(device):
    with pytest.raises(ValueError, match="patch_size\\*\\*2 \\* channels = 16400 exceeds"):
        ops.unpatchify(torch.randn(1, 1, 16400, device=device), 1, 16400)


def test_empty_batch(device, monkeypatch):
    x = torch.randn(0, 6, 12, dtype=torch.bfloat16, device=device)  # a 2 x 3 grid of 2 x 2 x 3 patches
    check_empty_batch(*unpatchify_pair(2, 3, (2, 3)), [x], monkeypatch)
