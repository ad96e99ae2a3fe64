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


def test_backends_part_only_where_pytorch_layer_norm_overflows():
    """The documented difference (DESIGN.md), on CPU: where a row's squared deviations sum past 3.4e38
    (here about 1e39), PyTorch's layer_norm, the reference backend, returns `shift` (or NaN for some
    widths once single squares overflow, |x| ~ 1e20); just below (about 1e38) it is accurate. The Triton
    kernels match float64 throughout."""
    x, shift, scale = torch.randn(2, 3, 1152), torch.randn(2, 1152), torch.randn(2, 1152)
    for std, reference_gives in ((3e17, None), (1e18, "shift"), (1e20, "shift or nan")):
        expected = reference.modulate_layer_norm(x.double() * std, shift.double(), scale.double())
        for backend in ("reference", "triton"):
            with ops.use_backend(backend):
                out = ops.modulate_layer_norm(x * std, shift, scale)
            if backend == "reference" and reference_gives:
                is_shift = torch.equal(out, shift[:, None].expand_as(out))
                assert is_shift or (reference_gives == "shift or nan" and out.isnan().any()), "update the docs"
            else:
                torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


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
