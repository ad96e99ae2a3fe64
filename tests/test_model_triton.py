"""The whole DiT on fastdit's Triton kernels (interpreted on CPU) against the official model's numbers
and the independent ReferenceDiT in float64: loss, output and every parameter gradient; under bf16
autocast; traced whole by torch.compile(fullgraph=True); captured in a CUDA graph."""

import pytest
import torch

from fastdit import DiT, DiT_models, ops
from fastdit.reference_model import ReferenceDiT, reference_DiT_models
from tests import model_golden
from tests.helpers import assert_close
from tests.kernel_helpers import poisoned  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("poisoned")

SMALL = dict(input_size=8, num_classes=10)  # T = 16 tokens
SHALLOW = dict(SMALL, patch_size=2, hidden_size=384, num_heads=6, depth=2)  # DiT-S/2's width, 2 blocks


def randomised(model):
    """Random weights everywhere: at adaLN-Zero's init most gradients would be exactly zero."""
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(std=0.05)
    return model.eval()


def float64_twin(model, make_reference):
    """The official unfused computation (a ReferenceDiT from make_reference) in float64 with `model`'s weights."""
    ref = make_reference(math_attention=True).double()
    ref.load_state_dict(model.state_dict())  # its timestep frequencies stay float32, as the official's
    return ref.eval()


def batch(device, B=2):
    x = torch.randn(B, 4, 8, 8, device=device)
    return x, torch.randint(0, 1000, (B,), device=device), torch.randint(0, 10, (B,), device=device)


def loss_and_grads(model, inputs, backend, autocast=False):
    """[loss, output, d-loss/d-parameter for every trained parameter] in float32 (float64 for a float64 model)."""
    x, t, y = inputs
    dtype = next(model.parameters()).dtype
    with ops.use_backend(backend), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(x.to(dtype), t, y).to(dtype)
        loss = (out - torch.linspace(-1, 1, out.numel(), dtype=dtype, device=x.device).view_as(out)).square().mean()
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return [loss.detach(), out.detach(), *grads]


def names(model):
    return ["loss", "output"] + [f"d {n}" for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the golden's class-dropout draws come from the CPU generator; on a GPU the float64-twin tests judge the kernels",
)
@pytest.mark.parametrize("name", sorted(model_golden.CONFIGS))
def test_matches_official_model(name):
    # Initial weights, forward, forward_with_cfg, a training forward and every gradient on the Triton
    # kernels: within DESIGN.md's 1e-4 of the official model's float32 numbers.
    with ops.use_backend("triton"):
        model_golden.assert_matches_official(DiT, name, rel=1e-4)


def test_dit_s2_forward_backward_matches_reference(device):
    model = randomised(DiT_models["DiT-S/2"](**SMALL).to(device))
    inputs = batch(device)
    got = loss_and_grads(model, inputs, "triton")
    pt = loss_and_grads(model, inputs, "reference")
    ref = loss_and_grads(
        float64_twin(model, lambda **kw: reference_DiT_models["DiT-S/2"](**SMALL, **kw)), inputs, "reference"
    )
    for name, g, p, r in zip(names(model), got, pt, ref):
        assert_close(name, g, p, r)


def test_bf16_autocast_matches_reference(device):
    # The autocast mix the row kernels see in training: an fp32 residual stream, bf16 GEMM outputs
    # and adaLN vectors. Judged like DESIGN.md's rule, on norms (the results are fp32 tensors
    # carrying bf16 error): within twice PyTorch's own autocast error against float64.
    model = randomised(DiT(**SHALLOW).to(device))
    inputs = batch(device)
    got = loss_and_grads(model, inputs, "triton", autocast=True)
    pt = loss_and_grads(model, inputs, "reference", autocast=True)
    ref = loss_and_grads(float64_twin(model, lambda **kw: ReferenceDiT(**SHALLOW, **kw)), inputs, "reference")
    for name, g, p, r in zip(names(model), got, pt, ref):
        err, pt_err = ((t.double() - r).norm() / r.norm() for t in (g, p))
        assert err <= 2 * pt_err + 1e-6, f"{name}: relative error {err:.3g} vs PyTorch autocast's {pt_err:.3g}"


# Inductor's cold CPU compile of even a 1-2 block DiT takes 30-60 s on the 2-core CI box: on CPU,
# aot_eager checks the same tracing (fake kernels, autograd registration, no graph breaks).
COMPILE_BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compile_fullgraph(backend, device):
    model = randomised(DiT(**SHALLOW).to(device))
    inputs = batch(device)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    got = loss_and_grads(compiled, inputs, "triton")
    eager = loss_and_grads(model, inputs, "triton")
    for name, g, e in zip(names(model), got, eager):
        err = float((g - e).abs().max() / e.abs().max())
        assert err <= 1e-5, f"{name}: compiled differs from eager by {err:.3g} of its largest value"


@pytest.mark.parametrize("checkpointing", ["full", "selective"])
def test_compile_fullgraph_with_checkpointing(checkpointing, device):
    # Checkpointed blocks are traced by torch.compile as higher-order ops: nothing inside may
    # mutate Python state (attention records which backend ran only in eager mode).
    model = randomised(DiT(**SHALLOW).to(device)).set_gradient_checkpointing(checkpointing)
    inputs = batch(device)
    got = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"), inputs, "triton")
    eager = loss_and_grads(model, inputs, "triton")
    for name, g, e in zip(names(model), got, eager):
        err = float((g - e).abs().max() / e.abs().max())
        assert err <= 1e-5, f"{name}: compiled differs from eager by {err:.3g} of its largest value"


@pytest.mark.gpu
def test_forward_captures_in_a_cuda_graph():
    # The input checks read no values while a graph is captured (a device-to-host read would fail).
    model = randomised(DiT(**SHALLOW).cuda())
    x, t, y = batch("cuda")
    with torch.no_grad():
        eager = model(x, t, y)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside the capture (attention's auto choice measures here)
            model(x, t, y)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x, t, y)
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager)
