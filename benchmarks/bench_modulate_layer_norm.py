"""modulate_layer_norm: eager, torch.compile(reference), fastdit Triton and apex side by side.

Bytes (e = 2 bytes per bf16 element, N = B*T rows of D):
  fwd  reads x (N D e), shift and scale (2 B D e); writes out (N D e), mean and rstd (2 N 4)
  bwd  reads dout and x (2 N D e), scale (B D e), mean and rstd (2 N 4); writes dx (N D e),
       dshift and dscale (2 B D e)
  fwd+bwd  the sum
Rows and method: benchmarks/kernel_bench.py.
"""

import pytest

from benchmarks import kernel_bench as kb
from fastdit import ops, reference

SUITE = "modulate_layer_norm"
IMPLS = kb.implementations(
    ops.modulate_layer_norm, reference.modulate_layer_norm, apex=lambda case, D: kb.apex_modulate_layer_norm(D)
)


def traffic(B, T, D, e=2):
    """(forward bytes, backward bytes): the docstring's formulas."""
    N = B * T
    return 2 * N * D * e + 2 * B * D * e + 2 * N * 4, 3 * N * D * e + 3 * B * D * e + 2 * N * 4


@pytest.mark.parametrize("shape, mode, impl", kb.row_cases(IMPLS), ids=str)
def test_modulate_layer_norm(shape, mode, impl):
    kb.run_row_case(SUITE, IMPLS, shape, mode, impl, tensors=1, vectors=2, traffic=traffic)
