"""On a CUDA GPU, compiled (never interpreted): what the CPU suite's interpreter cannot show.

Every fused kernel against fastdit.reference at DiT's shapes in three dtypes, forward and backward,
and the fused op's keep_x path against its plain one, bit for bit;
attention with tensor-core bf16/fp16 dots at head dims 72 and 64, both dQ variants, the atomic one
repeated to expose races; DiT-XL/2 in bf16 autocast, forward and every gradient, against the
reference model; torch.compile(fullgraph=True) with inductor (tests/test_model_triton.py); CUDA-graph
capture and replay of sampling; two training steps, then --resume, bit-exact; sample-ddp stopped and
continued from the CUDA random state it saved, bit-exact.

Marked `gpu`: skipped without CUDA; the device check runs them (python -m benchmarks --device-check).
Sized to run in seconds each on an H100/H200, compiles included.
"""

from functools import partial

import numpy as np
import pytest
import torch

from fastdit import DiT, DiT_models, _parts, ops, reference, sample, train
from fastdit.cli import main as cli
from fastdit.ops import _triton_utils
from fastdit.reference_model import reference_DiT_models
from tests.helpers import DTYPES, assert_close, reference_pair
from tests.kernel_helpers import KERNEL_FIXTURES, check_exact, check_op, kernel_backend, poisoned, row_inputs, run_op  # noqa: F401 (fixtures)
from tests.test_attention import check_against_reference, qkv_views
from tests.test_gated_residual_modulate_layer_norm import KEEP_X_DTYPES, keep_x_inputs
from tests.test_model_triton import float64_twin, loss_and_grads, names

pytestmark = pytest.mark.gpu

ROW_OPS = {  # op: (function, reference, its tensor inputs in order)
    "modulate_layer_norm": (ops.modulate_layer_norm, reference.modulate_layer_norm, ("x", "shift", "scale")),
    "gated_residual": (ops.gated_residual, reference.gated_residual, ("x", "y", "gate")),
    "gated_residual_modulate_layer_norm": (ops.gated_residual_modulate_layer_norm, reference.gated_residual_modulate_layer_norm,
                                           ("x", "y", "gate", "shift", "scale")),
}  # fmt: skip
# (B, T, D): odd batches; DiT-XL/2 at 256² (T 256, D 1152), DiT-S/2 at 512² (T 1024, D 384), an odd
# T with an odd multiple of 72 (its rows lose 16-byte alignment to 16-divisibility)
DIT_ROW_SHAPES = [(3, 256, 1152), (1, 1024, 384), (5, 77, 360)]
# (B, C, H, W, p): 256² and 512² latents with patch 2, and patches 4 and 8
DIT_LAYOUT_SHAPES = [(3, 4, 32, 32, 2), (1, 4, 64, 64, 2), (2, 4, 32, 32, 4), (1, 4, 32, 32, 8)]
ATOMIC_REPEATS = 5


@pytest.fixture(autouse=True)
def compiled_kernels():
    assert not _triton_utils.INTERPRET, "the GPU tests run the compiled kernels: unset TRITON_INTERPRET"


def zero_init_randomised(model, std=0.02):
    """adaLN-Zero starts gates and the output layer at zero (their gradients vanish): draw them."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(std=std)
    return model


# --------------------------------------------------------------------------------------------
# Fused kernels


@KERNEL_FIXTURES  # Triton, and the native CUDA kernels where built
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DIT_ROW_SHAPES, ids=str)
@pytest.mark.parametrize("op", ROW_OPS)
def test_row_kernels_at_dit_shapes(op, shape, dtype):
    fn, ref, input_names = ROW_OPS[op]
    inputs = row_inputs(input_names, *shape, dtype, "cuda")  # (B, D) inputs: adaLN .chunk views
    check_op(fn, ref, inputs, names=input_names)


@KERNEL_FIXTURES
@pytest.mark.parametrize("dtypes", KEEP_X_DTYPES[2:4], ids=["bfloat16", "autocast"])
@pytest.mark.parametrize("shape", DIT_ROW_SHAPES, ids=str)
def test_keep_x_recomputes_r_bit_for_bit(shape, dtypes):
    # compiled, each backend's forward and backward must round r = x + gate * y alike (one FMA)
    inputs = keep_x_inputs(*shape, dtypes, "cuda")
    grad_out = [torch.randn(shape, dtype=dtypes[0], device="cuda") for _ in range(2)]
    kept = run_op(partial(ops.gated_residual_modulate_layer_norm, keep_x=True), inputs, grad_out)
    plain = run_op(ops.gated_residual_modulate_layer_norm, inputs, grad_out)
    for a, b in zip([*kept[0], *kept[1]], [*plain[0], *plain[1]]):
        assert torch.equal(a, b)


@KERNEL_FIXTURES
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DIT_LAYOUT_SHAPES, ids=str)
def test_layout_kernels_at_dit_shapes(shape, dtype):
    B, C, H, W, p = shape
    check_exact(
        lambda x: ops.patchify(x, p),
        lambda x: reference.patchify(x, p),
        torch.randn(B, C, H, W, dtype=dtype, device="cuda"),
    )
    tokens = torch.randn(
        B, (H // p) * (W // p), p * p * 2 * C, dtype=dtype, device="cuda"
    )  # learned sigma: 2C channels out
    check_exact(lambda t: ops.unpatchify(t, p, 2 * C), lambda t: reference.unpatchify(t, p, 2 * C), tokens)


# --------------------------------------------------------------------------------------------
# Attention: tensor-core dots


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic_dq"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("Dh", [72, 64])
@pytest.mark.parametrize("T", [256, 1024, 77])
def test_attention_tensor_cores(T, Dh, dtype, deterministic):
    with ops.use_deterministic(deterministic):
        check_against_reference(*qkv_views(3, T, 4, Dh, dtype, "cuda"), "triton")


def test_attention_float32(poisoned):
    check_against_reference(*qkv_views(2, 200, 3, 72, torch.float32, "cuda"), "triton")


@pytest.mark.parametrize("Dh", [72, 64])
def test_atomic_dq_is_right_every_time(Dh):
    """The atomic dQ adds every key block's share into one buffer: lost or doubled updates would show
    as a wrong dQ in some run. Many key blocks per query block (T = 1024) and many programs at once."""
    q, k, v = qkv_views(4, 1024, 16, Dh, torch.bfloat16, "cuda")
    pt, ref, grad_out = reference_pair(reference.attention, [q, k, v])
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    for run in range(ATOMIC_REPEATS):
        with ops.use_deterministic(False):
            out = ops.attention(*leaves, backend="triton")
        grads = torch.autograd.grad(out, leaves, grad_out)
        for name, g, g_pt, g_ref in zip("qkv", grads, pt["grad"], ref["grad"]):
            assert_close(f"run {run}: d{name}", g, g_pt, g_ref)


def test_deterministic_dq_is_bitwise_reproducible():
    q, k, v = (t.detach().requires_grad_() for t in qkv_views(4, 1024, 16, 72, torch.bfloat16, "cuda"))
    do = torch.randn(4, 1024, 16, 72, dtype=torch.bfloat16, device="cuda")
    runs = []
    for _ in range(2):
        with ops.use_deterministic(True):
            runs.append(torch.autograd.grad(ops.attention(q, k, v, backend="triton"), (q, k, v), do))
    for name, a, b in zip("qkv", *runs):
        assert torch.equal(a, b), f"d{name} differs between two deterministic backwards"


# --------------------------------------------------------------------------------------------
# The whole model


def test_dit_xl2_bf16_autocast_matches_the_reference_model(poisoned):
    """DiT-XL/2 at 256² (T = 256, D = 1152, 16 heads of 72), bf16 autocast: loss, output and every
    parameter gradient within twice PyTorch's own autocast error against the float64 reference."""
    config = dict(input_size=32, num_classes=1000)
    torch.manual_seed(0)
    model = zero_init_randomised(DiT_models["DiT-XL/2"](**config).cuda()).eval()
    inputs = (
        torch.randn(2, 4, 32, 32, device="cuda"),
        torch.tensor([10, 900], device="cuda"),
        torch.tensor([3, 1000], device="cuda"),
    )
    got = loss_and_grads(model, inputs, "triton", autocast=True)
    pt = loss_and_grads(model, inputs, "reference", autocast=True)
    with torch.device("cuda"):  # built where it runs: 675M float64 parameters
        twin = float64_twin(model, lambda **kw: reference_DiT_models["DiT-XL/2"](**config, **kw))
    ref = loss_and_grads(twin, inputs, "reference")
    for name, g, p, r in zip(names(model), got, pt, ref):
        assert torch.isfinite(g).all(), f"{name}: not finite"
        err, pt_err = ((t.double() - r).norm() / r.norm() for t in (g, p))
        assert err <= 2 * pt_err + 1e-6, f"{name}: relative error {err:.3g} vs PyTorch autocast's {pt_err:.3g}"


def test_cuda_graph_sampling_replays_the_eager_samples(monkeypatch):
    captures = []
    capture = sample._Loop._capture
    monkeypatch.setattr(sample._Loop, "_capture", lambda self: captures.append(1) or capture(self))
    torch.manual_seed(0)
    model = zero_init_randomised(
        DiT(input_size=16, patch_size=2, hidden_size=144, depth=2, num_heads=2, num_classes=10).cuda()
    )
    runs = {}
    with ops.use_attention_backend("triton"):
        for graphs in (False, True):
            runs[graphs] = sample.generate(
                model, [1, 7, 3], cfg_scale=4.0, steps=5, seed=0, device="cuda", cuda_graphs=graphs
            )
    assert captures == [1], "one capture, then replays"
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-5, atol=1e-5)


def test_two_training_steps_then_resume_is_bit_exact(tmp_path, monkeypatch):
    """On CUDA too: with the deterministic attention backward and the attention backend pinned."""
    monkeypatch.setenv("FASTDIT_ATTENTION", "triton")
    args = ["--global-batch-size", "16", "--sample-steps", "2", "--sample-every", "0", "--log-every", "1000",
            "--precision", "bf16", "--steps", "2", "--ckpt-every", "1", "--device", "cuda"]  # fmt: skip
    step = train.Trainer.train_step

    def crash_after_1(self, x, y):
        if self.step == 1:
            raise KeyboardInterrupt  # killed: nothing after the step-1 checkpoint is saved
        return step(self, x, y)

    with ops.use_deterministic(True):
        whole = train.main(args + ["--out", str(tmp_path / "whole")])
        monkeypatch.setattr(train.Trainer, "train_step", crash_after_1)
        with pytest.raises(KeyboardInterrupt):
            train.main(args + ["--out", str(tmp_path / "split")])
        monkeypatch.setattr(train.Trainer, "train_step", step)
        resumed = train.main(["--resume", str(tmp_path / "split")])
    a, b = torch.load(whole.checkpoint, weights_only=True), torch.load(resumed.checkpoint, weights_only=True)
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key} {name} differs after --resume"
    for i, state in a["opt"]["state"].items():
        assert torch.equal(state["exp_avg"], b["opt"]["state"][i]["exp_avg"]), f"optimizer state {i}"


def test_sample_ddp_continued_after_a_crash_writes_the_same_file(tmp_path, monkeypatch):
    """The CUDA generator's state saved with each batch, restored on continuing; CUDA graphs captured then."""
    monkeypatch.setenv("FASTDIT_ATTENTION", "triton")  # one backend in both processes' runs
    run = train.main(["--global-batch-size", "16", "--sample-every", "0", "--steps", "1", "--device", "cuda",
                      "--out", str(tmp_path / "run")])  # fmt: skip
    args = ["sample-ddp", "--ckpt", run.checkpoint, "--device", "cuda", "--num-samples", "6", "--per-proc-batch-size",
            "2", "--steps", "3", "--cuda-graphs"]  # fmt: skip
    assert cli(args + ["--out", str(tmp_path / "whole.npz")]) == 0
    save = _parts.Parts.save

    def save_then_crash(self, batch, images):
        save(self, batch, images)
        if batch == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(_parts.Parts, "save", save_then_crash)
    assert cli(args + ["--out", str(tmp_path / "split.npz")]) == 130
    monkeypatch.setattr(_parts.Parts, "save", save)
    assert cli(args + ["--out", str(tmp_path / "split.npz")]) == 0
    whole, split = (np.load(tmp_path / f"{name}.npz")["arr_0"] for name in ("whole", "split"))
    assert np.array_equal(whole, split)
