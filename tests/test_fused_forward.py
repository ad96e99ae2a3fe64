"""The model's fused forward against the official per-layer one: one adaLN GEMM, activation
checkpointing (whole blocks or selective), and the GEMM epilogues of the no-grad (sampling) path."""

import gc

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from fastdit import models, ops
from fastdit.models import DiT

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}  # the linear layers (CPU attention uses bmm)


def small(depth=3, input_size=8, **kw):
    """An odd-sized model (D=72 = 4 heads of 18) with every zero-initialised weight drawn, so no check is vacuous."""
    torch.manual_seed(0)
    model = DiT(
        input_size=input_size,
        patch_size=2,
        hidden_size=72,
        depth=depth,
        num_heads=4,
        num_classes=10,
        class_dropout_prob=0.0,
        **kw,
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0, 0.05)
    return model


def batch(n=3):
    return torch.randn(n, 4, 8, 8), torch.randint(0, 1000, (n,)), torch.randint(0, 10, (n,))


class OpLog(TorchDispatchMode):
    """Records every aten/custom op run inside it (name, first input's shape)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))

    def count(self, pred):
        return sum(1 for op in self.ops if pred(op))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run(model, x, t, y, mode=False):
    model.zero_grad(set_to_none=True)
    model.set_gradient_checkpointing(mode)
    out = model(x, t, y)
    out.square().mean().backward()
    return out.detach(), grads(model)


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def test_one_adaln_gemm_per_forward_same_outputs_and_gradients_as_per_layer():
    """Every block's and the final layer's modulation come from one GEMM; outputs and gradients equal
    those of the per-layer modulation (the official model's; adaln_one_gemm False, as under DDP)."""
    model, (x, t, y) = small(), batch()
    depth = len(model.blocks)
    with OpLog() as log, torch.no_grad():
        model(x, t, y)
    # patch embedding, 2 timestep-MLP layers, 4 per block (qkv, proj, fc1, fc2), final linear, adaLN: 1 in all
    assert log.count(lambda op: op in GEMMS) == 4 + 4 * depth + 1
    fused_out, fused_grads = run(model, x, t, y)
    model.adaln_one_gemm = False
    with OpLog() as log, torch.no_grad():
        model(x, t, y)
    assert log.count(lambda op: op in GEMMS) == 4 + 5 * depth + 1
    out, ref_grads = run(model, x, t, y)
    torch.testing.assert_close(fused_out, out, rtol=1e-5, atol=1e-6)
    assert any("adaLN" in k for k in fused_grads)
    assert_same(fused_grads, ref_grads)


@pytest.mark.parametrize("change", ["activation", "hook"])
def test_a_changed_or_hooked_adaln_modulation_runs_itself(change):
    """The one adaLN GEMM reads the layers' weights and skips their modules: a block whose adaLN_modulation was
    changed (another activation) or hooked makes every layer compute its own, calling the modules."""
    model, (x, t, y) = small(depth=2), batch()
    seen = []
    if change == "activation":
        model.blocks[1].adaLN_modulation[0] = torch.nn.GELU()
    else:
        model.blocks[1].adaLN_modulation.register_forward_hook(lambda m, args, out: seen.append(out) or out * 0.5)
    with torch.no_grad():
        out = model(x, t, y)
        model.adaln_one_gemm = False
        per_layer = model(x, t, y)
    torch.testing.assert_close(out, per_layer, rtol=0, atol=0)
    assert len(seen) == (2 if change == "hook" else 0)


def test_one_adaln_gemm_under_bf16_autocast_matches_per_layer():
    model, (_, t, _) = small(depth=2), batch(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model._modulations(model.t_embedder(t.float()))
        c = model.t_embedder(t.float())
        per_layer = [b.adaLN_modulation(c) for b in model.blocks] + [model.final_layer.adaLN_modulation(c)]
    for a, b in zip(fused, per_layer):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointing_gives_the_same_outputs_and_gradients(mode):
    model, (x, t, y) = small(), batch()
    out, plain = run(model, x, t, y)
    ck_out, ck = run(model, x, t, y, mode)
    torch.testing.assert_close(ck_out, out, rtol=0, atol=0)
    assert_same(ck, plain)


@pytest.mark.parametrize("backward_in_autocast", [False, True])
def test_checkpointing_under_bf16_autocast_gives_the_same_gradients(backward_in_autocast):
    """Training's mix (bf16 GEMMs, fp32 residual stream); also with the backward inside the autocast
    region, where autocast's cast cache changes which casts the recomputation runs."""
    model, (x, t, y) = small(depth=2), batch(2)
    results = {}
    for mode in (False, "selective", "full"):
        model.zero_grad(set_to_none=True)
        model.set_gradient_checkpointing(mode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, t, y).float().square().mean()
            if backward_in_autocast:
                loss.backward()
        if not backward_in_autocast:
            loss.backward()
        results[mode] = grads(model)
    assert_same(results["selective"], results[False], rtol=0, atol=0)
    assert_same(results["full"], results[False], rtol=0, atol=0)


def test_selective_checkpointing_recomputes_no_gemm_but_the_norms():
    """In the backward, selective checkpointing re-runs LayerNorm+modulate (and the other cheap ops) but
    no GEMM and no attention; whole-block checkpointing re-runs the blocks' GEMMs too. (CPU: LayerNorm is the reference op's aten layer_norm.)"""
    model, (x, t, y) = small(), batch()
    depth = len(model.blocks)
    counts = {}
    for mode in (False, "selective", "full"):
        model.set_gradient_checkpointing(mode)
        loss = model(x, t, y).square().mean()
        with OpLog() as log:
            loss.backward()
        counts[mode] = (
            log.count(lambda op: op in GEMMS),
            log.count(lambda op: op is torch.ops.aten.native_layer_norm.default),
        )
    gemms, norms = counts[False]
    assert counts["selective"][0] == gemms  # nothing GEMM-like recomputed
    assert counts["selective"][1] == norms + 2 * depth  # both LayerNorms of every block recomputed
    # qkv, proj and fc1 of every block recomputed (recomputation stops early: nothing in a block's
    # backward needs fc2's output)
    assert counts["full"][0] == gemms + 3 * depth
    assert counts["full"][1] == norms + 2 * depth


def retained_bytes(fn):
    """Bytes of the tensors fn() creates that are still alive after it returns (what autograd keeps for
    the backward, plus fn's output): every output storage tracked by weak reference; the live ones
    counted once each (a freed storage's address may be reused, so liveness is checked at the end)."""
    storages = []

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor):
                    s = o.untyped_storage()
                    storages.append((StorageWeakRef(s), s.nbytes()))
            return out

    with Track():
        result = fn()
    gc.collect()
    live = {ref.cdata: n for ref, n in storages if not ref.expired()}
    return result, sum(live.values())


def test_checkpointing_modes_keep_the_expected_activation_bytes():
    """Activation memory kept for the backward under bf16 autocast with the Triton ops (the GPU's path,
    interpreted), per sample and block, to the byte. Per token, in bytes per channel: none 28 (one fp32
    residual 4, the block's other one recomputed (models._norm_after); bf16 GEMM inputs 2+2 and outputs
    qkv 6, proj 2, fc1 8, fc2 2, attention 2; GELU's output recomputed (models._GeluLinear)), selective 24
    (the block's fp32 input 4 and the GEMM and attention outputs 6+2+2+8+2), full 6 (the block's inputs);
    plus fp32 per-row values (LayerNorm mean and rstd, recomputed by selective and full; attention's
    log-sum-exp per head, recomputed by full) and, per sample, the block's bf16 adaLN modulation (6D). Measured by storage on the CPU as the second difference over batch 1-2 and depth
    1-2: weights, their casts and the embeddings cancel out. (The official model, ReferenceDiT run the
    same way at DiT-XL's width, keeps 48 bytes per channel per token.)"""
    D, H, T = 72, 4, 16
    per_token = {False: 28 * D + 2 * 8 + 4 * H, "selective": 24 * D + 4 * H, "full": 6 * D}
    for mode, bytes_per_token in per_token.items():
        kept = {}
        for n in (1, 2):
            for depth in (1, 2):
                torch.manual_seed(0)
                model = DiT(input_size=8, patch_size=2, hidden_size=D, depth=depth, num_heads=H, num_classes=10)
                model.set_gradient_checkpointing(mode)
                x, t, y = torch.randn(n, 4, 8, 8), torch.randint(0, 1000, (n,)), torch.randint(0, 10, (n,))
                with ops.use_backend("triton"), ops.use_attention_backend("sdpa"):  # one attention op, like flash
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        loss, kept[n, depth] = retained_bytes(
                            lambda m=model, a=(x, t, y): m(*a).float().square().mean()
                        )
                    loss.backward()
        per_sample_block = kept[2, 2] - kept[1, 2] - kept[2, 1] + kept[1, 1]
        assert per_sample_block == T * bytes_per_token + 2 * 6 * D, (mode, per_sample_block / (T * D))


def saved_hidden(fn, tokens):
    """fn()'s output and how many hidden activations ((tokens, 4D) elements) autograd saved for the backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = fn()
    return out, saved.count(tokens * HIDDEN)


HIDDEN = 4 * 144


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_gpu])])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backward_in_autocast", [False, True], ids=["", "backward-in-autocast"])
def test_training_mlp_keeps_one_hidden_tensor_and_matches_the_unfused_mlp_bit_for_bit(
    autocast, backward_in_autocast, device
):
    """With autograd on, _mlp keeps fc1's output and recomputes GELU's in the backward (models._GeluLinear):
    one (B, T, 4D) tensor kept where the unfused Mlp keeps two, and the output and every gradient equal the
    unfused Mlp's bit for bit (the same ops in the same dtypes); odd B, T = 1, a strided input."""
    torch.manual_seed(0)
    mlp = models.Mlp(144, HIDDEN).to(device)
    for B, T, strided in ((3, 5, False), (1, 1, False), (2, 7, True)):
        x = torch.randn(B, T, 288, device=device)[..., :144] if strided else torch.randn(B, T, 144, device=device)
        g = torch.randn(B, T, 144, device=device)
        results = []
        for forward in (lambda m, v: m(v), models._mlp):
            mlp.zero_grad(set_to_none=True)
            v = x.detach().requires_grad_()
            with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                out, kept = saved_hidden(lambda f=forward, v=v: f(mlp, v), B * T)
                if backward_in_autocast:
                    out.backward(g.to(out.dtype))
            if not backward_in_autocast:
                out.backward(g.to(out.dtype))
            results.append((kept, out, v.grad, *(p.grad for p in mlp.parameters())))
        (unfused_kept, *unfused), (kept, *fused) = results
        assert (unfused_kept, kept) == (2, 1)
        assert fused[0].dtype == (autocast or torch.float32)
        for name, a, b in zip(("out", "x.grad", *(n for n, _ in mlp.named_parameters())), unfused, fused):
            assert torch.equal(a, b), (name, B, T, strided)


class ScaledMlp(models.Mlp):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_gpu])])
@pytest.mark.parametrize("grad", [True, False], ids=["training", "sampling"])
@pytest.mark.parametrize("change", ["silu", "erf-gelu", "subclass", "hook", "no-bias"])
def test_a_changed_mlp_runs_as_it_is(change, grad, device):
    """The MLP's shortcuts (GELU recomputed in training, fc1+GELU as one GEMM in sampling on CUDA) assume the
    Mlp as built: another activation, a subclass, a forward hook or a bias-free layer runs the module itself."""
    torch.manual_seed(0)
    mlp = (ScaledMlp if change == "subclass" else models.Mlp)(72, 288).to(device)
    calls = []
    if change == "silu":
        mlp.act = torch.nn.SiLU()
    elif change == "erf-gelu":
        mlp.act = torch.nn.GELU()
    elif change == "hook":
        mlp.fc2.register_forward_hook(lambda module, args, out: calls.append(out.shape) or out + 1)
    elif change == "no-bias":
        mlp.fc1 = torch.nn.Linear(72, 288, bias=False, device=device)
    x = torch.randn(3, 5, 72, device=device)
    with torch.set_grad_enabled(grad):
        expected, calls_expected = mlp(x), len(calls)
        torch.testing.assert_close(models._mlp(mlp, x), expected, rtol=0, atol=0)
    assert len(calls) == 2 * calls_expected


def test_full_checkpointing_reruns_no_mlp_gemm_twice():
    """Full checkpointing recomputes whole blocks; their MLPs then run unfused (Mlp.recompute_gelu off), since
    recomputing _GeluLinear's forward would rerun fc2's GEMM too; the other modes recompute GELU."""
    model = small(depth=1)
    assert [m.recompute_gelu for m in model.modules() if isinstance(m, models.Mlp)] == [True]
    model.set_gradient_checkpointing("full")
    assert [m.recompute_gelu for m in model.modules() if isinstance(m, models.Mlp)] == [False]
    model.set_gradient_checkpointing("selective")
    assert [m.recompute_gelu for m in model.modules() if isinstance(m, models.Mlp)] == [True]


def test_set_gradient_checkpointing_names_the_modes():
    model = small(depth=1)
    assert model.set_gradient_checkpointing(True).gradient_checkpointing == "full"
    assert model.set_gradient_checkpointing("selective").gradient_checkpointing == "selective"
    assert model.set_gradient_checkpointing("none").gradient_checkpointing is False
    with pytest.raises(ValueError, match="'selective'"):
        model.set_gradient_checkpointing("some")


# ---------------------------------------------------------------------------------------------
# GEMM epilogues (CUDA): judged by DESIGN.md's rule against the unfused ops in float64


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 37 * 256])
def test_linear_gelu_epilogue_is_tanh_gelu(rows, dtype):
    from helpers import assert_close

    D = 1152
    x, w, b = (
        torch.randn(rows, D, device="cuda"),
        torch.randn(4 * D, D, device="cuda") / D**0.5,
        torch.randn(4 * D, device="cuda"),
    )
    out = models._linear_gelu_tanh(x.to(dtype), w.to(dtype), b.to(dtype))
    pt = F.gelu(F.linear(x.to(dtype), w.to(dtype), b.to(dtype)), approximate="tanh")
    ref = F.gelu(F.linear(x.to(dtype).double(), w.to(dtype).double(), b.to(dtype).double()), approximate="tanh")
    assert_close("linear+gelu epilogue", out, pt, ref, rel_fp32=1e-4)  # tf32-free fp32 GEMMs still reorder sums


@pytest.mark.gpu
@needs_gpu
def test_sampling_forward_with_epilogues_matches_the_training_forward():
    """no_grad on CUDA takes the epilogue path; with autograd on, the unfused ops: the same model output
    within bf16's rounding (the epilogue rounds once where the unfused ops round twice)."""
    model, (x, t, y) = small().cuda().eval(), batch(4)
    x, t, y = x.cuda(), t.cuda(), y.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.no_grad():
            fused = model(x, t, y).float()
        unfused = model(x, t, y).float().detach()
    with ops.use_backend("reference"), ops.use_attention_backend("math"):  # float64: the reference ops
        ref = model.double()(x.double(), t, y)
    err, base = (fused - ref).abs().max(), (unfused - ref).abs().max()
    assert err <= 2 * base + 1e-3, f"epilogue path error {err:.3g} vs unfused {base:.3g}"
