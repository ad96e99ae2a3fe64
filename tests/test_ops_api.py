"""fastdit.ops: backend selection and input validation shared by every op."""

import os

import pytest
import torch

from fastdit import ops, reference
from fastdit.ops import _dispatch
from tests.helpers import TRITON_36
from tests.kernel_helpers import forbid_kernels


def test_every_contract_op_is_exposed():
    for name in ("modulate_layer_norm", "gated_residual", "gated_residual_modulate_layer_norm",
                 "patchify", "unpatchify", "attention"):  # fmt: skip
        assert callable(getattr(ops, name)), name


def test_one_name_finds_everything_about_an_op():
    """ops.<op> is the function (never shadowed by a module), fastdit/ops/_<op>.py holds it and
    registers fastdit::<op>_fwd / _bwd, and the reference, test file and benchmark suite carry the name."""
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    importlib.import_module("fastdit.ops._attention_triton")  # attention's custom ops: its Triton backend
    for name in ops.OPS:
        module = importlib.import_module(f"fastdit.ops._{name}")
        assert getattr(ops, name) is getattr(module, name), name
        assert callable(getattr(reference, name)), name
        assert (root / "tests" / f"test_{name}.py").exists() and (root / "benchmarks" / f"bench_{name}.py").exists(), (
            name
        )
        assert hasattr(torch.ops.fastdit, f"{name}_fwd") and hasattr(torch.ops.fastdit, f"{name}_bwd"), name
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("fastdit.ops.attention")


def test_backend_selection(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("FASTDIT_BACKEND", raising=False)
    assert ops.get_backend() == "auto"
    assert _dispatch.resolve(cpu) == "reference" and _dispatch.resolve(cuda) == "triton"
    monkeypatch.setenv("FASTDIT_BACKEND", "triton")
    assert _dispatch.resolve(cpu) == "triton"
    with ops.use_backend("reference"):
        assert _dispatch.resolve(cuda) == "reference"
        with ops.use_backend("auto"):
            assert _dispatch.resolve(cpu) == "reference"
        assert ops.get_backend() == "reference"
    assert ops.get_backend() == "triton"
    monkeypatch.setenv("FASTDIT_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTDIT_BACKEND must be one of"):
        ops.get_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_backend("tpu"):
            pass
    monkeypatch.setenv("FASTDIT_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="the input is on cpu, and the cuda backend"):
        _dispatch.resolve(cpu)


def rows(B=2, T=3, D=8, dtype=torch.float32):
    return torch.randn(B, T, D, dtype=dtype), torch.randn(B, D, dtype=dtype)


BAD_ROW_INPUTS = [
    # (call, exception, message fragment)
    (lambda x, v: ops.modulate_layer_norm(x[0], v, v), ValueError, "x must be 3-D"),
    (lambda x, v: ops.modulate_layer_norm(x, v[:, :4], v), ValueError, r"shift must have shape \(B, D\) = \(2, 8\)"),
    (lambda x, v: ops.modulate_layer_norm(x, v, v[:1]), ValueError, "scale must have shape"),
    (lambda x, v: ops.modulate_layer_norm(x.long(), v, v), TypeError, "x must be float32, float16, bfloat16"),
    (lambda x, v: ops.modulate_layer_norm(x, v, "s"), TypeError, "scale must be a torch.Tensor"),
    (lambda x, v: ops.modulate_layer_norm(x, v, v, eps=0), ValueError, "eps must be a positive float"),
    (lambda x, v: ops.modulate_layer_norm(x, v, v, eps=float("inf")), ValueError, "at most float32's max"),
    (lambda x, v: ops.gated_residual_modulate_layer_norm(x, x, v, v, v, eps=1e39), ValueError, "eps must be"),
    (lambda x, v: ops.modulate_layer_norm(x, v, v.to("meta")), ValueError, "one device"),
    (lambda x, v: ops.modulate_layer_norm(x[:, :0], v, v), ValueError, "non-empty T and D"),  # B = 0 runs
    (lambda x, v: ops.gated_residual(x[..., :0], x[..., :0], v[:, :0]), ValueError, "non-empty T and D"),
    (lambda x, v: ops.gated_residual(x, x[:, :2], v), ValueError, "y must have shape"),
    (lambda x, v: ops.gated_residual(x, x, v.int()), TypeError, "gate must be float32"),
    (lambda x, v: ops.gated_residual_modulate_layer_norm(x, x, v, v, v[:, 1:]), ValueError, "scale must have shape"),
    (lambda x, v: ops.gated_residual_modulate_layer_norm(x, x.transpose(1, 2), v, v, v), ValueError, "y must"),
]


@pytest.mark.parametrize("call, exc, match", BAD_ROW_INPUTS)
def test_row_ops_reject_bad_inputs(call, exc, match):
    x, v = rows()
    with pytest.raises(exc, match=match):
        call(x, v)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: ops.patchify(torch.randn(1, 4, 9, 8), 2), ValueError, "multiples of patch_size=2"),
        (lambda: ops.patchify(torch.randn(4, 8, 8), 2), ValueError, "x must be 4-D"),
        (lambda: ops.patchify(torch.randn(2, 0, 8, 8), 2), ValueError, "at least one channel"),  # no features
        (lambda: ops.patchify(torch.randn(1, 4, 8, 8), 0), ValueError, "patch_size must be a positive int"),
        (lambda: ops.patchify(torch.randn(1, 4, 8, 8), 2.0), ValueError, "patch_size must be a positive int"),
        (lambda: ops.unpatchify(torch.randn(1, 16, 15), 2, 4), ValueError, "last dimension must be"),
        (lambda: ops.unpatchify(torch.randn(1, 15, 16), 2, 4), ValueError, "not a square grid"),
        (lambda: ops.unpatchify(torch.randn(1, 16, 16), 2, 4, grid_size=(3, 5)), ValueError, "holds 15 tokens"),
        (lambda: ops.unpatchify(torch.randn(1, 16, 16), 2, 0), ValueError, "channels must be"),
        (lambda: ops.attention(*[torch.randn(1, 4, 2, 8)] * 2, torch.randn(1, 5, 2, 8)), ValueError, "same shape"),
        (lambda: ops.attention(torch.randn(1, 4, 2, 8), *[torch.randn(1, 4, 2, 4)] * 2), ValueError, "match q"),
        (lambda: ops.attention(torch.randn(4, 2, 8), *[torch.randn(1, 4, 2, 8)] * 2), ValueError, "q must be 4-D"),
        (lambda: ops.attention(torch.randn(1, 4, 2, 8), *[torch.randn(1, 0, 2, 8)] * 2), ValueError, "non-empty T"),
        (
            lambda: ops.attention(torch.randn(1, 4, 2, 8).half(), *[torch.randn(1, 4, 2, 8)] * 2),
            TypeError,
            "one dtype",
        ),
    ],
)
def test_layout_and_attention_ops_reject_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


FLOAT64_CALLS = {  # op -> a call on float64 inputs (rows, row vectors, an image, q)
    "modulate_layer_norm": lambda x, v, img, q: ops.modulate_layer_norm(x, v, v, eps=1e-5),
    "gated_residual": lambda x, v, img, q: ops.gated_residual(x, x.flip(1), v),
    "gated_residual_modulate_layer_norm": lambda x, v, img, q: ops.gated_residual_modulate_layer_norm(x, x, v, v, v),
    "patchify": lambda x, v, img, q: ops.patchify(img, 2),
    "unpatchify": lambda x, v, img, q: ops.unpatchify(ops.patchify(img, 2), 2, 3, grid_size=(2, 3)),
    "attention": lambda x, v, img, q: ops.attention(q, q.flip(1), q),
}


@pytest.mark.parametrize("name", list(FLOAT64_CALLS))
def test_float64_runs_the_reference_in_float64_and_the_kernel_backends_refuse_it(name):
    """The kernels compute in float32: `auto` runs float64 inputs (a model.double()) on the reference, in
    float64, on any device; the Triton backend, asked for by name, refuses them naming what to use."""
    x, v = rows(dtype=torch.float64)
    args = x, v, torch.randn(2, 3, 4, 6, dtype=torch.float64), torch.randn(2, 5, 3, 8, dtype=torch.float64)
    call = FLOAT64_CALLS[name]
    with ops.use_backend("reference"), ops.use_attention_backend("math"):
        want = call(*args)
    with ops.use_backend("auto"), ops.use_attention_backend("auto"):
        got = call(*args)
    for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (want, got))):
        assert b.dtype == torch.float64 and torch.equal(a, b), name
    with ops.use_backend("triton"), ops.use_attention_backend("triton"):
        with pytest.raises((TypeError, ops.BackendUnavailable), match="float64"):
            call(*args)
    with ops.use_backend("triton"):  # one float64 input among float32 ones is refused too
        with pytest.raises(TypeError, match="x or another input is float64, which the triton backend"):
            ops.gated_residual(x.float(), x.float(), v)


def test_auto_routes_float64_to_the_reference_where_it_would_run_the_kernels(monkeypatch):
    """On CUDA tensors `auto` runs the kernels; float64 among the inputs takes the reference instead."""
    from fastdit.ops import _triton_utils

    monkeypatch.setattr(_triton_utils, "resolve", lambda device, name: "triton")  # as for a CUDA tensor
    x, v = rows()
    with ops.use_backend("auto"):
        assert _triton_utils.implementation("x", x, v) == "triton"
        assert _triton_utils.implementation("x", x, v.double()) == "reference"
        assert _triton_utils.implementation("x", x.double()) == "reference"


def test_compiled_ops_take_an_empty_batch(monkeypatch):
    """Under torch.compile an empty batch traces to the reference (a graph of its own: torch specialises sizes 0
    and 1), and the check for it guards nothing on a dynamic batch: B = 3 and 5 share one graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(lambda x, v: ops.gated_residual_modulate_layer_norm(x, x, v, v, v), backend=counter, dynamic=True)
    with ops.use_backend("triton"):
        with monkeypatch.context() as patch:
            forbid_kernels(patch)
            r, out = f(*rows(B=0))
        assert r.shape == out.shape == (0, 3, 8)
        f(*rows(B=3))
        graphs = counter.frame_count
        f(*rows(B=5))
    assert counter.frame_count == graphs


def test_reference_backend_hands_the_reference_every_argument(monkeypatch):
    """Under the reference backend no kernel runs (every kernel buffer comes from _triton_utils.empty)
    and each op passes its arguments through unchanged: non-default eps, a non-square grid, and
    distinct tensors in every slot, so a dropped or swapped argument changes the result."""
    forbid_kernels(monkeypatch)
    x, y = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    gate, shift, scale = torch.randn(3, 2, 8).unbind(0)
    img, tokens = torch.randn(2, 3, 4, 6), torch.randn(2, 6, 12)  # tokens: a 2 x 3 grid of 2 x 2 x 3 patches
    calls = [
        ("modulate_layer_norm", (x, shift, scale), {"eps": 0.5}),
        ("gated_residual", (x, y, gate), {}),
        ("gated_residual_modulate_layer_norm", (x, y, gate, shift, scale), {"eps": 0.5}),
        ("patchify", (img, 2), {}),
        ("unpatchify", (tokens, 2, 3), {"grid_size": (2, 3)}),
    ]
    with ops.use_backend("reference"):
        for name, args, kwargs in calls:
            got, expected = getattr(ops, name)(*args, **kwargs), getattr(reference, name)(*args, **kwargs)
            for g, e in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, expected))):
                assert torch.equal(g, e), name


def _fresh_python(code, **env):
    """Run `code` in a new interpreter (nothing imported yet), without the tests' TRITON_INTERPRET."""
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDIT_BACKEND")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env})


@pytest.mark.skipif(torch.version.cuda is not None or torch.version.hip is not None, reason="a CPU-only torch build")
def test_compile_before_any_kernel_loads_on_a_cpu_build():
    # torch.compile imports triton while tracing, before fastdit's kernel modules load: fastdit must
    # already have chosen the interpreter, or Triton's own library would not be interpretable.
    code = """
import torch, fastdit
from fastdit import ops
x, v = torch.randn(2, 3, 8), torch.randn(2, 8)
f = torch.compile(lambda x, v: ops.modulate_layer_norm(x, v, v), fullgraph=True, backend="aot_eager")
torch.testing.assert_close(f(x, v), fastdit.reference.modulate_layer_norm(x, v, v))
print("ok")
"""
    proc = _fresh_python(code, FASTDIT_BACKEND="triton")
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.skipif(torch.version.cuda is not None or torch.version.hip is not None, reason="a CPU-only torch build")
def test_triton_imported_first_gives_a_clear_error_and_reference_still_runs():
    code = """
import triton.language, torch, fastdit
from fastdit import ops
x, v = torch.randn(2, 3, 8), torch.randn(2, 8)
ops.modulate_layer_norm(x, v, v)  # auto on CPU: the reference, unaffected
try:
    with ops.use_backend("triton"):
        ops.modulate_layer_norm(x, v, v)
except RuntimeError as e:
    print(e)
"""
    proc = _fresh_python(code)
    assert "Triton was imported before TRITON_INTERPRET=1 was set" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.skipif(
    not (TRITON_36 / "triton").is_dir(), reason=f"Triton 3.6 is not at {TRITON_36} (.ci/run puts it there)"
)
def test_triton_36_interprets_the_kernels_with_a_current_numpy():
    # Triton 3.6's interpreter converts loop bounds and int arguments with int() of a shape-(1,)
    # array, which numpy >= 2.4 refuses; fastdit gives it 3.7's conversion (a row loop and an
    # attention key loop below, both over tensor bounds).
    code = """
import numpy, torch, triton, fastdit
from fastdit import ops, reference
assert triton.__version__.startswith("3.6."), triton.__version__
torch.manual_seed(0)
x, v, qkv = torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 5, 3, 2, 16)
with ops.use_backend("triton"):
    y = ops.modulate_layer_norm(x, v, v)
torch.testing.assert_close(y, reference.modulate_layer_norm(x, v, v))
o = ops.attention_packed(qkv, backend="triton")
torch.testing.assert_close(o, reference.attention(*qkv.unbind(2)))
print("ok", numpy.__version__)
"""
    pythonpath = os.pathsep.join(filter(None, [str(TRITON_36), os.environ.get("PYTHONPATH")]))
    proc = _fresh_python(code, TRITON_INTERPRET="1", PYTHONPATH=pythonpath)
    assert proc.stdout.startswith("ok"), proc.stderr[-2000:]
