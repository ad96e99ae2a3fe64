"""attention: non-causal multi-head softmax attention on (B, T, H, Dh) tensors, on several backends.

The backends and the rule that picks one are described in _attention_policy (names, settings,
precedence); this module runs them and resolves `auto`. Every backend returns the output
contiguous (B, Tq, H, Dh), so the model's reshape to (B, T, D) is free. Optional packages
(triton, flash_attn, xformers) are imported on first use of their backend, never on import.
"""

import dataclasses
import importlib.util
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from .. import reference
from . import _attention_policy as policy
from ._checks import check_qkv, check_tensor
from ._dispatch import BackendUnavailable

# --------------------------------------------------------------------------------------------
# backends: run(q, k, v, deterministic) -> o (B, Tq, H, Dh) contiguous. Optional packages are
# imported inside the runners with import statements, which torch.compile can trace.
# --------------------------------------------------------------------------------------------


def _math(q, k, v, deterministic):
    return reference.attention(q, k, v).contiguous()


def _sdpa(kernel):
    """Runner of torch's scaled_dot_product_attention, forced to SDPBackend `kernel` unless None."""

    def run(q, k, v, deterministic):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh) views
        if kernel is None:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(getattr(SDPBackend, kernel)):
                o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).contiguous()  # (B, Tq, H, Dh); already so laid out by the fused kernels

    return run


def _flash_attn_module(device):
    # FlashAttention-3 (Hopper) when installed, else FlashAttention-2; both take (B, T, H, Dh) views.
    if "flash_attn_interface" in INSTALLED and torch.cuda.get_device_capability(device)[0] == 9:
        import flash_attn_interface as module
    else:
        import flash_attn as module
    return module


def _first(out):
    return out[0] if isinstance(out, tuple) else out  # some FA3 versions also return the lse


def _flash_attn(q, k, v, deterministic):
    return _first(_flash_attn_module(q.device).flash_attn_func(q, k, v, deterministic=deterministic)).contiguous()


def _flash_attn_packed(qkv, deterministic):
    return _first(_flash_attn_module(qkv.device).flash_attn_qkvpacked_func(qkv, deterministic=deterministic))


def _xformers(q, k, v, deterministic):
    from xformers.ops import memory_efficient_attention

    return memory_efficient_attention(q, k, v).contiguous()


def _triton(q, k, v, deterministic):
    from . import _attention_triton

    return _attention_triton.attention(q, k, v, deterministic)


def _triton_packed(qkv, deterministic):
    from . import _attention_triton

    return _attention_triton.attention_packed(qkv, deterministic)


@dataclasses.dataclass(frozen=True)
class Backend:
    run: Callable
    packages: tuple = ()  # import names, any one of which makes the backend installed
    install: str = ""
    cuda_only: bool = False
    cuda_half_only: bool = False  # on CUDA, float16 / bfloat16 inputs only
    max_head_dim: int | None = None
    float64: bool = True  # takes float64 inputs
    run_packed: Callable | None = None  # (qkv (B, T, 3, H, Dh), deterministic) -> o, one packed gradient


BACKENDS = {
    "triton": Backend(
        _triton, ("triton",), "pip install triton", max_head_dim=256, float64=False, run_packed=_triton_packed
    ),
    "flash_attn": Backend(
        _flash_attn,
        ("flash_attn", "flash_attn_interface"),
        "pip install flash-attn",
        cuda_only=True,
        cuda_half_only=True,
        max_head_dim=256,
        run_packed=_flash_attn_packed,
    ),
    "xformers": Backend(_xformers, ("xformers",), "pip install xformers", cuda_only=True),
    "sdpa": Backend(_sdpa(None)),
    "sdpa_flash": Backend(_sdpa("FLASH_ATTENTION"), cuda_half_only=True),
    "sdpa_efficient": Backend(_sdpa("EFFICIENT_ATTENTION"), cuda_only=True),
    "sdpa_cudnn": Backend(_sdpa("CUDNN_ATTENTION"), cuda_only=True, cuda_half_only=True),
    "sdpa_math": Backend(_sdpa("MATH")),
    "math": Backend(_math),
}
assert set(BACKENDS) == set(policy.ATTENTION_BACKENDS) - {"auto"} >= set(policy.DETERMINISTIC_ATTENTION_BACKENDS)

# Located, not imported: import fastdit stays light, and the set is a constant torch.compile can read.
INSTALLED = frozenset(
    p for b in BACKENDS.values() for p in b.packages if importlib.util.find_spec(p) is not None
)  # fmt: skip


def unavailable(name, q):
    """Why backend `name` cannot run on tensors like q here (None when it can)."""
    b = BACKENDS[name]
    if b.packages and not INSTALLED.intersection(b.packages):
        return f"needs the {b.packages[0]} package, which is not installed ({b.install})"
    if b.cuda_only and q.device.type != "cuda":
        return f"runs on CUDA tensors only; the inputs are on {q.device}"
    if b.cuda_half_only and q.device.type == "cuda" and q.dtype not in (torch.float16, torch.bfloat16):
        return f"takes float16 or bfloat16 CUDA tensors only; the inputs are {q.dtype}"
    if not b.float64 and q.dtype == torch.float64:
        return "takes float32, float16 or bfloat16 tensors (it computes in float32); the inputs are float64"
    if b.max_head_dim is not None and q.shape[-1] > b.max_head_dim:
        return f"takes head dims up to {b.max_head_dim}; got {q.shape[-1]}"
    return None


# --------------------------------------------------------------------------------------------
# auto: the fastest backend per shape, measured once
# --------------------------------------------------------------------------------------------

# Tried in this order; under torch.compile tracing or CUDA-graph capture, where nothing can be
# timed, auto takes a cached measurement of the same key or else the first available of
# STATIC_PREFERENCE (never a backend that may reject a shape: plain sdpa always runs).
AUTO_CANDIDATES = ("triton", "flash_attn", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "xformers")
STATIC_PREFERENCE = ("triton", "flash_attn", "sdpa")
AUTO_CACHE = {}  # (Tq, Tk, Dh, dtype, device, training, deterministic) -> backend name


def _cuda_median_ms(fn, min_reps=5, max_reps=100, target_ms=25.0):
    """Median time of fn() in ms by CUDA events, after a warm-up call (compilation, library loads);
    small shapes get more repeats (about target_ms in all), to resolve differences of a few percent."""
    fn()
    times, reps = [], min_reps
    while len(times) < reps:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        reps = min(max_reps, max(min_reps, int(target_ms / max(times[0], 1e-3))))
    return statistics.median(times)


def time_backend(name, q, k, v, training, deterministic):
    """ms of one forward (plus backward when training) of backend `name` on q, k, v (detached: only read).

    Measured outside the caller's activation checkpointing: the first training forward of a checkpointed
    block measures, and checkpointing's saved-tensor hooks (and selective checkpointing's dispatch mode)
    would take the measurement's graph for part of the block (its recomputation then fails) or keep its
    outputs until the block's backward. Plain hooks replace the checkpoint's: they save a detached alias
    (the tensor itself would tie an output to its own graph in a reference cycle, never freed). The random
    streams are put back after: a run draws the same numbers whether or not it measured (a resumed run
    measures again, at another step)."""
    run = BACKENDS[name].run
    leaves = [t.detach().requires_grad_(training) for t in (q, k, v)]
    with (
        torch.random.fork_rng(devices=[q.device] if q.is_cuda else []),
        _disable_current_modes(),
        torch.autograd.graph.saved_tensors_hooks(torch.Tensor.detach, lambda t: t),
        torch.enable_grad() if training else torch.no_grad(),
    ):
        do = torch.randn_like(run(*leaves, deterministic)) if training else None

        def step():
            o = run(*leaves, deterministic)
            if training:
                torch.autograd.grad(o, leaves, do)

        return _cuda_median_ms(step)


def fastest(candidates, measure):
    """The candidate with the smallest measure(name); those that raise are skipped (None if all do)."""
    times = {}
    for name in candidates:
        try:
            times[name] = measure(name)
        except Exception:  # a backend rejecting this shape/dtype/GPU is simply not a candidate
            continue
    return min(times, key=times.get) if times else None


def pick_auto(key, usable, measure, can_measure):
    """The cached choice for `key`, else the fastest of the usable AUTO_CANDIDATES by measure(name),
    cached; where nothing can be measured, the first usable of STATIC_PREFERENCE (not cached)."""
    choice = AUTO_CACHE.get(key)
    if choice is not None:
        return choice
    static = next(n for n in STATIC_PREFERENCE + ("math",) if n in usable)
    if not can_measure:
        return static
    AUTO_CACHE[key] = fastest([n for n in AUTO_CANDIDATES if n in usable], measure) or static
    return AUTO_CACHE[key]


def _auto(q, k, v):
    if q.device.type != "cuda":
        return "math"
    det = policy.deterministic()
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    usable = [
        n
        for n in BACKENDS
        if unavailable(n, q) is None and (n in policy.DETERMINISTIC_ATTENTION_BACKENDS or not (det and training))
    ]
    return pick_auto(
        (q.shape[1], k.shape[1], q.shape[3], q.dtype, q.device, training, det),
        usable,
        lambda name: time_backend(name, q, k, v, training, det),
        can_measure=not (torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()),
    )


def resolve(q, k, v, backend=None):
    """The concrete backend attention(q, k, v, backend) runs; raises if an explicit one cannot run here.

    An empty batch (B = 0) runs `math`, once an explicit backend has been found able to take such inputs:
    there is nothing to compute, nothing for `auto` to measure (its choice, cached per shape without B, would
    be made on nothing), and no kernel is launched over no programs (an error on some versions).
    """
    name = policy.requested_attention_backend(backend)
    if name != "auto":
        why = unavailable(name, q)
        if why is not None:
            here = ", ".join(n for n in BACKENDS if unavailable(n, q) is None)
            raise BackendUnavailable(f"attention backend {name!r} {why}; available for these inputs: {here}")
    if q.shape[0] == 0:
        return "math"
    return _auto(q, k, v) if name == "auto" else name


# --------------------------------------------------------------------------------------------
# public op
# --------------------------------------------------------------------------------------------


def _select(q, k, v, backend):
    check_qkv(q, k, v)
    name = resolve(q, k, v, backend)
    if not torch.compiler.is_compiling():  # Python state: a traced (e.g. checkpointed) region must not mutate it
        policy.note_ran(name)
    return BACKENDS[name]


def attention_backend(q, k=None, v=None, backend=None):
    """The backend attention(q, k, v, backend) would run (auto resolved, measuring if need be)."""
    k = q if k is None else k
    return resolve(q, k, k if v is None else v, backend)


def attention(q, k, v, backend=None):
    """softmax(q k^T / sqrt(Dh)) v; q (B, Tq, H, Dh), k and v (B, Tk, H, Dh) -> (B, Tq, H, Dh) contiguous.

    q, k, v may be strided views (e.g. of the qkv GEMM output (B, T, 3, H, Dh)). backend: one of
    fastdit.ops.ATTENTION_BACKENDS, or None for the one in force (see use_attention_backend);
    fastdit.ops.last_attention_backend() tells which ran.
    """
    return _select(q, k, v, backend).run(q, k, v, policy.deterministic())


def attention_packed(qkv, backend=None):
    """attention(*qkv.unbind(2), backend) for the qkv GEMM output viewed (B, T, 3, H, Dh).

    The same forward; backends that can (triton, flash_attn) return one packed gradient for qkv
    instead of dq, dk and dv, which unbind's backward would stack into it with a copy.
    """
    check_tensor("qkv", qkv, 5, "(B, T, 3, H, Dh)")
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (B, T, 3, H, Dh), got shape {tuple(qkv.shape)}")
    q, k, v = qkv.unbind(2)
    b = _select(q, k, v, backend)
    if b.run_packed is None:
        return b.run(q, k, v, policy.deterministic())
    return b.run_packed(qkv, policy.deterministic())
