"""gated_residual: eager, torch.compile(reference) and fastdit Triton side by side (no third-party
kernel does this op: a row-broadcast addcmul).

Bytes (e = 2 bytes per bf16 element, N = B*T rows of D):
  fwd  reads x and y (2 N D e), gate (B D e); writes out (N D e)
  bwd  reads dout and y (2 N D e), gate (B D e); writes dy (N D e), dgate (B D e)
       (dx is dout itself: no bytes)
  fwd+bwd  the sum
Rows and method: benchmarks/kernel_bench.py.
"""

import pytest

from benchmarks import kernel_bench as kb
from fastdit import ops, reference

SUITE = "gated_residual"
IMPLS = kb.implementations(ops.gated_residual, reference.gated_residual)


def traffic(B, T, D, e=2):
    """(forward bytes, backward bytes): the docstring's formulas."""
    N = B * T
    return 3 * N * D * e + B * D * e, 3 * N * D * e + 2 * B * D * e


@pytest.mark.parametrize("shape, mode, impl", kb.row_cases(IMPLS), ids=str)
def test_gated_residual(shape, mode, impl):
    kb.run_row_case(SUITE, IMPLS, shape, mode, impl, tensors=2, vectors=1, traffic=traffic)
