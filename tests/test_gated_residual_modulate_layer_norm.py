"""fastdit.ops.gated_residual_modulate_layer_norm's Triton and native CUDA kernels against fastdit.reference (tests/kernel_helpers.py: the backends)."""

from functools import partial

import pytest
import torch

from fastdit import ops, reference
from tests.kernel_helpers import (  # noqa: F401 (fixtures)
    KERNEL_FIXTURES,
    RowOpTests,
    adaln_rows,
    check_op,
    kernel_backend,
    poisoned,
    run_op,
    several_chunks,
)

NAMES = ("x", "y", "gate", "shift", "scale")


@KERNEL_FIXTURES
class TestGatedResidualModulateLayerNorm(RowOpTests):
    op = ops.gated_residual_modulate_layer_norm
    ref = reference.gated_residual_modulate_layer_norm
    names = NAMES


# keep_x: (x, y, modulation) dtypes. The first four let the backward recompute r from x (r's dtype is
# x's): one dtype, and bf16 autocast's fp32 stream with bf16 y and modulation. In the last, r is
# float32 but x bfloat16, so the op keeps r as without keep_x.
KEEP_X_DTYPES = [
    (torch.float32,) * 3,
    (torch.float16,) * 3,
    (torch.bfloat16,) * 3,
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, torch.float32),
]


def keep_x_inputs(B, T, D, dtypes, device):
    x_dtype, y_dtype, vec_dtype = dtypes
    x, y = (torch.randn(B, T, D, dtype=dt, device=device) for dt in (x_dtype, y_dtype))
    return [x, y, *adaln_rows(B, D, 3, vec_dtype, device)]


def saved_by(fn, inputs):
    """The tensors fn(*inputs)'s autograd keeps for the backward, and fn's outputs."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outs = fn(*inputs)
    return saved, outs


@KERNEL_FIXTURES
class TestKeepX:
    """keep_x=True: the op keeps x instead of r and its backward recomputes r; the same outputs and
    gradients, bit for bit, as keep_x=False, for every dtype mix and launch shape."""

    @pytest.mark.parametrize("dtypes", KEEP_X_DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
    # T = 1; odd B; D = 1152; D = 75, not a multiple of 8: the native kernels' scalar variant
    @pytest.mark.parametrize("shape", [(1, 1, 72), (3, 5, 216), (2, 9, 1152), (3, 4, 75)], ids=str)
    def test_same_values_and_gradients_bit_for_bit(self, shape, dtypes, device):
        inputs = keep_x_inputs(*shape, dtypes, device)
        grad_out = [torch.randn(shape, dtype=dtypes[0], device=device) for _ in range(2)]
        kept = partial(ops.gated_residual_modulate_layer_norm, keep_x=True)
        outs, grads = check_op(kept, reference.gated_residual_modulate_layer_norm, inputs, grad_out, NAMES)
        again = run_op(ops.gated_residual_modulate_layer_norm, inputs, grad_out)
        for name, a, b in zip(("r", "out", *(f"d{n}" for n in NAMES)), [*outs, *grads], [*again[0], *again[1]]):
            assert torch.equal(a, b), f"{name} differs from keep_x=False's"

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_gpu_blocking_and_strided_inputs(self, dtype, device, monkeypatch, kernel_backend):
        # several chunks per batch element, a ragged last one; x and y strided views, gate etc. .chunk views
        T = several_chunks(kernel_backend, monkeypatch)
        B, D = 3, 216
        x, y = (torch.randn(T, B, D + 8, dtype=dtype, device=device).transpose(0, 1)[..., :D] for _ in range(2))
        inputs = [x, y, *adaln_rows(B, D, 3, dtype, device)]
        grad_out = [torch.randn(B, T, D, dtype=dtype, device=device) for _ in range(2)]
        kept = run_op(partial(ops.gated_residual_modulate_layer_norm, keep_x=True), inputs, grad_out)
        plain = run_op(ops.gated_residual_modulate_layer_norm, inputs, grad_out)
        for a, b in zip([*kept[0], *kept[1]], [*plain[0], *plain[1]]):
            assert torch.equal(a, b)

    @pytest.mark.parametrize("dtypes", KEEP_X_DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
    def test_keeps_x_instead_of_r_where_r_has_its_dtype(self, dtypes, device):
        inputs = [t.requires_grad_() for t in keep_x_inputs(2, 3, 72, dtypes, device)]
        saved, (r, _) = saved_by(partial(ops.gated_residual_modulate_layer_norm, keep_x=True), inputs)
        recomputes = r.dtype == dtypes[0]
        assert any(t is inputs[0] for t in saved) == recomputes
        assert any(t.data_ptr() == r.data_ptr() for t in saved) != recomputes
        saved, (r, _) = saved_by(ops.gated_residual_modulate_layer_norm, inputs)
        assert not any(t is inputs[0] for t in saved) and any(t.data_ptr() == r.data_ptr() for t in saved)

    def test_rejects_a_keep_x_that_is_not_a_bool(self, device):
        with pytest.raises(TypeError, match="keep_x must be True or False, got 'yes'"):
            ops.gated_residual_modulate_layer_norm(*keep_x_inputs(1, 1, 72, (torch.float32,) * 3, device), keep_x="yes")
