"""fastdit.ops.gated_residual_modulate_layer_norm's Triton kernels against fastdit.reference (interpreted on CPU)."""
from fastdit import ops, reference
from tests.kernel_helpers import KERNEL_FIXTURES, RowOpTests, poisoned, triton_backend  # noqa: F401 (fixtures)


@KERNEL_FIXTURES
class TestGatedResidualModulateLayerNorm(RowOpTests):
    op = ops.gated_residual_modulate_layer_norm
    ref = reference.gated_residual_modulate_layer_norm
    names = ("x", "y", "gate", "shift", "scale")
