"""fastdit.ops.modulate_layer_norm's Triton and native CUDA kernels against fastdit.reference (tests/kernel_helpers.py: the backends)."""
import torch

from fastdit import ops, reference
from fastdit.ops._triton_utils import offset64, tl, triton
from tests.kernel_helpers import KERNEL_FIXTURES, RowOpTests, kernel_backend, poisoned  # noqa: F401 (fixtures)


@KERNEL_FIXTURES
class TestModulateLayerNorm(RowOpTests):
    op = ops.modulate_layer_norm
    ref = reference.modulate_layer_norm
    names = ("x", "shift", "scale")


@triton.jit
def _offsets_kernel(I, STRIDE_I, J, STRIDE_J, OUT):
    tl.store(OUT, offset64(tl.load(I), tl.load(STRIDE_I), tl.load(J), tl.load(STRIDE_J)))


def test_offsets_are_64_bit():
    # Every kernel address goes through offset64. A (B, T, D) = (8192, 256, 1152) tensor's last
    # batch row starts at 8191 * 294912 > 2**31, from 32-bit index and stride: the kernels'
    # case, checked here without allocating 4.8 G elements.
    args = [torch.tensor([v], dtype=torch.int32) for v in (8191, 256 * 1152, 255, 1152)]
    out = torch.zeros(1, dtype=torch.int64)
    _offsets_kernel[(1,)](*args, out)
    assert out.item() == 8191 * 256 * 1152 + 255 * 1152
