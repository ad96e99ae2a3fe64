"""The paper's four block designs (DiT(block=...)): each one's forward and every gradient against a plain
PyTorch rendering written here from the paper's description (it shares no code with fastdit.models), on the
reference backend and on the Triton kernels (interpreted on CPU); initialisation; checkpoints; the CLI."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fastdit import DiT, ops
from fastdit.models import BLOCKS
from tests.helpers import assert_close
from tests.kernel_helpers import poisoned  # noqa: F401 (fixture)

TINY = dict(input_size=(8, 4), patch_size=2, in_channels=3, hidden_size=48, depth=2, num_heads=3, num_classes=5)


def ln(x, params=None, name=None):
    w, b = (params[f"{name}.weight"], params[f"{name}.bias"]) if name else (None, None)
    return F.layer_norm(x, x.shape[-1:], w, b, eps=1e-6)


def linear(x, params, name):
    return F.linear(x, params[f"{name}.weight"], params[f"{name}.bias"])


def attention(q, k, v, heads):
    """softmax(q k^T / sqrt(Dh)) v per head: q (B, Tq, D), k and v (B, Tk, D) -> (B, Tq, D)."""
    B, Tq, D = q.shape
    q, k, v = (a.reshape(B, a.shape[1], heads, D // heads).transpose(1, 2) for a in (q, k, v))  # (B, H, T, Dh)
    w = (q @ k.transpose(-1, -2) / math.sqrt(D // heads)).softmax(-1)
    return (w @ v).transpose(1, 2).reshape(B, Tq, D)


def self_attention(x, params, name, heads):
    q, k, v = linear(x, params, f"{name}.qkv").chunk(3, dim=-1)
    return linear(attention(q, k, v, heads), params, f"{name}.proj")


def mlp(x, params, name):
    return linear(F.gelu(linear(x, params, f"{name}.fc1"), approximate="tanh"), params, f"{name}.fc2")


def render(params, design, x, t, y, cfg):
    """The DiT of `design` written out from the paper: patch embedding, sin-cos positions, timestep and
    label embeddings, the blocks (Figure 3's four designs), the decoder, unpatchify."""
    p, H = cfg["patch_size"], cfg["num_heads"]
    tokens = F.conv2d(x, params["x_embedder.proj.weight"], params["x_embedder.proj.bias"], stride=p)
    h, w = tokens.shape[-2:]
    tokens = tokens.flatten(2).transpose(1, 2) + params["pos_embed"]  # (B, T, D)
    half = 128  # the 256-wide sinusoid, in float32 as the official model computes it
    args = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], -1).to(tokens.dtype)
    t_emb = linear(F.silu(linear(t_freq, params, "t_embedder.mlp.0")), params, "t_embedder.mlp.2")
    y_emb = params["y_embedder.embedding_table.weight"][y]
    c = t_emb + y_emb
    cond = torch.stack([t_emb, y_emb], dim=1)  # (B, 2, D): the length-two sequence / the two extra tokens
    T = tokens.shape[1]
    if design == "in-context":
        tokens = torch.cat([tokens, cond], dim=1)
    for i in range(cfg["depth"]):
        b = f"blocks.{i}"
        if design in ("adaLN-Zero", "adaLN"):
            mod = linear(F.silu(c), params, f"{b}.adaLN_modulation.1")[:, None]  # (B, 1, 6D or 4D)
            if design == "adaLN-Zero":
                s1, sc1, g1, s2, sc2, g2 = mod.chunk(6, dim=-1)
            else:
                (s1, sc1, s2, sc2), g1, g2 = mod.chunk(4, dim=-1), 1, 1
            tokens = tokens + g1 * self_attention(ln(tokens) * (1 + sc1) + s1, params, f"{b}.attn", H)
            tokens = tokens + g2 * mlp(ln(tokens) * (1 + sc2) + s2, params, f"{b}.mlp")
        else:
            tokens = tokens + self_attention(ln(tokens, params, f"{b}.norm1"), params, f"{b}.attn", H)
            if design == "cross-attention":
                q = linear(ln(tokens, params, f"{b}.norm_cross"), params, f"{b}.cross_attn.q")
                k, v = linear(cond, params, f"{b}.cross_attn.kv").chunk(2, dim=-1)
                tokens = tokens + linear(attention(q, k, v, H), params, f"{b}.cross_attn.proj")
            tokens = tokens + mlp(ln(tokens, params, f"{b}.norm2"), params, f"{b}.mlp")
    tokens = tokens[:, :T]  # in-context: the conditioning tokens leave before the decoder
    if design in ("adaLN-Zero", "adaLN"):
        shift, scale = linear(F.silu(c), params, "final_layer.adaLN_modulation.1")[:, None].chunk(2, dim=-1)
        tokens = ln(tokens) * (1 + scale) + shift
    else:
        tokens = ln(tokens, params, "final_layer.norm_final")
    out = linear(tokens, params, "final_layer.linear")  # (B, T, p*p*C)
    C = out.shape[-1] // (p * p)
    out = out.reshape(len(x), h, w, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(len(x), C, h * p, w * p)


def randomised(model):
    """Random weights everywhere (zero-initialised layers would hide half of each design)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    return model.eval()


def loss_and_grads(fn, params, x):
    """[loss, output, d-loss/d-param for each trained parameter] of out = fn(params)."""
    out = fn(params)
    loss = (out - torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).square().mean()
    return [loss.detach(), out.detach(), *torch.autograd.grad(loss, list(params.values()))]


@pytest.mark.parametrize("design", BLOCKS)
def test_design_matches_the_papers_description(design, poisoned):  # noqa: F811
    model = randomised(DiT(**TINY, block=design))
    x, t, y = torch.randn(3, 3, 8, 4), torch.randint(0, 1000, (3,)), torch.tensor([0, 4, 2])
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}  # pos_embed

    def rendered(dtype):  # the rendering's loss, output and gradients in dtype
        params = {n: p.detach().to(dtype).requires_grad_() for n, p in trained.items()}
        fixed_ = {n: p.to(dtype) for n, p in fixed.items()}
        return loss_and_grads(lambda ps: render({**ps, **fixed_}, design, x.to(dtype), t, y, TINY), params, x)

    ref, pt = rendered(torch.float64), rendered(torch.float32)  # the oracle; PyTorch's own fp32 error
    names = ["loss", "output"] + [f"d {n}" for n in trained]
    # the model on the reference backend, then on the fused kernels (adaLN-Zero's are tested in
    # test_model_triton), each against the float64 rendering within twice the fp32 rendering's error
    for backend in ("reference",) if design == "adaLN-Zero" else ("reference", "triton"):
        with ops.use_backend(backend):
            got = loss_and_grads(lambda ps: model(x, t, y), trained, x)
        for name, g, p, r in zip(names, got, pt, ref):
            assert_close(f"{design} {backend} {name}", g, p, r)


class SubclassedLayerNorm(torch.nn.LayerNorm):
    """A LayerNorm in all but type: the fused ops do not compute it, so it runs itself."""


@pytest.mark.parametrize(
    "design, name",
    [("adaLN-Zero", "norm2"), ("adaLN", "norm1"), ("cross-attention", "norm_cross"), ("in-context", "norm2")],
)
def test_a_changed_or_hooked_norm_runs_itself(design, name):
    """Every design's LayerNorms are computed inside the fused ops, which never call them: a norm that is not as
    built (here a subclass, with its eps changed) runs itself, unfused, and its hooks fire; output and every
    gradient as the fused ops give with that eps. A hook that doubles an affine norm's output is a norm with
    twice its weight and bias."""
    torch.manual_seed(0)
    x, t, y = torch.randn(3, 3, 8, 4), torch.tensor([1, 2, 999]), torch.tensor([0, 4, 2])
    model = DiT(**TINY, block=design, class_dropout_prob=0.0)
    with torch.no_grad():  # like a trained model: no zero weights, norms away from 1 and 0
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)

    def run(change):
        m = copy.deepcopy(model)
        change(getattr(m.blocks[1], name))
        out = m(x, t, y)
        out.square().mean().backward()
        return [out] + [p.grad for p in m.parameters() if p.requires_grad]

    def eps(norm):
        norm.eps = 0.5

    calls = []

    def subclassed(norm):
        norm.__class__ = SubclassedLayerNorm
        norm.eps = 0.5
        norm.register_forward_hook(lambda *_: calls.append(1))

    with ops.use_backend("reference"):
        fused, unfused = run(eps), run(subclassed)
        assert len(calls) == 1
        for a, b in zip(fused, unfused):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        if design in ("cross-attention", "in-context"):  # affine norms

            def doubled_params(norm):
                with torch.no_grad():
                    norm.weight.mul_(2), norm.bias.mul_(2)

            def doubled_output(norm):
                norm.register_forward_hook(lambda mod, args, out: 2 * out)

            want, got = run(doubled_params), run(doubled_output)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", [0, -1], ids=["first", "last"])
@pytest.mark.parametrize("design", BLOCKS)
def test_a_hooked_block_sees_its_input_and_output_in_every_design(design, block):
    """A hooked block is called as in an unfused model: its hooks see (x, c) and its output, the (B, T, D)
    hidden state (in-context: T + 2 tokens), and the model's output and gradients do not change; so with a
    hooked final layer, after a block that left its residual pending or after a hooked one."""
    x, t, y = torch.randn(3, 3, 8, 4), torch.tensor([1, 2, 999]), torch.tensor([0, 4, 2])
    model = DiT(**TINY, block=design, class_dropout_prob=0.0)
    with torch.no_grad():  # like a trained model: no zero weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)

    def run(m):
        with ops.use_backend("reference"):
            out = m(x, t, y)
            out.square().mean().backward()
        return [out] + [p.grad for p in m.parameters() if p.requires_grad]

    hooked, seen = copy.deepcopy(model), []
    hooked.blocks[block].register_forward_hook(lambda mod, args, out: seen.append((len(args), out.shape)))
    hooked.final_layer.register_forward_pre_hook(lambda mod, args: seen.append((len(args), args[0].shape)))
    for a, b in zip(run(model), run(hooked)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    tokens = 8 + 2 * (design == "in-context")
    assert seen == [(2, (3, tokens, 48)), (2, (3, 8, 48))]


def test_initialisation_per_design():
    """adaLN-Zero: every block the identity (zero modulation); adaLN: its modulation initialised like any linear
    layer; the standard designs: LayerNorm weight 1, bias 0. Every design starts with the output layer at zero."""
    for design in BLOCKS:
        model = DiT(**TINY, block=design)
        assert not model.final_layer.linear.weight.any() and not model.final_layer.linear.bias.any()
        first = model.blocks[0]
        if design in ("adaLN-Zero", "adaLN"):
            w = first.adaLN_modulation[-1].weight
            assert w.shape == ((6 if design == "adaLN-Zero" else 4) * 48, 48) and (w.any() == (design == "adaLN"))
            assert bool(model.final_layer.adaLN_modulation[-1].weight.any()) == (design == "adaLN")
        else:
            assert torch.equal(first.norm1.weight, torch.ones(48)) and not first.norm2.bias.any()
            assert (first.cross_attn is not None) == (design == "cross-attention")
    with pytest.raises(ValueError, match="block must be one of adaLN-Zero, adaLN, cross-attention, in-context"):
        DiT(**TINY, block="film")


def test_default_design_keeps_the_official_keys():
    assert DiT(**TINY).state_dict().keys() == DiT(**TINY, block="adaLN-Zero").state_dict().keys()
    torch.manual_seed(0)
    a = DiT(**TINY)
    torch.manual_seed(0)
    b = DiT(**TINY, block="adaLN-Zero")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())  # the same draws


@pytest.mark.parametrize("design", ["cross-attention", "in-context"])
def test_unconditional_designs_have_one_conditioning_vector(design):
    """num_classes=0: cross-attention attends over t alone, in-context appends one token."""
    model = randomised(DiT(**{**TINY, "num_classes": 0}, block=design))
    x, t = torch.randn(2, 3, 8, 4), torch.randint(0, 1000, (2,))
    assert model(x, t).shape == (2, 6, 8, 4)
