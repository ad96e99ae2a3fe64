"""fastdit.ops.gated_residual's Triton and native CUDA kernels against fastdit.reference (tests/kernel_helpers.py: the backends)."""

import torch

from fastdit import ops, reference
from tests.kernel_helpers import KERNEL_FIXTURES, RowOpTests, kernel_backend, poisoned  # noqa: F401 (fixtures)


@KERNEL_FIXTURES
class TestGatedResidual(RowOpTests):
    op = ops.gated_residual
    ref = reference.gated_residual
    names = ("x", "y", "gate")

    def test_dx_is_the_incoming_gradient(self, device):
        x, y, gate = (t.requires_grad_() for t in self.inputs(2, 3, 72, torch.float32, device))
        grad = torch.randn(2, 3, 72, device=device)
        dx, _, _ = torch.autograd.grad(ops.gated_residual(x, y, gate), (x, y, gate), grad)
        assert dx.data_ptr() == grad.data_ptr()  # no kernel, no copy
