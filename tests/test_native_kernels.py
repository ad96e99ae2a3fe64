"""The native CUDA kernels' own paths, beyond the op tests they share with the Triton kernels
(tests/test_<op>.py): scalar accesses (D % 8 != 0, misaligned views), x and y of different dtypes,
rows near the top of float32, tiled layouts, torch.compile; on a GPU, offsets past 2**31
elements and CUDA graphs. Without a GPU the kernels' sources run emulated on the CPU (cuda_emulated)."""

import pytest
import torch

from fastdit import ops, reference
from tests.helpers import DTYPES, assert_close
from tests.kernel_helpers import KERNEL_BACKENDS, check_exact, check_op, kernel_backend, poisoned, row_inputs, run_op  # noqa: F401

NATIVE_BACKENDS = [b for b in KERNEL_BACKENDS if b != "triton"]
pytestmark = [pytest.mark.parametrize("kernel_backend", NATIVE_BACKENDS, indirect=True), pytest.mark.usefixtures("kernel_backend", "poisoned")]  # fmt: skip

ROW_OPS = {  # op name -> (op, reference, input names)
    "modulate_layer_norm": (ops.modulate_layer_norm, reference.modulate_layer_norm, ("x", "shift", "scale")),
    "gated_residual": (ops.gated_residual, reference.gated_residual, ("x", "y", "gate")),
    "gated_residual_modulate_layer_norm": (
        ops.gated_residual_modulate_layer_norm, reference.gated_residual_modulate_layer_norm, ("x", "y", "gate", "shift", "scale"),
    ),
}  # fmt: skip


def check_row_op(name, inputs):
    op, ref, names = ROW_OPS[name]
    return check_op(op, ref, inputs, names=names)


@pytest.mark.parametrize("op", ROW_OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [36, 100])
def test_rows_not_a_multiple_of_8_take_the_scalar_kernels(op, dtype, D, device):
    check_row_op(op, row_inputs(ROW_OPS[op][2], 3, 5, D, dtype, device))


@pytest.mark.parametrize("op", ROW_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_views_take_the_scalar_kernels(op, dtype, device):
    # x and y start one element into their storage: not 16-byte aligned, although D % 8 == 0
    inputs = row_inputs(ROW_OPS[op][2], 3, 5, 216, dtype, device)
    shifted = [torch.cat([t.new_zeros(3, 5, 1), t], dim=-1)[..., 1:] if t.dim() == 3 else t for t in inputs]
    assert all(t.data_ptr() % 16 for t in shifted if t.dim() == 3)
    check_row_op(op, shifted)


@pytest.mark.parametrize("op", ["gated_residual", "gated_residual_modulate_layer_norm"])
@pytest.mark.parametrize(
    "x_dtype, y_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)], ids=str
)
def test_x_and_y_of_different_dtypes(op, x_dtype, y_dtype, device):
    inputs = row_inputs(ROW_OPS[op][2], 2, 5, 216, x_dtype, device, vec_dtype=torch.bfloat16)
    inputs[1] = inputs[1].to(y_dtype)
    check_row_op(op, inputs)


@pytest.mark.parametrize(
    "make_x",
    [lambda: 1e20 * torch.randn(2, 3, 216), lambda: 1.5e38 + 2e37 * torch.randn(2, 3, 216).clamp(-4, 4)],
    ids=["1e20", "sum_overflows"],
)
def test_statistics_near_the_top_of_float32(make_x, device):
    # squares (and, second case, the row sum) overflow float32: the kernels rescale, as float64 would not need to
    x = make_x().to(device)
    shift, scale = (torch.randn(2, 216, device=device) for _ in range(2))
    check_row_op("modulate_layer_norm", [x, shift, scale])


def test_a_row_holding_inf_gives_nan_like_the_reference(device):
    x, shift, scale = row_inputs(("x", "shift", "scale"), 2, 3, 216, torch.float32, device)
    x[1, 2, 7] = float("inf")
    out = ops.modulate_layer_norm(x, shift, scale)
    ref = reference.modulate_layer_norm(x.double(), shift.double(), scale.double())
    assert torch.isnan(out[1, 2]).all() and torch.isnan(ref[1, 2]).all()
    finite = torch.ones(2, 3, dtype=torch.bool)
    finite[1, 2] = False
    assert_close("other rows", out[finite], out[finite], ref[finite])


LAYOUT_CASES = [  # (B, C, H, W, p)
    (2, 4, 4, 1040, 2),  # wider than one tile: several tiles along each grid row, the last one ragged
    (1, 64, 16, 32, 16),  # F = 16384 features: one token per tile, 64 KB of shared memory in float32
    (2, 3, 6, 10, 2),  # W and F not multiples of 16 bytes: element-by-element accesses
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
def test_layout_tiles(case, dtype, device):
    B, C, H, W, p = case
    image = torch.randn(B, C, H, W, dtype=dtype, device=device)
    check_exact(lambda x: ops.patchify(x, p), lambda x: reference.patchify(x, p), image)
    tokens = torch.randn(B, H * W // p**2, C * p * p, dtype=dtype, device=device)
    grid = (H // p, W // p)
    check_exact(lambda x: ops.unpatchify(x, p, C, grid), lambda x: reference.unpatchify(x, p, C, grid), tokens)


def test_layout_of_misaligned_views(device):
    image = torch.randn(2, 4, 8, 17, dtype=torch.bfloat16, device=device)[..., 1:]  # W = 16, base 2 bytes in
    check_exact(lambda x: ops.patchify(x, 2), lambda x: reference.patchify(x, 2), image)
    tokens = torch.randn(2, 16, 33, device=device)[..., 1:]  # F = 32, base 4 bytes in
    check_exact(lambda x: ops.unpatchify(x, 2, 8), lambda x: reference.unpatchify(x, 2, 8), tokens)


def gpu_only():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.gpu
def test_offsets_past_2_31_elements(kernel_backend):
    gpu_only()
    # Two rows (and two images) 2**31 + elements apart in one 4.3 GB buffer: 64-bit offsets or garbage.
    D = 1152
    stride = (2**31 // D + 1) * D
    buffer = torch.empty(stride + D, dtype=torch.bfloat16, device="cuda")
    x = buffer.as_strided((2, 1, D), (stride, D, 1))
    x.copy_(torch.randn(2, 1, D))
    shift, scale = (torch.randn(2, D, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    ref = ops.modulate_layer_norm(x.contiguous(), shift, scale)
    assert torch.equal(ops.modulate_layer_norm(x, shift, scale), ref)
    image = buffer.as_strided((2, 2, 24, 24), (stride, 576, 24, 1))  # 1152 elements each
    assert torch.equal(ops.patchify(image, 2), ops.patchify(image.contiguous(), 2))
    del buffer, x, image


def test_compiles_without_graph_breaks(device):
    # the cuda backend's custom ops under torch.compile(fullgraph=True), forward and backward
    # (on the CPU through AOTAutograd alone: inductor's CPU code would add nothing here)
    inputs = row_inputs(ROW_OPS["gated_residual_modulate_layer_norm"][2], 2, 8, 216, torch.bfloat16, device)
    grad_out = [torch.randn(2, 8, 216, dtype=torch.bfloat16, device=device) for _ in range(2)]
    fused = ops.gated_residual_modulate_layer_norm
    compiled = torch.compile(fused, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    eager_outs, eager_grads = run_op(fused, inputs, grad_out)
    outs, grads = run_op(compiled, inputs, grad_out)
    for a, b in zip([*outs, *grads], [*eager_outs, *eager_grads]):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_replays_in_a_cuda_graph(kernel_backend):
    gpu_only()
    inputs = row_inputs(ROW_OPS["gated_residual_modulate_layer_norm"][2], 4, 16, 1152, torch.bfloat16, "cuda")
    fused = ops.gated_residual_modulate_layer_norm
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused(*inputs)  # warm-up outside capture: the library loads, launch shapes are cached
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        captured = fused(*inputs)
    for t in inputs:
        t.copy_(torch.randn_like(t))
    graph.replay()
    for a, b in zip(captured, fused(*inputs)):
        assert torch.equal(a, b)
