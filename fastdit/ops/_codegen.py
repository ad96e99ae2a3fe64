"""Every Triton kernel launch fastdit's launchers choose, listed without running a kernel, and
compiled ahead of time for a GPU that is not there.

    TRITON_INTERPRET=0 python -m fastdit.ops._codegen [--arch 80,90] [--jobs N]

prints one JSON line per distinct launch of the DiT family (`dit_family`): kernel, shape and dtypes,
launch configuration, registers, spills (stack and local bytes), shared memory, the programs per SM
that fit and the ones its launcher assumes, and PTX counts that show whether tensor cores, pipelined
copies (cp.async), 16-byte loads and fused multiply-adds survived. CI gates the kernels on it (tests/test_codegen.py);
the device check compiles the launches of its own workloads up front (benchmarks/precompile.py).
What it cannot tell: speed, and races.

How: `capture()` replaces every kernel with a recorder and makes the launchers choose the GPU's
configuration for a given SM count and compute capability, so the ops run their real launchers on
CPU (or CUDA) tensors and each launch is recorded, not run. Needs TRITON_INTERPRET=0 (or unset
with a CUDA build of torch): interpreted kernels compile to nothing.
"""

import argparse
import contextlib
import dataclasses
import importlib
import json
import math
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from unittest import mock

import torch

KERNEL_MODULES = ("fastdit.ops._rows", "fastdit.ops._layout", "fastdit.ops._attention_triton")
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}
SMS = {80: 108, 90: 132}  # A100, H100/H200
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}  # bytes a multiprocessor gives its programs
REGISTERS_PER_SM, MAX_WARPS_PER_SM, MAX_PROGRAMS_PER_SM = 65536, 64, 32
REGISTER_GRANULE = 256  # registers are allocated per warp in units of this many


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as Triton specialises it: what decides the compiled code, and where it came from."""

    module: str
    kernel: str  # the kernel's attribute name in `module`
    args: tuple  # per runtime argument: ("tensor", dtype, 16-byte aligned) | ("int", value) | ("float",) | ("none",)
    constexprs: tuple  # sorted (name, value) pairs
    num_warps: int
    num_stages: int
    maxnreg: int = None
    fp_fusion: bool = None  # None: Triton's default, which changes in 3.10
    label: str = dataclasses.field(default="", compare=False)  # the workload that launched it

    def key(self):
        """What Triton's specialisation sees: integers by width, divisibility by 16 and equality to 1."""
        args = tuple(("int", abs(a[1]) >= 2**31, a[1] % 16 == 0, a[1] == 1) if a[0] == "int" else a for a in self.args)
        return (self.module, self.kernel, args, self.constexprs, self.num_warps, self.num_stages, self.maxnreg,
                self.fp_fusion)  # fmt: skip

    @property
    def flags(self):
        return dict(self.constexprs)

    def options(self):
        """The launch options Triton takes beside the kernel's arguments."""
        return {
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            **({"maxnreg": self.maxnreg} if self.maxnreg else {}),
            **({"enable_fp_fusion": self.fp_fusion} if self.fp_fusion is not None else {}),
        }

    def function(self):
        return getattr(importlib.import_module(self.module), self.kernel)

    def family(self):
        """The name the kernel compiles under (`modulate_layer_norm_fwd_kernel`, ...)."""
        mod, c = importlib.import_module(self.module), self.flags
        if self.kernel.startswith("rows_"):
            return f"{mod.OP_OF_FLAGS[(c['HAS_RESIDUAL'], c['HAS_NORM'])]}_{self.kernel.split('_')[1]}_kernel"
        if self.kernel == "layout_kernel":
            return mod.KERNEL_NAMES[(c["TO_IMAGE"], c["CHANNELS_LAST"])]
        return self.kernel


def _describe(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", _TYPES[value.dtype], (value.data_ptr() % 16) == 0)
    if isinstance(value, bool):
        return ("int", int(value))
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float",)
    if value is None:
        return ("none",)
    raise TypeError(f"a kernel argument of type {type(value).__name__} cannot be described")


class _Recorder:
    def __init__(self, module, name, kernel, launches, label):
        self.module, self.name, self.kernel, self.launches, self.label = module, name, kernel, launches, label

    def __getitem__(self, grid):
        def launch(
            *args, num_warps=4, num_stages=3, maxnreg=None, enable_fp_fusion=None, **constexprs
        ):  # Triton's defaults
            self.launches.append(Launch(self.module, self.name, tuple(map(_describe, args)), tuple(sorted(constexprs.items())),
                                        num_warps, num_stages, maxnreg, enable_fp_fusion, self.label[0]))  # fmt: skip

        return launch


@contextlib.contextmanager
def capture(sms=None, capability=None):
    """Record every fastdit kernel launch instead of running it. With `sms` and `capability`, the
    launchers choose as on such a GPU whatever device the tensors are on (CPU tensors work: nothing
    runs). Yields (launches, label): set label[0] to tag the launches of the next workload."""
    from . import _attention_triton, _triton_utils

    if _triton_utils.INTERPRET:
        raise RuntimeError("set TRITON_INTERPRET=0 before fastdit loads: interpreted kernels compile to nothing")
    launches, label = [], [""]
    patches = [mock.patch.object(_triton_utils, "check_device", lambda name, t: None),
               mock.patch.object(_attention_triton, "check_device", lambda name, t: None)]  # fmt: skip
    if sms is not None:
        patches += [mock.patch.object(_triton_utils, "gpu_launch", lambda device: True),
                    mock.patch.object(_triton_utils, "sm_count", lambda device: sms),
                    mock.patch.object(_triton_utils, "capability", lambda device: capability)]  # fmt: skip
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        for attr, value in list(vars(module).items()):
            if attr.endswith("_kernel") and hasattr(value, "warmup"):
                patches.append(mock.patch.object(module, attr, _Recorder(name, attr, value, launches, label)))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield launches, label


def distinct(launches):
    """One launch per compiled variant, in first-seen order."""
    seen = {}
    for launch in launches:
        seen.setdefault(launch.key(), launch)
    return list(seen.values())


# --------------------------------------------------------------------------------------------
# The DiT family's launches


ROW_WIDTHS = (1152, 1024, 768, 384, 216)  # DiT-XL, L, B, S; 216 = 72*3, an odd multiple of 72
ROW_DTYPES = {  # name: (x dtype, y and adaLN vectors' dtype); autocast: fp32 residual stream, bf16 GEMM outputs
    "float32": (torch.float32, torch.float32), "float16": (torch.float16, torch.float16),
    "bfloat16": (torch.bfloat16, torch.bfloat16), "autocast": (torch.float32, torch.bfloat16),
}  # fmt: skip
LAYOUTS = ((4, 32, 2), (4, 64, 2), (4, 32, 4), (4, 32, 8))  # (latent channels, latent size, patch)
# (head dim, heads): DiT-XL; DiT-L; DiT-S (and B: 12). Triton specialises on H's divisibility by 16,
# and the head offsets compile differently without it (a dK/dV kernel once spilled on sm_80 there).
ATTENTION_SHAPES = ((72, 16), (64, 16), (64, 6))
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def row_ops(B, T, D, x_dtype, v_dtype, device="cpu"):
    """Forward and backward of the three row ops, with DiT's adaLN `.chunk` views as vectors (the
    fused op both ways: keeping r, and keeping x and recomputing r, as DiT's blocks alternate)."""
    from . import gated_residual, gated_residual_modulate_layer_norm, modulate_layer_norm

    x, y = (torch.empty(B, T, D, dtype=dt, device=device, requires_grad=True) for dt in (x_dtype, v_dtype))
    gate, shift, scale = torch.empty(B, 6 * D, dtype=v_dtype, device=device, requires_grad=True).chunk(6, dim=1)[:3]
    for out in (
        modulate_layer_norm(x, shift, scale),
        gated_residual(x, y, gate),
        gated_residual_modulate_layer_norm(x, y, gate, shift, scale),
        gated_residual_modulate_layer_norm(x, y, gate, shift, scale, keep_x=True),
    ):
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])


def layout_ops(B, C, size, p, dtype, device="cpu"):
    """Forward and backward of patchify (C channels) and unpatchify (2C: DiT's learned sigma)."""
    from . import patchify, unpatchify

    image = torch.empty(B, C, size, size, dtype=dtype, device=device, requires_grad=True)
    tokens = torch.empty(B, (size // p) ** 2, p * p * 2 * C, dtype=dtype, device=device, requires_grad=True)
    for out in (patchify(image, p), unpatchify(tokens, p, 2 * C)):
        out.backward(torch.empty_like(out))


def attention_ops(B, T, H, Dh, dtype, device="cpu"):
    """Forward and both backwards (atomic and deterministic dQ) of attention on the packed qkv."""
    from . import attention_packed, use_deterministic

    for deterministic in (False, True):
        qkv = torch.empty(B, T, 3, H, Dh, dtype=dtype, device=device, requires_grad=True)
        with use_deterministic(deterministic):
            out = attention_packed(qkv, backend="triton")
        out.backward(torch.empty_like(out))


# CI's gate: the row kernels' four tile shapes (D 1152, 1024 and 768, 384, 216), three dtypes and
# autocast's mix; both layout directions at the smallest and largest patch; attention in every
# dtype. fp16's row kernels compile like bf16's and the widths left out share a tile with a kept one.
GATE = dict(
    widths=(1152, 768, 384, 216), row_dtypes=("bfloat16", "float32", "autocast"), layouts=(LAYOUTS[0], LAYOUTS[3])
)


def dit_family(B=16, T=256, widths=ROW_WIDTHS, row_dtypes=tuple(ROW_DTYPES), layouts=LAYOUTS):
    """[(label, workload)] of every op of the DiT family (widths, dtypes, latents, head dims) at
    batch B and T tokens. B and T change launch integers; T = 1 and T not divisible by 16 change the
    compiled code (Triton specialises on both): at T = 17 the 16-bit head-dim-72 attention forward
    spills 56 (Triton 3.6) to 264 (3.9) bytes on sm_90, where DiT's T, a multiple of 16, spills none."""
    out = []
    for D in widths:
        for name in row_dtypes:
            xd, vd = ROW_DTYPES[name]
            out.append((f"rows D={D} {name}", lambda D=D, xd=xd, vd=vd: row_ops(B, T, D, xd, vd)))
    for dtype in DTYPES:
        for C, size, p in layouts:
            out.append(
                (
                    f"layout C={C} {size}x{size} p={p} {_TYPES[dtype]}",
                    lambda C=C, size=size, p=p, dtype=dtype: layout_ops(B, C, size, p, dtype),
                )
            )
    for Dh, H in ATTENTION_SHAPES:
        for dtype in DTYPES:
            out.append(
                (
                    f"attention Dh={Dh} H={H} {_TYPES[dtype]}",
                    lambda Dh=Dh, H=H, dtype=dtype: attention_ops(2, T, H, Dh, dtype),
                )
            )
    return out


def launches_of(workloads, sms=None, capability=None, device_ctx=contextlib.nullcontext):
    """The distinct launches the workloads make on a GPU with `sms` SMs of `capability`."""
    from . import use_attention_backend, use_backend

    with capture(sms, capability) as (launches, label), use_backend("triton"), use_attention_backend("triton"):
        for name, run in workloads:
            label[0] = name
            run()
    return distinct(launches)


# --------------------------------------------------------------------------------------------
# Compiling ahead of time


def source(launch):
    """Triton's ASTSource for a launch, specialised as the JIT would (16-divisible ints and pointers)."""
    import triton

    kernel = launch.function()
    constexprs = dict(launch.constexprs)
    signature, attrs, values = {}, {}, iter(launch.args)
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        arg = next(values)
        if arg[0] == "none":
            signature[name], constexprs[name] = "constexpr", None
            continue
        if arg[0] == "tensor":
            signature[name], aligned = "*" + arg[1], arg[2]
        elif arg[0] == "int":
            signature[name], aligned = ("i32" if abs(arg[1]) < 2**31 else "i64"), arg[1] % 16 == 0 and arg[1] != 0
        else:
            signature[name], aligned = "fp32", False
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_launch(launch, arch):
    """Resources of `launch` compiled for sm_`arch`: registers, spills, shared memory, PTX counts."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    options = triton.compiler.make_backend(target).parse_options(launch.options())
    compiled = triton.compile(source(launch), target=target, options=options.__dict__)
    with tempfile.TemporaryDirectory() as workdir:
        cubin = os.path.join(workdir, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run(
            [cuobjdump_path(), "-res-usage", cubin], capture_output=True, text=True, check=True
        ).stdout
    regs, stack, local = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK", "LOCAL"))
    shared = compiled.metadata.shared
    ptx = compiled.asm["ptx"]
    return dict(
        kernel=compiled.metadata.name,  # the name a profiler trace shows
        registers=regs, stack_bytes=stack, local_bytes=local, shared_bytes=shared,
        programs_per_sm=programs_per_sm(regs, launch.num_warps, shared, arch),
        tensor_core_ops=ptx.count("wgmma.mma_async") + ptx.count("mma.sync"),
        cp_async=ptx.count("cp.async.c") + ptx.count("cp.async.bulk"), vector_loads=ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4"),
        fused_multiply_adds=ptx.count("fma.rn"),
    )  # fmt: skip


def cuobjdump_path():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def programs_per_sm(registers, num_warps, shared_bytes, arch):
    """How many programs of this size one multiprocessor holds at once (registers, warps, shared memory)."""
    per_warp = math.ceil(max(registers, 1) * 32 / REGISTER_GRANULE) * REGISTER_GRANULE
    by_registers = REGISTERS_PER_SM // per_warp // num_warps
    by_warps = MAX_WARPS_PER_SM // num_warps
    by_shared = (
        SHARED_PER_SM[arch] // (shared_bytes + 1024) if shared_bytes else MAX_PROGRAMS_PER_SM
    )  # 1 KB reserved per program
    return min(by_registers, by_warps, by_shared, MAX_PROGRAMS_PER_SM)


def assumed_programs_per_sm(launch, arch):
    """The programs per SM `launch`'s launcher counts on (its grid's size, or its configuration's note)."""
    from . import _attention_triton, _rows

    if launch.kernel.startswith("rows_"):
        c = launch.flags
        return _rows.PROGRAMS_PER_SM[launch.kernel.split("_")[1], _rows.OP_OF_FLAGS[c["HAS_RESIDUAL"], c["HAS_NORM"]]]
    which = {"attention_fwd_kernel": 0, "attention_bwd_dkdv_kernel": 1, "attention_bwd_dq_kernel": 2}.get(launch.kernel)
    if which is None:
        return 1  # the layout kernel and attention's delta pre-pass: no occupancy assumed
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[launch.args[0][1]]
    return _attention_triton.gpu_configs(launch.flags["HEAD_DIM"], dtype, (arch // 10, arch % 10))[
        which
    ].programs_per_sm


def report(launch, arch):
    """One JSON-able row: the launch and its compiled resources for sm_`arch`."""
    return dict(arch=arch, workload=launch.label, num_warps=launch.num_warps, num_stages=launch.num_stages,
                constexprs={k: v for k, v in launch.constexprs if k.isupper()}, **compile_launch(launch, arch),
                assumed_programs_per_sm=assumed_programs_per_sm(launch, arch))  # fmt: skip


def _report_job(job):
    launch, arch = job
    return report(launch, arch)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastdit.ops._codegen", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,90", help="compute capabilities to compile for, e.g. 80,90 (default)")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes (default: one per core)"
    )
    parser.add_argument("--gate", action="store_true", help="only CI's gate: a tile shape of each kind (GATE)")
    args = parser.parse_args(argv)
    jobs = []
    for arch in (int(a) for a in args.arch.split(",")):
        if arch not in SMS:
            parser.error(f"--arch {arch}: one of {', '.join(map(str, SMS))}")
        family = dit_family(**GATE) if args.gate else dit_family()
        jobs += [(launch, arch) for launch in launches_of(family, SMS[arch], (arch // 10, arch % 10))]
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(_report_job, jobs):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
