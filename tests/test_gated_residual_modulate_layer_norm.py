"""fastdit.ops.gated_residual_modulate_layer_norm's Triton and native CUDA kernels against fastdit.reference (tests/kernel_helpers.py: the backends)."""

from fastdit import ops, reference
from tests.kernel_helpers import KERNEL_FIXTURES, RowOpTests, kernel_backend, poisoned  # noqa: F401 (fixtures)


@KERNEL_FIXTURES
class TestGatedResidualModulateLayerNorm(RowOpTests):
    op = ops.gated_residual_modulate_layer_norm
    ref = reference.gated_residual_modulate_layer_norm
    names = ("x", "y", "gate", "shift", "scale")
