"""gated_residual_modulate_layer_norm: eager, torch.compile(reference), fastdit Triton and
apex (eager gated residual, apex FusedLayerNorm, eager modulate) side by side.

Bytes (e = 2 bytes per bf16 element, N = B*T rows of D):
  fwd  reads x and y (2 N D e), gate, shift and scale (3 B D e); writes r and out (2 N D e),
       mean and rstd (2 N 4)
  bwd  reads dr, dout, r and y (4 N D e), gate and scale (2 B D e), mean and rstd (2 N 4);
       writes dx and dy (2 N D e), dgate, dshift and dscale (3 B D e)
  fwd+bwd  the sum
Rows and method: benchmarks/kernel_bench.py.
"""

import pytest

from benchmarks import kernel_bench as kb
from fastdit import ops, reference

SUITE = "gated_residual_modulate_layer_norm"


def apex(case, D):
    modulate_layer_norm = kb.apex_modulate_layer_norm(D)
    if modulate_layer_norm is None:
        return None

    def run(x, y, gate, shift, scale):
        r = reference.gated_residual(x, y, gate)
        return r, modulate_layer_norm(r, shift, scale)

    return run


IMPLS = kb.implementations(
    ops.gated_residual_modulate_layer_norm, reference.gated_residual_modulate_layer_norm, apex=apex
)


def traffic(B, T, D, e=2):
    """(forward bytes, backward bytes): the docstring's formulas."""
    N = B * T
    return 4 * N * D * e + 3 * B * D * e + 2 * N * 4, 6 * N * D * e + 5 * B * D * e + 2 * N * 4


@pytest.mark.parametrize("shape, mode, impl", kb.row_cases(IMPLS), ids=str)
def test_gated_residual_modulate_layer_norm(shape, mode, impl):
    kb.run_row_case(SUITE, IMPLS, shape, mode, impl, tensors=2, vectors=3, traffic=traffic)
