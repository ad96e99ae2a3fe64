"""What the kernel tests share: the backend under test, NaN-poisoned buffers, and one check of an
op (outputs and every gradient) against fastdit.reference by the DESIGN.md rule."""

import numpy as np
import pytest
import torch

from fastdit import ops
from fastdit.ops import _native, _rows, _triton_utils
from fastdit.ops._triton_utils import INTERPRET, tl, triton
from tests.helpers import DTYPES, assert_close, reference_pair
from tests.native_helpers import use_built_native, use_emulated_native

# triton: the Triton kernels (interpreted on CPU tensors); cuda: the native kernels on a GPU;
# cuda_emulated: without a GPU, the native kernels' sources run on the CPU (tests/native_emulation).
KERNEL_BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.gpu), "cuda_emulated"]


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer a kernel fills starts as NaN (integers: -1), so an element it fails to write shows."""
    empty = _triton_utils.empty

    def poisoned_empty(shape, dtype, device):
        t = empty(shape, dtype, device)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    monkeypatch.setattr(_triton_utils, "empty", poisoned_empty)


def bfloat16_bits(data):
    """bfloat16 bit patterns (numpy uint16, the interpreter's bfloat16 storage) of float32 numpy
    data, rounded to nearest even as the GPU's cvt.rn.bf16.f32 and torch do: the float32 bits plus
    half a bfloat16 ulp (less one on a tie with an even last bit), high half kept. Subnormals
    round alike; past the largest bfloat16, inf; NaN stays NaN."""
    bits = data.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.where(np.isnan(data), np.uint32(0x7FC0), rounded).astype(np.uint16)


def round_bfloat16_like_the_gpu(monkeypatch):
    """Interpreted kernels round float32 to bfloat16 to nearest even, as the GPU does (and torch).

    Triton's interpreter casts float32 to bfloat16 by dropping the low 16 bits (its cast passes no
    rounding mode): up to one ulp off and biased toward zero, so every bfloat16 kernel output and
    rounded intermediate (attention's P and dS) would carry an error the compiled kernel does not.
    """
    if not INTERPRET:
        return
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    cast = builder.cast_impl

    def cast_to_nearest(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(bfloat16_bits(src.data), tl.bfloat16)
        return cast(self, src, dst_type)

    monkeypatch.setattr(builder, "cast_impl", cast_to_nearest)


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request, monkeypatch):
    """Runs the test on each backend in KERNEL_BACKENDS that this machine has; yields its name."""
    name = request.param
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU (without one, cuda_emulated runs the same kernel sources)")
        use_built_native(monkeypatch)
    elif name == "triton":
        round_bfloat16_like_the_gpu(monkeypatch)
    elif name == "cuda_emulated":
        if torch.cuda.is_available():
            pytest.skip("a GPU runs the real native kernels (cuda)")
        use_emulated_native(monkeypatch)
    with ops.use_backend("triton" if name == "triton" else "cuda"):
        yield name


KERNEL_FIXTURES = pytest.mark.usefixtures("kernel_backend", "poisoned")


def run_op(fn, inputs, grad_out):
    """fn(*inputs) -> (outputs, gradients of every input) with upstream gradients grad_out."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    return outs, torch.autograd.grad(outs, leaves, grad_out)


def check_op(fn, ref_fn, inputs, grad_out=None, names=None, float64_only=False):
    """fn (the kernels) against ref_fn (fastdit.reference): every output and every input's gradient.

    inputs keep their strides (e.g. .chunk views); grad_out (default random) may be strided too.
    float64_only: no credit for PyTorch's own error (inputs where PyTorch in the dtype is wrong):
    the float64 results rounded once to the dtype stand in for pt. Returns the kernels' (outputs, gradients).
    """
    pt, ref, grad_out = reference_pair(ref_fn, inputs, grad_out)
    outs, grads = run_op(fn, inputs, grad_out)
    names = names or [f"input {i}" for i in range(len(inputs))]
    labels = [f"output {i}" for i in range(len(outs))] + [f"d{name}" for name in names]
    for label, got, p, r in zip(labels, [*outs, *grads], [*pt["out"], *pt["grad"]], [*ref["out"], *ref["grad"]]):
        p, r = p.detach(), r.detach()
        assert_close(label, got, r.to(p.dtype) if float64_only else p, r)
    return outs, grads


def adaln_rows(B, D, n, dtype, device):
    """n (B, D) views with row stride 6*D, as adaLN_modulation(c).chunk(6, dim=1) gives them."""
    return torch.randn(B, 6 * D, dtype=dtype, device=device).chunk(6, dim=1)[:n]


def upstream_grad(kind, shape, dtype, device):
    """An upstream gradient: 'contiguous', 'transposed' (last stride != 1), 'expanded' (all strides 0,
    as from .sum()) or 'batch_broadcast' (batch stride 0, unit last stride)."""
    B, T, D = shape
    if kind == "contiguous":
        return torch.randn(shape, dtype=dtype, device=device)
    if kind == "transposed":
        return torch.randn(B, D, T, dtype=dtype, device=device).transpose(1, 2)
    if kind == "expanded":
        return torch.randn((), dtype=dtype, device=device).expand(shape)
    return torch.randn(1, T, D, dtype=dtype, device=device).expand(shape)


def row_inputs(names, B, T, D, dtype, device, vec_dtype=None):
    """A row op's inputs in the order of `names`: x and y (B, T, D), the others (B, D) adaLN views."""
    rows = iter(adaln_rows(B, D, len(names), vec_dtype or dtype, device))
    return [torch.randn(B, T, D, dtype=dtype, device=device) if n in "xy" else next(rows) for n in names]


SHAPES = [(1, 1, 72), (3, 5, 216), (2, 9, 1152)]  # (B, T, D): T = 1, odd B, D = 72k not a power of two


def gpu_like_blocking(B, T, D, device, programs_per_sm):
    """The GPU's launch shape in miniature: 2-row tiles, 4 tokens per program, several chunks per
    batch element (the interpreter's own choice is one program per batch element)."""
    return _rows.Blocking(2, triton.next_power_of_2(D), 4, -(-T // 4), 4)


def several_chunks(backend, monkeypatch):
    """Tokens T at which `backend` splits each batch element into several chunks, the last one
    ragged: the Triton kernels with gpu_like_blocking; the native ones (backward chunks hold >= 32
    tokens) at T = 70, on an emulated device with enough multiprocessors to want the split."""
    if backend == "triton":
        monkeypatch.setattr(_rows, "blocking", gpu_like_blocking)
        return 11
    monkeypatch.setenv("FASTDIT_EMULATED_SMS", "64")
    return 70


def max_width(backend):
    """The widest row D the backend's row kernels take."""
    return _rows.MAX_D if backend == "triton" else _native.MAX_D


class RowOpTests:
    """The checks every row op (modulate_layer_norm, gated_residual, the fused op) passes; a test
    class per op sets `op`, `ref` (its fastdit.reference twin) and `names` (its tensor inputs in
    order: x and y are (B, T, D), the others (B, D) adaLN views)."""

    op = ref = names = None

    def inputs(self, B, T, D, dtype, device, vec_dtype=None):
        return row_inputs(self.names, B, T, D, dtype, device, vec_dtype)

    def scaled_inputs(self, factor, B, T, D, dtype, device):
        """inputs() with the (B, T, D) rows, x and y, multiplied by factor."""
        return [t * factor if n in "xy" else t for n, t in zip(self.names, self.inputs(B, T, D, dtype, device))]

    def check(self, inputs, grad_out=None, float64_only=False):
        return check_op(type(self).op, type(self).ref, inputs, grad_out, self.names, float64_only)

    def n_outputs(self, inputs):
        outs = type(self).ref(*inputs)
        return len(outs) if isinstance(outs, tuple) else 1

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    def test_matches_reference(self, shape, dtype, device):
        self.check(self.inputs(*shape, dtype, device))

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_low_variance_rows(self, dtype, device):
        # Rows of variance ~1e-6, LayerNorm's eps: there a wrong eps shows (randn rows barely feel it).
        self.check(self.scaled_inputs(1e-3, 3, 5, 216, dtype, device))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)  # float16 cannot hold 1e20
    def test_huge_rows_match_float64(self, dtype, device):
        # x, y ~ 1e20: the squared deviations (1e40) overflow float32, the statistics' dtype, and
        # PyTorch's own layer_norm with them (its float32 result is NaN, its bfloat16 one `shift`)
        self.check(self.scaled_inputs(1e20, 2, 3, 216, dtype, device), float64_only=True)

    @pytest.mark.parametrize("x_dtype, vec_dtype", [(torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16)])
    def test_mixed_dtypes(self, x_dtype, vec_dtype, device):
        # bf16 autocast: fp32 residual stream, bf16 GEMM outputs; outputs follow torch's promotion
        self.check(self.inputs(2, 5, 216, x_dtype, device, vec_dtype=vec_dtype))

    def test_strided_inputs(self, device):
        B, T, D = 3, 4, 72
        inputs = [
            torch.randn(T, B, D + 8, device=device).transpose(0, 1)[..., :D] if n in "xy" else v
            for n, v in zip(self.names, self.inputs(B, T, D, torch.float32, device))
        ]  # x, y: batch stride D + 8, token stride B * (D + 8)
        self.check(inputs)

    @pytest.mark.parametrize("kind", ["transposed", "expanded", "batch_broadcast"])
    def test_strided_upstream_gradients(self, kind, device):
        inputs = self.inputs(3, 4, 72, torch.float32, device)
        self.check(
            inputs, [upstream_grad(kind, (3, 4, 72), torch.float32, device) for _ in range(self.n_outputs(inputs))]
        )

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_gpu_blocking_is_correct_and_deterministic(self, dtype, device, monkeypatch, kernel_backend):
        # several chunks per batch element, several tiles (or row pairs) per chunk, a ragged last one
        T = several_chunks(kernel_backend, monkeypatch)
        inputs = self.inputs(3, T, 216, dtype, device)
        grad_out = [torch.randn(3, T, 216, dtype=dtype, device=device) for _ in range(self.n_outputs(inputs))]
        outs, grads = self.check(inputs, grad_out)
        again_outs, again_grads = run_op(type(self).op, inputs, grad_out)
        for a, b in zip([*outs, *grads], [*again_outs, *again_grads]):
            assert torch.equal(a, b), "two runs differ: the reductions must be deterministic"

    def test_empty_batch(self, device, monkeypatch):
        # B = 0 (the model on x[mask] with an empty mask): the reference's empty outputs and gradients, dtypes
        # promoted as ever (an fp32 stream, bf16 adaLN rows), and no kernel launched over no programs
        inputs = self.inputs(0, 5, 72, torch.float32, device, vec_dtype=torch.bfloat16)
        check_empty_batch(type(self).op, type(self).ref, inputs, monkeypatch)

    def test_rejects_rows_wider_than_the_kernels(self, device, kernel_backend):
        D = max_width(kernel_backend) + 1
        with pytest.raises(ValueError, match=f"D={D} exceeds"):
            type(self).op(*self.inputs(1, 1, D, torch.float32, device))


def check_exact(fn, ref_fn, x, grad_kind="contiguous"):
    """A layout op moves elements: output and gradient equal the reference's bit for bit."""
    ref_out = ref_fn(x)  # tokens (B, T, F), or an image (B, C, H, W): its gradient is made (B, C, H*W)
    grad = upstream_grad(grad_kind, ref_out.flatten(2).shape, x.dtype, x.device).unflatten(2, ref_out.shape[2:])
    (out,), (dx,) = run_op(fn, [x], [grad])
    (ref_out,), (ref_dx,) = run_op(ref_fn, [x], [grad])
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    assert torch.equal(out, ref_out), "forward differs from the reference"
    assert torch.equal(dx, ref_dx), "gradient differs from the reference"


def forbid_kernels(monkeypatch):
    """Until monkeypatch undoes it, a kernel about to run fails the test: every kernel, Triton's and the native
    ones alike, gets its buffers from _triton_utils.empty first."""

    def refuse(*args):
        raise AssertionError("a kernel ran: it asked _triton_utils.empty for its buffers")

    monkeypatch.setattr(_triton_utils, "empty", refuse)


def check_empty_batch(fn, ref_fn, inputs, monkeypatch):
    """fn on inputs of batch size B = 0: no kernel runs, and every output and every input's gradient has the
    shape and dtype ref_fn's (fastdit.reference's) has. Returns fn's outputs."""
    forbid_kernels(monkeypatch)
    ref_outs = ref_fn(*inputs)
    grad_out = [torch.empty_like(o) for o in (ref_outs if isinstance(ref_outs, tuple) else [ref_outs])]  # B = 0
    outs, grads = run_op(fn, inputs, grad_out)
    ref_outs, ref_grads = run_op(ref_fn, inputs, grad_out)
    labels = [f"output {i}" for i in range(len(outs))] + [f"gradient of input {i}" for i in range(len(grads))]
    for label, got, want in zip(labels, [*outs, *grads], [*ref_outs, *ref_grads], strict=True):
        assert (got.shape, got.dtype) == (want.shape, want.dtype), f"{label}: {got.shape} {got.dtype}, not {want}"
    return outs
