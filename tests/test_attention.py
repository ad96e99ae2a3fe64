"""fastdit.ops.attention: the Triton kernels (forward, both backwards) and every installed backend
against fastdit.reference.attention, backend selection, determinism, the model, torch.compile."""

import dataclasses
import gc
import re

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from fastdit import ops, reference
from fastdit.models import DiT
from fastdit.ops import _attention as attention_module
from fastdit.ops import _attention_policy
from tests.helpers import DTYPES, assert_close, reference_pair
from tests.kernel_helpers import (
    check_empty_batch,
    poisoned,  # noqa: F401 (fixture)
    round_bfloat16_like_the_gpu,
)

pytestmark = pytest.mark.usefixtures("poisoned")  # the Triton kernels' buffers start as NaN


@pytest.fixture(autouse=True)
def _bfloat16_like_the_gpu(monkeypatch):
    round_bfloat16_like_the_gpu(monkeypatch)


def qkv_views(B, T, H, Dh, dtype, device):
    """q, k, v as the model passes them: strided views of one (B, T, 3, H, Dh) GEMM output."""
    return torch.randn(B, T, 3, H, Dh, dtype=dtype, device=device).unbind(2)


def check_against_reference(q, k, v, backend, grad_out=None):
    """Output and gradients of ops.attention(backend) vs the reference in q's dtype and float64."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # keep q, k, v's strides
    out = ops.attention(*leaves, backend=backend)
    assert out.is_contiguous() and ops.last_attention_backend() == backend
    pt, ref, grad_out = reference_pair(reference.attention, [q, k, v], grad_out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert_close(f"{backend} out", out.detach(), pt["out"][0].detach(), ref["out"][0].detach())
    for name, g, g_pt, g_ref in zip("qkv", grads, pt["grad"], ref["grad"]):
        if k.shape[1] == 1 and name != "v":
            # One key: the softmax is constant, dq and dk vanish; only rounding noise may remain.
            assert g.abs().max() <= 1e-5 * ref["grad"][2].abs().max(), f"d{name} at T=1: {g.abs().max()}"
        else:
            assert_close(f"{backend} d{name}", g, g_pt, g_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("Dh", [32, 64, 72])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_triton_matches_reference(T, Dh, dtype, device):
    check_against_reference(*qkv_views(3, T, 2, Dh, dtype, device), "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("T, Dh", [(7, 64), (33, 72), (33, 32)])
def test_triton_deterministic_backward_matches_reference(T, Dh, dtype, device):
    with ops.use_deterministic(True):
        check_against_reference(*qkv_views(3, T, 2, Dh, dtype, device), "triton")


@pytest.mark.parametrize("Dh", [8, 96, 128])
def test_triton_other_head_dims(Dh, device):
    check_against_reference(*qkv_views(2, 7, 2, Dh, torch.float16, device), "triton")


def test_triton_bfloat16(device):
    check_against_reference(*qkv_views(2, 33, 2, 72, torch.bfloat16, device), "triton")


def test_triton_cross_attention_and_plain_layouts(device):
    """Tq != Tk, contiguous (B, T, H, Dh) inputs and a transposed-memory q (unit Dh stride kept)."""
    q = torch.randn(2, 2, 5, 72, device=device).transpose(1, 2)  # (B, Tq, H, Dh), head-major memory
    k, v = torch.randn(2, 2, 19, 2, 72, device=device).unbind(1)
    check_against_reference(q, k, v, "triton")


def check_packed_against_reference(qkv, deterministic):
    """attention_packed on the triton backend: output and the one packed gradient vs the reference."""
    leaf = qkv.clone().requires_grad_()
    with ops.use_deterministic(deterministic):
        out = ops.attention_packed(leaf, backend="triton")
    pt, ref, grad_out = reference_pair(lambda t: reference.attention(*t.unbind(2)), [qkv])
    (grad,) = torch.autograd.grad(out, leaf, grad_out)
    assert_close("packed out", out.detach(), pt["out"][0].detach(), ref["out"][0].detach())
    assert_close("packed dqkv", grad, pt["grad"][0], ref["grad"][0])


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_triton_packed_qkv_matches_reference(deterministic, device):
    """attention_packed: the qkv GEMM output whole, one packed (B, T, 3, H, Dh) gradient."""
    qkv = torch.randn(2, 33, 3, 2, 72, dtype=torch.float16, device=device)
    check_packed_against_reference(qkv, deterministic)
    with pytest.raises(ValueError, match=r"qkv must be \(B, T, 3, H, Dh\)"):
        ops.attention_packed(qkv[:, :, :2])


# Logits that put a row's base-2 log-sum-exp below -log2 of the largest value P is held in: the
# backward computes P in float32 and rounds it (and dS) to the input dtype, so lse2 < -128 in float32
# and bfloat16 (logits below about -89), lse2 < -16 in float16 (about -11); with margin:
EXTREME_LOGIT = {torch.float32: -110.0, torch.float16: -30.0, torch.bfloat16: -110.0}


def extreme_rows_qkv(T, Dh, dtype, device):
    """qkv (1, T, 3, 1, Dh): keys share the direction (1, ..., 1) (k = 1.5 + noise) and every other
    query points against it, so all that query's logits sit near EXTREME_LOGIT[dtype] (spread about
    1); the other queries are ordinary."""
    qkv = torch.randn(1, T, 3, 1, Dh, device=device)
    q, k, _ = qkv.unbind(2)  # (1, T, 1, Dh) views
    k.mul_(0.1).add_(1.5)
    q[:, ::2] = 0.1 * q[:, ::2] + EXTREME_LOGIT[dtype] / (1.5 * Dh**0.5)  # q.k / sqrt(Dh) = EXTREME_LOGIT
    return qkv.to(dtype)


@pytest.mark.parametrize("packed", [False, True], ids=["qkv", "packed"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_backward_is_finite_for_extreme_logit_rows(dtype, deterministic, packed, device):
    """T = 17 is not a multiple of any key block: the last block's past-the-end keys load as 0, and
    their P must be 0, not 2^-lse2 (inf for these rows: inf * 0 = NaN in dQ)."""
    qkv = extreme_rows_qkv(17, 72, dtype, device)
    if packed:
        check_packed_against_reference(qkv, deterministic)
    else:
        with ops.use_deterministic(deterministic):
            check_against_reference(*qkv.unbind(2), "triton")


def test_triton_expanded_upstream_gradient(device):
    """o.sum() sends a stride-0 gradient into the backward."""
    q, k, v = (t.detach().requires_grad_() for t in qkv_views(2, 9, 2, 72, torch.float32, device))
    ops.attention(q, k, v, backend="triton").sum().backward()
    pt, ref, _ = reference_pair(lambda *a: reference.attention(*a).sum(), [q, k, v], [torch.tensor(1.0, device=device)])
    for name, leaf, g_pt, g_ref in zip("qkv", (q, k, v), pt["grad"], ref["grad"]):
        assert_close(f"d{name}", leaf.grad, g_pt, g_ref)


def test_deterministic_backward_is_bitwise_reproducible(device):
    q, k, v = (t.detach().requires_grad_() for t in qkv_views(2, 33, 2, 72, torch.float16, device))
    do = torch.randn(2, 33, 2, 72, dtype=torch.float16, device=device)
    runs = []
    for _ in range(2):
        with ops.use_deterministic(True):
            out = ops.attention(q, k, v, backend="triton")
        runs.append(torch.autograd.grad(out, (q, k, v), do))
    for name, a, b in zip("qkv", *runs):
        assert torch.equal(a, b), f"d{name} differs between two deterministic backwards"


def test_use_deterministic_setter_context_and_torch_flag():
    assert not _attention_policy.deterministic()
    with ops.use_deterministic(True):
        assert _attention_policy.deterministic()
        with ops.use_deterministic(False):
            assert not _attention_policy.deterministic()
        assert _attention_policy.deterministic()
    assert not _attention_policy.deterministic()
    try:
        ops.use_deterministic(True)
        assert _attention_policy.deterministic()
    finally:
        ops.use_deterministic(False)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert _attention_policy.deterministic()
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
# every backend but triton (tested above) and math (fastdit.reference.attention itself: nothing to compare)
@pytest.mark.parametrize("backend", [b for b in ops.ATTENTION_BACKENDS if b not in ("auto", "triton", "math")])
def test_other_backends_match_reference(backend, dtype, device):
    q, k, v = qkv_views(2, 33, 2, 72, dtype, device)
    why = attention_module.unavailable(backend, q)
    if why is not None:
        pytest.skip(f"{backend} {why}")
    check_against_reference(q, k, v, backend)


@pytest.mark.parametrize("backend", ops.ATTENTION_BACKENDS)
def test_empty_batch_runs_math_on_every_backend(backend, device, monkeypatch):
    """B = 0: the reference's empty output and gradients, from `math` whatever was asked (no kernel launched over
    no programs, nothing for auto to measure); a backend asked for by name that cannot take such inputs says so."""
    q, k, v = qkv_views(0, 5, 2, 72, torch.float16, device)
    why = None if backend == "auto" else attention_module.unavailable(backend, q)
    if why is not None:
        with pytest.raises(ops.BackendUnavailable, match=re.escape(why)):
            ops.attention(q, k, v, backend=backend)
        return
    monkeypatch.setattr(attention_module, "time_backend", None)  # auto must not measure
    k, v = k[:, :2], v[:, :2]  # cross-attention's two keys
    check_empty_batch(lambda *qkv: ops.attention(*qkv, backend=backend), reference.attention, [q, k, v], monkeypatch)
    assert ops.last_attention_backend() == "math" == ops.attention_backend(q, k, v, backend)
    packed = torch.randn(0, 5, 3, 2, 72, dtype=torch.float16, device=device)
    check_empty_batch(
        lambda qkv: ops.attention_packed(qkv, backend), lambda qkv: reference.attention(*qkv.unbind(2)), [packed],
        monkeypatch,
    )  # fmt: skip


def test_missing_backends_raise_a_clear_error_and_auto_skips_them(monkeypatch):
    monkeypatch.delenv("FASTDIT_ATTENTION", raising=False)
    monkeypatch.delenv("FASTDIT_BACKEND", raising=False)
    q = torch.randn(1, 4, 2, 8)
    missing = [b for b in ("flash_attn", "xformers") if not attention_module.INSTALLED.intersection(
        attention_module.BACKENDS[b].packages)]  # fmt: skip
    for name in missing:
        with pytest.raises(
            RuntimeError, match=f"attention backend '{name}' needs the .* package, which is not installed"
        ):
            ops.attention(q, q, q, backend=name)
    with pytest.raises(RuntimeError, match="'sdpa_cudnn' runs on CUDA tensors only"):
        ops.attention(q, q, q, backend="sdpa_cudnn")
    with pytest.raises(ValueError, match="backend must be one of auto, triton"):
        ops.attention(q, q, q, backend="cudnn")
    assert ops.attention_backend(q) == "math"  # auto on CPU: the oracle


def test_auto_measures_once_skips_failures_and_never_measures_while_tracing(monkeypatch):
    monkeypatch.setattr(attention_module, "AUTO_CACHE", {})
    times = {"triton": 2.0, "flash_attn": 1.0, "sdpa_cudnn": 0.5}
    calls = []

    def measure(name):
        calls.append(name)
        if name == "sdpa_cudnn":
            raise RuntimeError("no cuDNN kernel for this shape")
        return times[name]

    usable = ["triton", "flash_attn", "sdpa_cudnn", "sdpa", "math"]
    key = (256, 256, 72, torch.bfloat16, "cuda:0", True, False)
    # While compiling or capturing: the static preference, nothing measured or cached.
    assert attention_module.pick_auto(key, usable, measure, can_measure=False) == "triton"
    assert calls == [] and attention_module.AUTO_CACHE == {}
    assert attention_module.pick_auto(key, usable, measure, can_measure=True) == "flash_attn"
    assert sorted(calls) == ["flash_attn", "sdpa_cudnn", "triton"]
    assert attention_module.pick_auto(key, usable, measure, can_measure=True) == "flash_attn"
    assert attention_module.pick_auto(key, usable, measure, can_measure=False) == "flash_attn"  # cached
    assert len(calls) == 3
    # Nothing measurable: the static preference; missing packages are never picked.
    assert attention_module.pick_auto(("other",), ["sdpa", "math"], measure, can_measure=True) == "sdpa"


@pytest.mark.parametrize("training", [True, False])
def test_measuring_a_backend_leaves_the_random_stream_as_it_was(training, monkeypatch):
    """The measurement's random output gradient is drawn on a forked stream: a training run's noise after
    its first step does not depend on whether auto measured there (a resumed run measures at another step)."""
    monkeypatch.setattr(attention_module, "_cuda_median_ms", lambda fn: (fn(), 1.0)[-1])
    q, k, v = torch.randn(3, 2, 5, 2, 8).unbind(0)
    state = torch.get_rng_state()
    assert attention_module.time_backend("sdpa", q, k, v, training=training, deterministic=False) == 1.0
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("checkpointing", ["full", "selective"])
def test_auto_measures_inside_activation_checkpointing(checkpointing, monkeypatch):
    """On a GPU auto times the backends in the first training forward, which may be a checkpointed block's;
    the backward's recomputation then takes the cached choice without measuring. Here _auto runs its CUDA
    path on CPU tensors (CPU timers for CUDA events): the measurement must stay out of the checkpoint, which
    would otherwise fail the recomputation (full) or keep the measurement's outputs until the backward
    (selective: up to GBs in a first step on a GPU)."""
    monkeypatch.setattr(attention_module, "AUTO_CACHE", {})
    monkeypatch.setattr(attention_module, "AUTO_CANDIDATES", ("sdpa_flash", "sdpa_math"))  # fast on the CPU
    timed, measured = [], []
    monkeypatch.setattr(attention_module, "_cuda_median_ms", lambda fn: (fn(), fn(), timed.append(1), 1.0)[-1])
    for name in attention_module.AUTO_CANDIDATES:  # the storage of every output the measurement makes
        run = attention_module.BACKENDS[name].run

        def recorded(q, k, v, deterministic, run=run):
            o = run(q, k, v, deterministic)
            if q.is_leaf:  # the measurement's detached q, not the model's
                measured.append(StorageWeakRef(o.untyped_storage()))
            return o

        monkeypatch.setitem(
            attention_module.BACKENDS, name, dataclasses.replace(attention_module.BACKENDS[name], run=recorded)
        )

    def auto_as_on_cuda(q, k, v):  # _auto past its CPU shortcut: measure once per key, then the cached choice
        def measure(name):
            return attention_module.time_backend(name, q, k, v, training=True, deterministic=False)

        key = (q.shape[1], k.shape[1], q.shape[3], q.dtype, q.device, True, False)
        return attention_module.pick_auto(key, ["sdpa_flash", "sdpa_math", "sdpa"], measure, can_measure=True)

    monkeypatch.setattr(attention_module, "_auto", auto_as_on_cuda)
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, hidden_size=72, depth=2, num_heads=4, num_classes=10)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 7])
    grads = {}
    for mode in (checkpointing, "none"):
        model.zero_grad()
        model.set_gradient_checkpointing(mode)
        loss = model(x, t, y).square().mean()
        gc.collect()
        assert measured and all(s.expired() for s in measured), "the checkpoint keeps the measurement's outputs"
        loss.backward()
        grads[mode] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(timed) == 2 and ops.last_attention_backend() == "sdpa_flash"  # each candidate once, then cached
    for g, g_ref in zip(grads[checkpointing], grads["none"]):
        torch.testing.assert_close(g, g_ref)


def test_backend_selection_precedence(monkeypatch):
    q = torch.randn(1, 3, 2, 8)
    monkeypatch.delenv("FASTDIT_ATTENTION", raising=False)
    monkeypatch.setenv("FASTDIT_BACKEND", "reference")
    assert ops.attention_backend(q) == "math"
    monkeypatch.setenv("FASTDIT_BACKEND", "triton")
    assert ops.attention_backend(q) == "triton"
    monkeypatch.setenv("FASTDIT_ATTENTION", "sdpa")
    assert ops.attention_backend(q) == "sdpa"  # the attention setting beats the global one
    with ops.use_backend("reference"), ops.use_attention_backend("sdpa_math"):
        assert ops.attention_backend(q) == "sdpa_math"
        with ops.use_attention_backend("math"):
            ops.attention(q, q, q)
            assert ops.last_attention_backend() == "math"
        ops.attention(q, q, q, backend="sdpa")  # the argument beats everything
        assert ops.last_attention_backend() == "sdpa"
    monkeypatch.setenv("FASTDIT_ATTENTION", "fast")
    with pytest.raises(ValueError, match="FASTDIT_ATTENTION must be one of"):
        ops.attention(q, q, q)
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_attention_backend("flash"):
            pass


def test_triton_rejects_head_dims_past_256():
    q = torch.randn(1, 2, 1, 264)
    with pytest.raises(RuntimeError, match="head dims up to 256"):
        ops.attention(q, q, q, backend="triton")


def test_dit_with_triton_attention_matches_math(device):
    """A small DiT-S/2-like model (head dim 72: the XL tail case) with only attention on Triton."""
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, hidden_size=144, depth=2, num_heads=2, num_classes=10).to(device)
    with torch.no_grad():
        for p in model.parameters():  # leave adaLN-Zero's zeros: every block must contribute
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 4, 8, 8, device=device)
    t = torch.tensor([3.0, 700.0], device=device)
    y = torch.tensor([1, 7], device=device)
    results = {}
    for attn in ("math", "triton"):
        model.zero_grad()
        with ops.use_backend("reference"), ops.use_attention_backend(attn):
            out = model(x, t, y)
            assert ops.last_attention_backend() == attn
            out.square().mean().backward()
        results[attn] = (out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad])
    (out, grads), (ref, ref_grads) = results["triton"], results["math"]
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, f"model output: max relative error {rel:.3g}"
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    for name, g, g_ref in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6 * g_ref.abs().max().item(), msg=name)


def test_torch_compile_fullgraph_traces_triton_attention(device):
    q, k, v = (t.detach().requires_grad_() for t in qkv_views(2, 9, 2, 72, torch.float32, device))

    def f(q, k, v):
        with_context = ops.attention(q, k, v)  # selection through the context manager is traced too
        packed = ops.attention_packed(torch.stack([q, k, v], dim=2), backend="triton")
        return ops.attention(q, k, v, backend="triton") + with_context + packed

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with ops.use_attention_backend("triton"):
        out = compiled(q, k, v)
        expected = f(q, k, v)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    expected_grads = torch.autograd.grad(expected, (q, k, v), torch.ones_like(out))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
