"""The DiT backbone against the facebookresearch/DiT contract: keys, shapes, init, forward, CFG, and
against the official model's own numbers (tests/model_golden.py) and the independent ReferenceDiT."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastdit
from fastdit import DiT, DiT_models, models, ops
from fastdit.models import get_2d_sincos_pos_embed
from fastdit.reference_model import ReferenceDiT, reference_DiT_models, timestep_embedding
from tests import model_golden
from tests.kernel_helpers import forbid_kernels

CONFIGS = {  # the official table: name -> (depth, hidden_size, patch_size, num_heads)
    "DiT-XL/2": (28, 1152, 2, 16), "DiT-XL/4": (28, 1152, 4, 16), "DiT-XL/8": (28, 1152, 8, 16),
    "DiT-L/2": (24, 1024, 2, 16), "DiT-L/4": (24, 1024, 4, 16), "DiT-L/8": (24, 1024, 8, 16),
    "DiT-B/2": (12, 768, 2, 12), "DiT-B/4": (12, 768, 4, 12), "DiT-B/8": (12, 768, 8, 12),
    "DiT-S/2": (12, 384, 2, 6), "DiT-S/4": (12, 384, 4, 6), "DiT-S/8": (12, 384, 8, 6),
}  # fmt: skip


def official_state_dict_shapes(depth, D, p, input_size=32, C=4, num_classes=1000, learn_sigma=True):
    """Key -> shape of an official DiT checkpoint, written out from the DiT contract."""
    out = 2 * C if learn_sigma else C
    shapes = {
        "pos_embed": (1, (input_size // p) ** 2, D),
        "x_embedder.proj.weight": (D, C, p, p),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (num_classes + 1, D),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        })  # fmt: skip
    shapes.update({
        "final_layer.linear.weight": (p * p * out, D), "final_layer.linear.bias": (p * p * out,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    })  # fmt: skip
    return shapes


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_keys_and_shapes_match_official(name):
    depth, D, p, heads = CONFIGS[name]
    with torch.device("meta"):
        model = DiT_models[name]()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_state_dict_shapes(depth, D, p)
    assert (len(model.blocks), model.num_heads, model.patch_size) == (depth, heads, p)


def test_twelve_configs_and_parameter_count():
    # The official twelve, and the CPU-sized DiT-Tiny that `fastdit train` picks for small data.
    assert sorted(DiT_models) == sorted([*CONFIGS, "DiT-Tiny/1", "DiT-Tiny/2", "DiT-Tiny/4"])
    with torch.device("meta"):
        xl = DiT_models["DiT-XL/2"]()
    assert sum(p.numel() for p in xl.parameters()) == 675_129_632  # the count DiT's train.py logs


def test_constructor_defaults_are_official():
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(DiT).parameters.items()}
    assert defaults == dict(
        input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
        mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True,
        block="adaLN-Zero",  # fastdit's one addition, last: the paper's block designs, DiT's by default
    )  # fmt: skip


def test_import_is_light():
    code = (
        "import os, sys, fastdit; bad = [m for m in ('triton', 'flash_attn', 'xformers', 'fastdit.ops._native') if m in sys.modules]; "
        "maps = '/proc/self/maps'; bad += ['libfastdit_kernels'] if os.path.exists(maps) and 'libfastdit_kernels' in open(maps).read() else []; "
        "print(bad)"
    )  # the native kernels' library too: loaded on the cuda backend's first use only
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def small(cls=DiT, **kw):
    args = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    args.update(kw)
    return cls(**args)


def randomize(model):
    """Like a trained model: the zero-initialised weights (adaLN-Zero, output layer, biases)
    drawn at a small scale, so that no check is vacuous."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def inputs(n=3, C=4, H=8, W=8, num_classes=10):
    return torch.randn(n, C, H, W), torch.randint(0, 1000, (n,)).float(), torch.randint(0, num_classes, (n,))


@pytest.mark.parametrize("name", sorted(model_golden.CONFIGS))
def test_matches_official_model(name):
    # Initial weights from a seed, forward, forward_with_cfg, a training forward (class dropout
    # draws) and every parameter gradient, against the official models.py's numbers.
    with ops.use_backend("reference"):
        model_golden.assert_matches_official(DiT, name, rel=1e-5)


@pytest.mark.parametrize("name", sorted(model_golden.CONFIGS))
def test_reference_model_matches_official_model(name):
    # The oracle the other model tests use is itself checked against the official numbers.
    model_golden.assert_matches_official(ReferenceDiT, name, rel=1e-5)


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-S/4", "DiT-B/8"])
def test_forward_matches_official_semantics_fp32(name):
    ref = randomize(reference_DiT_models[name](input_size=16, num_classes=10, math_attention=True)).eval()
    model = DiT_models[name](input_size=16, num_classes=10).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    x, t, y = inputs(3, H=16, W=16)
    with ops.use_backend("reference"), torch.no_grad():
        out, expected = model(x, t, y), ref(x, t, y)
    assert out.shape == (3, 8, 16, 16)
    rel = (out - expected).abs().max() / expected.abs().max()
    assert rel < 1e-5, f"max relative error {rel:.3g}"


def test_official_block_forward_matches_reference_block():
    ref = randomize(small(ReferenceDiT, math_attention=True))
    model = small()
    model.load_state_dict(ref.state_dict())
    x, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    with ops.use_backend("reference"):
        torch.testing.assert_close(model.blocks[0](x, c), ref.blocks[0](x, c), rtol=1e-5, atol=1e-6)


def assert_step_matches(model, ref, backend="reference", rtol=(1e-5, 1e-4), atol=(1e-6, 1e-6), n=3):
    """One training step's output and every parameter gradient (loss: the output's mean square, on inputs(n))
    of model, on `backend`, against ref's (None where ref's is); rtol and atol: (output, gradients). Returns
    model's output."""
    x, t, y = inputs(n)
    x = x.to(next(ref.parameters()))
    t, y = t.to(x.device), y.to(x.device)
    with ops.use_backend(backend):
        out = model(x, t, y)
        out.square().mean().backward()
    want = ref(x, t, y)
    want.square().mean().backward()
    torch.testing.assert_close(out, want, rtol=rtol[0], atol=atol[0])
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=rtol[1], atol=atol[1], msg=name)
    return out


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_changed_modules_run_themselves_never_ignored(backend):
    """The fused forward computes the LayerNorms itself and the patch embedding as one GEMM, without calling
    those modules: a norm's changed eps is read, and a norm of another kind or setting, a hooked norm and a
    changed or hooked patch convolution run themselves. Output and every gradient (the changed modules' own
    parameters among them) against the official model, ReferenceDiT, changed the same way."""
    ref = small(ReferenceDiT, math_attention=True, class_dropout_prob=0.0)
    model = small(class_dropout_prob=0.0)
    for m in (model, ref):
        m.blocks[1].norm2.eps = 0.5
        m.blocks[1].norm1 = torch.nn.RMSNorm(64, eps=1e-5)  # another kind, with a weight
        m.blocks[0].norm2 = torch.nn.LayerNorm(64)  # learned affine where the design has none
        m.final_layer.norm_final.register_forward_hook(lambda mod, args, out: 2 * out)
        m.x_embedder.proj = torch.nn.Conv2d(4, 64, kernel_size=3, stride=2, padding=1)
    with torch.no_grad():  # the new norms' weights and biases away from 1 and 0
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.load_state_dict(randomize(ref).state_dict())
    seen = []
    model.x_embedder.proj.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    assert_step_matches(model, ref, backend)
    assert seen == [(3, 64, 4, 4)]


@pytest.mark.parametrize(
    "backend, train, checkpointing", [("reference", True, False), ("triton", True, "full"), ("triton", False, False)]
)
def test_an_empty_batch_runs_as_in_the_official_model(backend, train, checkpointing, device, monkeypatch):
    """model(x[mask], t[mask], y[mask]) with an empty mask: the official model returns an empty output, and the
    backward gives every trained parameter a gradient of zeros; forward_with_cfg (which fails in the official
    code: torch.split of nothing makes one part) returns an empty output too. No kernel runs."""
    ref = randomize(small(ReferenceDiT, math_attention=True)).to(device).train(train)
    model = small().to(device).train(train).set_gradient_checkpointing(checkpointing)
    model.load_state_dict(ref.state_dict())
    forbid_kernels(monkeypatch)
    out = assert_step_matches(model, ref, backend, n=0)
    assert out.shape == (0, 8, 8, 8) and out.dtype == torch.float32
    x, t, y = (v.to(device) for v in inputs(0))
    with torch.no_grad(), ops.use_backend(backend):  # sampling (on CUDA: fc1 and GELU in one GEMM)
        assert model(x, t, y).shape == model.forward_with_cfg(x, t, y, 4.0).shape == (0, 8, 8, 8)


@pytest.mark.parametrize("block, num_classes", [("cross-attention", 10), ("in-context", 0)])
def test_an_empty_batch_in_the_other_designs(block, num_classes, monkeypatch):
    """The official rule for an empty batch (an empty output, zero gradients) in the paper's other designs,
    conditional or not, with learn_sigma off, on the Triton backend under selective checkpointing."""
    model = randomize(small(block=block, num_classes=num_classes, learn_sigma=False))
    model.set_gradient_checkpointing("selective")
    x, t, y = inputs(0)
    forbid_kernels(monkeypatch)
    with ops.use_backend("triton"):
        out = model(x, t, y if num_classes else None)
        out.square().mean().backward()
    assert out.shape == (0, 4, 8, 8)
    for name, p in model.named_parameters():
        assert not p.requires_grad or torch.equal(p.grad, torch.zeros_like(p)), name


def test_training_mode_gradients_match_reference_model():
    ref = randomize(small(ReferenceDiT, math_attention=True, class_dropout_prob=0.0))
    model = small(class_dropout_prob=0.0)
    model.load_state_dict(ref.state_dict())
    x, t, y = inputs()
    with ops.use_backend("reference"):
        model(x, t, y).square().mean().backward()
    ref(x, t, y).square().mean().backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", [False, "full", "selective"])
def test_hooks_on_blocks_and_the_final_layer_see_and_change_what_they_do_in_the_official_model(mode):
    """Each block leaves its closing residual to the next LayerNorm, returning (x, pending): a hooked block or
    final layer gets the official input and returns the official output instead, so hooks that read features
    (REPA-style alignment, probes) or replace them see and do what they do on ReferenceDiT. Output, captures
    and every gradient against it, with and without gradient checkpointing."""
    ref = randomize(small(ReferenceDiT, math_attention=True, class_dropout_prob=0.0, depth=3))
    model = small(class_dropout_prob=0.0, depth=3)
    model.load_state_dict(ref.state_dict())
    model.set_gradient_checkpointing(mode)
    seen = {}
    for name, m in (("ours", model), ("ref", ref)):
        m.blocks[1].register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__((name, "in"), args))
        m.blocks[1].register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__((name, "out"), out))
        m.blocks[0].register_forward_hook(lambda mod, args, out: 0.5 * out)  # a hook that replaces the output
        m.final_layer.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__((name, "final"), args))
    assert_step_matches(model, ref)
    ours_in, ref_in = seen["ours", "in"], seen["ref", "in"]
    assert len(ours_in) == len(ref_in) == 2  # (x, c), as the official block is called
    for got, expected in (
        (ours_in, ref_in),
        (seen["ours", "out"], seen["ref", "out"]),
        (seen["ours", "final"][:2], seen["ref", "final"]),
    ):
        for a, b in zip(*(v if isinstance(v, tuple) else (v,) for v in (got, expected))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class ScaledBlock(models.DiTBlock):
    """A research change to the block: its forward overridden, with the official signature."""

    def forward(self, x, c):
        return 0.5 * super().forward(x, c)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_blocks_and_final_layers_of_another_kind_run_as_the_official_model_calls_them(backend):
    """A block or final layer swapped for another kind of module (here the official ones, from ReferenceDiT, and
    a DiTBlock subclass that overrides forward) is called as module(x, c) with its input's residual applied,
    the others keep their fused chain: output and every gradient against ReferenceDiT changed the same way."""
    ref = randomize(small(ReferenceDiT, math_attention=True, class_dropout_prob=0.0, depth=4))
    model = small(class_dropout_prob=0.0, depth=4)
    model.load_state_dict(ref.state_dict())
    model.blocks[1], model.final_layer = copy.deepcopy(ref.blocks[1]), copy.deepcopy(ref.final_layer)
    model.blocks[2].__class__ = ScaledBlock
    ref_forward = ref.blocks[2].forward
    ref.blocks[2].forward = lambda x, c: 0.5 * ref_forward(x, c)
    assert_step_matches(model, ref, backend)


class LoggedTensor(torch.Tensor):
    """A weight of another tensor type, as quantized ones are (torchao's): logs the functions that read it."""

    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func.__name__ in ("__get__", "detach", "requires_grad_"):  # attributes; what nn.Parameter() calls
            return super().__torch_function__(func, types, args, kwargs)
        cls.seen.append(func)
        with torch._C.DisableTorchFunctionSubclass():  # plain tensors out
            return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", [True, False], ids=["training", "sampling"])
def test_weights_of_another_tensor_type_are_left_to_their_modules(grad):
    """Fused paths read, concatenate and cast the weights of the MLP, the adaLN modulation, the patch convolution:
    a weight that is not a plain nn.Parameter (a quantized one: torchao's quantize_ made the one-GEMM modulation
    fail in torch.cat) leaves the work to its module, whose F.linear or conv2d it then meets, and to nothing else."""
    torch.manual_seed(0)
    model = randomize(small(class_dropout_prob=0.0)).train(grad)
    x, t, y = inputs()
    want = model(x, t, y)
    layers = [model.x_embedder.proj] + [
        layer for b in model.blocks for layer in (b.mlp.fc1, b.mlp.fc2, b.adaLN_modulation[1])
    ]
    for layer in layers:
        layer.weight = torch.nn.Parameter(layer.weight.detach().as_subclass(LoggedTensor))
    LoggedTensor.seen.clear()
    with torch.set_grad_enabled(grad):
        got = model(x, t, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert set(LoggedTensor.seen) == {torch.nn.functional.linear, torch.nn.functional.conv2d}, set(LoggedTensor.seen)


def test_fsdp_hooks_do_not_count_as_hooks():
    """fully_shard hooks every block it shards; those hooks take any output, so the fused chain stays on."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    model = small()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fully_shard(model.blocks[0])
        assert model.blocks[0]._forward_pre_hooks and not models._hooked(model.blocks[0])
        model.blocks[0].register_forward_hook(lambda *_: None)
        assert models._hooked(model.blocks[0])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_float64_model_matches_the_official_one_in_float64(device):
    """model.double() (a gradient check, a float64 sampling run) works as the official model's does: output and
    every gradient equal ReferenceDiT's in float64 to float64 rounding, on the default backend (the kernels
    compute in float32, so `auto` runs float64 on the reference, and attention on a float64 backend)."""
    ref = randomize(small(ReferenceDiT, math_attention=True, class_dropout_prob=0.0)).double().to(device)
    model = small(class_dropout_prob=0.0).double().to(device)
    model.load_state_dict(ref.state_dict())
    out = assert_step_matches(model, ref, "auto", rtol=(1e-12, 1e-10), atol=(1e-13, 1e-13))
    assert out.dtype == torch.float64


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomize(small(class_dropout_prob=0.0))
    x, t, y = inputs()
    model(x, t, y).square().mean().backward()
    plain = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    model.set_gradient_checkpointing(True)
    model(x, t, y).square().mean().backward()
    for g, p in zip(plain, (p for p in model.parameters() if p.requires_grad)):
        torch.testing.assert_close(p.grad, g)


def test_adaln_zero_init_blocks_are_identity_and_output_is_zero():
    model = small()
    x, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    for block in model.blocks:
        torch.testing.assert_close(block(x, c), x, rtol=0, atol=0)
    out = model(*inputs(2))
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize(
    "in_channels, learn_sigma, guided",
    [(4, True, dict(paper=3, all=4)), (1, True, dict(paper=1, all=1)), (2, True, dict(paper=2, all=2)),
     (3, False, dict(paper=3, all=3))],
)  # fmt: skip
def test_forward_with_cfg_guides_eps_channels_only(in_channels, learn_sigma, guided):
    model = randomize(small(in_channels=in_channels, learn_sigma=learn_sigma)).eval()
    x, t, _ = inputs(2, C=in_channels)
    x = torch.cat([x[:1], x[:1]])
    y = torch.tensor([3, 10])  # conditional, then the null class
    t = torch.cat([t[:1], t[:1]])
    raw = model(x, t, y)
    cond, uncond = raw[:1], raw[1:]
    for mode, n in guided.items():
        out = model.forward_with_cfg(x, t, y, 4.0, cfg_channels=mode)
        expected = uncond[:, :n] + 4.0 * (cond[:, :n] - uncond[:, :n])
        torch.testing.assert_close(out[0, :n], expected[0])
        torch.testing.assert_close(out[1, :n], expected[0])
        torch.testing.assert_close(out[:, n:], raw[:, n:])
    assert torch.equal(model.forward_with_cfg(x, t, y, 4.0), model.forward_with_cfg(x, t, y, 4.0, "paper"))
    with pytest.raises(ValueError, match="cfg_channels"):
        model.forward_with_cfg(x, t, y, 4.0, cfg_channels="some")


def test_non_square_input():
    model = randomize(small(input_size=(8, 16))).eval()
    assert model.pos_embed.shape == (1, 4 * 8, 64)
    x = torch.randn(2, 4, 8, 16)
    out = model(x, torch.tensor([1.0, 500.0]), torch.tensor([1, 2]))
    assert out.shape == (2, 8, 8, 16)
    # A square model runs other grids with the matching fixed sin-cos embedding.
    square = small(input_size=8).eval()
    square.load_state_dict({k: v for k, v in model.state_dict().items() if k != "pos_embed"}, strict=False)
    torch.testing.assert_close(square(x, torch.tensor([1.0, 500.0]), torch.tensor([1, 2])), out)


def test_sincos_pos_embed_layout():
    emb = get_2d_sincos_pos_embed(8, (2, 3))  # 2 rows, 3 columns
    assert emb.shape == (6, 8)
    # Token 4 is row 1, column 1; the first half encodes the column, the second the row.
    col, row = 1.0, 1.0
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2)
    expect = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)])
    torch.testing.assert_close(torch.from_numpy(emb[4]), expect)
    torch.testing.assert_close(torch.from_numpy(emb[2, 4:]), torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64))


def test_grid_and_input_sizes_take_numpy_integers():
    # The official code takes them (np.arange for the grid, timm's to_2tuple for input_size): a grid
    # side computed with numpy, e.g. np.sqrt(T).astype(int), must not be refused.
    np.testing.assert_array_equal(get_2d_sincos_pos_embed(8, np.int64(3)), get_2d_sincos_pos_embed(8, 3))
    np.testing.assert_array_equal(get_2d_sincos_pos_embed(8, (np.int32(2), 3)), get_2d_sincos_pos_embed(8, (2, 3)))
    sizes = small(input_size=np.int64(8)).x_embedder.img_size
    assert sizes == (8, 8) and all(type(s) is int for s in sizes)


def test_official_module_level_names_exist():
    """What `from models import ...` finds in the official models.py, fastdit.models has too."""
    official = ["DiT", "DiTBlock", "FinalLayer", "LabelEmbedder", "TimestepEmbedder", "modulate", "DiT_models"]
    official += ["get_2d_sincos_pos_embed", "get_2d_sincos_pos_embed_from_grid", "get_1d_sincos_pos_embed_from_grid"]
    official += [f"DiT_{size}_{p}" for size in ("XL", "L", "B", "S") for p in (2, 4, 8)]
    assert [name for name in official if not hasattr(models, name)] == []
    x, shift, scale = torch.randn(3, 5, 8), torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(models.modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None])
    grid = np.stack(np.meshgrid(np.arange(3.0), np.arange(2.0)))  # (2, h, w): columns, then rows
    np.testing.assert_array_equal(models.get_2d_sincos_pos_embed_from_grid(8, grid), get_2d_sincos_pos_embed(8, (2, 3)))


def test_label_dropout_uses_null_class():
    model = small(class_dropout_prob=1.0)
    emb = model.y_embedder(torch.tensor([1, 2]), train=True)
    torch.testing.assert_close(emb, model.y_embedder.embedding_table.weight[[10, 10]])
    forced = model.y_embedder(torch.tensor([1, 2]), train=False, force_drop_ids=torch.tensor([0, 1]))
    torch.testing.assert_close(forced, model.y_embedder.embedding_table.weight[[1, 10]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden_size=65, num_heads=4), "hidden_size 65 must be divisible by num_heads 4"),
        (dict(hidden_size=66, num_heads=2), "hidden_size must be a multiple of 4"),
        (dict(input_size=9), "divisible by patch_size"),
        (dict(input_size="big"), "input_size"),
        (dict(input_size=0), "input_size"),
        (dict(input_size=(8, -8)), "input_size"),
        (dict(patch_size=0), "patch_size"),
        (dict(patch_size=True), "patch_size"),
        (dict(in_channels=0), "in_channels"),
        (dict(in_channels=2.5), "in_channels"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(depth=0), "depth"),
        (dict(num_heads=-1), "num_heads"),
        (dict(num_classes=-1), "num_classes"),  # 0 is an unconditional model
        (dict(num_classes=2.0), "num_classes"),
        (dict(mlp_ratio=0), "mlp_ratio"),
        (dict(mlp_ratio=float("inf")), "mlp_ratio"),
        (dict(class_dropout_prob=-0.1), "class_dropout_prob"),
        (dict(class_dropout_prob=1.5), "class_dropout_prob"),
        (dict(class_dropout_prob=float("nan")), "class_dropout_prob"),
        (dict(learn_sigma="yes"), "learn_sigma"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small(**kwargs)


X2 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
T2, Y2 = torch.tensor([1, 500]), torch.tensor([3, 7])


@pytest.mark.parametrize(
    "x, t, y, error, match",
    [
        (torch.randn(2, 3, 8, 8), T2, Y2, ValueError, r"x must be \(N, 4, H, W\)"),
        (torch.randn(2, 4, 9, 8), T2, Y2, ValueError, "divisible by patch_size"),
        (X2.numpy(), T2, Y2, TypeError, "x must be a torch.Tensor"),
        (X2.double(), T2, Y2, TypeError, "x is torch.float64 but the model's weights are torch.float32"),
        (X2.long(), T2, Y2, TypeError, "x is torch.int64"),
        (X2[:0], T2, Y2, ValueError, r"t must be \(0,\), one value per sample of x, got shape \(2,\)"),
        (X2[:0], T2[:0], Y2[:0, None], ValueError, r"y must be \(0,\)"),
        (X2, T2[:1], Y2, ValueError, r"t must be \(2,\)"),
        (X2, T2[:, None], Y2, ValueError, r"t must be \(2,\)"),
        (X2, T2, Y2[:1], ValueError, r"y must be \(2,\)"),  # would broadcast over the batch
        (X2, T2 > 0, Y2, TypeError, "t must hold timesteps"),
        (X2, T2, Y2.float(), TypeError, "y must hold class labels"),
        (X2, T2, Y2.to(torch.uint8), TypeError, "y must hold class labels"),
        (X2, T2, torch.tensor([3, 11]), ValueError, "y holds label 11; labels must be 0..9 or the null class 10"),
        (X2, T2, torch.tensor([-1, 3]), ValueError, "y holds label -1"),
        (X2, T2.to("meta"), Y2, ValueError, "t is on meta but x is on cpu"),
        (X2, T2, Y2.to("meta"), ValueError, "y is on meta but x is on cpu"),
        (X2.to("meta"), T2, Y2, ValueError, "x is on meta but the model's weights are on cpu"),
    ],
)  # fmt: skip
def test_bad_forward_inputs(x, t, y, error, match):
    with pytest.raises(error, match=match):
        small()(x, t, y)


def test_null_class_only_with_class_dropout():
    y = torch.tensor([3, 10])
    assert small()(X2, T2, y).shape == (2, 8, 8, 8)
    with pytest.raises(ValueError, match="labels must be 0..9 \\(no null class: class_dropout_prob is 0\\)"):
        small(class_dropout_prob=0.0)(X2, T2, y)


def test_forward_accepts_what_the_official_model_does():
    model = randomize(small()).eval()
    ref = model(X2, T2, Y2)
    assert torch.equal(model(X2, T2.float() + 0.5, Y2.int()), model(X2, T2 + 0.5, Y2))  # fractional t, int32 labels
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast x's dtype need not match the weights
        for x in (X2, X2.bfloat16()):
            out = model(x, T2, Y2)
            assert ((out.float() - ref).abs().max() / ref.abs().max()) < 0.05


@pytest.mark.parametrize(
    "x, scale, error, match",
    [
        (torch.randn(3, 4, 8, 8), 4.0, ValueError, "even batch"),
        (torch.randn(2, 4, 8, 8), float("nan"), ValueError, "cfg_scale must be finite"),
        (torch.randn(2, 4, 8, 8), "4", TypeError, "cfg_scale must be a number"),
    ],
)
def test_bad_forward_with_cfg_inputs(x, scale, error, match):
    with pytest.raises(error, match=match):
        small().forward_with_cfg(x, torch.zeros(len(x)), torch.zeros(len(x), dtype=torch.long), scale)


def test_label_check_stays_out_of_compiled_graphs():
    # Reading label values is a device-to-host read: under torch.compile the check is skipped, so
    # fullgraph tracing works, and a bad label fails in the embedding lookup as in plain PyTorch.
    model = small().eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(X2, T2, Y2), model(X2, T2, Y2))
    with pytest.raises(Exception) as info:
        compiled(X2, T2, torch.tensor([3, 11]))
    assert "y holds label" not in str(info.value)


def test_readme_one_liner():
    m = fastdit.DiT_models["DiT-S/2"](input_size=8, num_classes=10)
    assert m(*inputs(2)).shape == (2, 8, 8, 8)


def test_timestep_frequencies_stay_float32_and_out_of_the_state_dict():
    model = small().to(torch.bfloat16)
    assert model.t_embedder.freqs.dtype == torch.float32
    assert not any("freqs" in k for k in model.state_dict())
    expected = timestep_embedding(torch.tensor([3.0, 999.0]), 256)
    got = model.t_embedder.timestep_embedding(torch.tensor([3.0, 999.0]), 256, freqs=model.t_embedder.freqs)
    assert torch.equal(got, expected)
    x, t, y = inputs(2)
    assert model(x.bfloat16(), t, y).dtype == torch.bfloat16  # a cast model runs end to end
