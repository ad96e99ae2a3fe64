"""The test machinery itself: the judge (tests/helpers.py) passes correct low-precision results and
fails a small bias; interpreted kernels round to bfloat16 as the GPU does."""

import pytest
import torch

from fastdit import reference
from fastdit.ops._triton_utils import tl, triton
from tests.helpers import assert_close, reference_pair
from tests.kernel_helpers import round_bfloat16_like_the_gpu


def layer_norm_outputs(dtype):
    """(pt, ref) of modulate_layer_norm on a DiT-width row batch: a realistic spread of output magnitudes."""
    x, shift, scale = torch.randn(2, 16, 1152), torch.randn(2, 1152), torch.randn(2, 1152)
    pt, ref, _ = reference_pair(reference.modulate_layer_norm, [t.to(dtype) for t in (x, shift, scale)])
    return pt["out"][0].detach(), ref["out"][0].detach()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_judge_passes_correct_results_and_catches_a_one_percent_bias_or_scale_error(dtype):
    pt, ref = layer_norm_outputs(dtype)
    assert_close("PyTorch itself", pt, pt, ref)
    assert_close("float64 rounded once", ref.to(dtype), pt, ref)  # where pt is exact, one ulp is allowed
    bias = 0.01 * ref.abs().median()
    with pytest.raises(AssertionError, match="out of tolerance|a bias"):
        assert_close("biased", (ref + bias).to(dtype), pt, ref)
    with pytest.raises(AssertionError, match="out of tolerance|a scale error"):
        assert_close("scaled", (ref * 1.01).to(dtype), pt, ref)


def test_judge_gives_no_allowance_where_pytorch_overflows():
    ref = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    pt = torch.tensor([1.0, float("inf"), 3.0], dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="1 of 3 elements"):
        assert_close("out", torch.tensor([1.0, 100.0, 3.0], dtype=torch.bfloat16), pt, ref)
    with pytest.raises(AssertionError, match="NaN"):
        assert_close("out", torch.tensor([1.0, float("nan"), 3.0], dtype=torch.bfloat16), pt, ref)


@triton.jit
def _to_bfloat16_kernel(X, Y, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(Y + i, tl.load(X + i).to(tl.bfloat16))


def test_kernels_round_to_bfloat16_like_torch(device, monkeypatch):
    """The kernel tests' interpreter rounds float32 to bfloat16 as the GPU and torch do (to nearest even)."""
    round_bfloat16_like_the_gpu(monkeypatch)
    x = torch.randn(4096, device=device) * torch.exp2(torch.randint(-130, 120, (4096,), device=device).float())
    x[:5] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 3.4e38, float("inf"), float("nan")])  # ties to even; to inf; NaN
    y = torch.empty(4096, dtype=torch.bfloat16, device=device)
    _to_bfloat16_kernel[(1,)](x, y, N=4096)
    torch.testing.assert_close(y, x.to(torch.bfloat16), rtol=0, atol=0, equal_nan=True)
