"""Developer tool: compile the attention kernels for a GPU without one, and report their resources.

    TRITON_INTERPRET=0 python -m fastdit.ops._attention_codegen [--arch 90] [--head-dims 64,72] [--dtype bfloat16]

Runs the real launchers on CPU tensors with the kernel launches captured, compiles each captured
launch ahead of time for `arch` through Triton's full pipeline (TTIR -> TTGIR -> PTX -> cubin,
Triton's bundled ptxas), and prints one JSON line per kernel: registers, stack and local memory
(spills), shared memory, and PTX counts (wgmma, cp.async, 16-byte loads) that show whether tensor
cores, pipelining and vector loads survived. What it cannot tell: speed, and races.
Needs Triton 3.2+ (ASTSource with string signatures) and TRITON_INTERPRET unset or 0.
"""
import argparse
import json
import os
import re
import subprocess
import tempfile
from unittest import mock

import torch

KERNELS = ("attention_fwd_kernel", "attention_bwd_delta_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel")
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _capture_launches(module, run):
    """[(kernel, args, kwargs)] of every kernel launch `run()` makes, none of them executed."""
    launches = []

    class Capture:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    patches = [mock.patch.object(module, name, Capture(getattr(module, name))) for name in KERNELS]
    patches.append(mock.patch.object(module, "check_device", lambda name, t: None))
    for p in patches:
        p.start()
    try:
        run()
    finally:
        for p in patches:
            p.stop()
    return launches


def _source(kernel, args, constexprs):
    """Triton's ASTSource for one launch, specialised as the JIT would (16-divisible ints and pointers)."""
    import triton

    signature, attrs, values = {}, {}, iter(args)
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        v = next(values)
        if isinstance(v, torch.Tensor):
            signature[name], aligned = "*" + _TYPES[v.dtype], v.data_ptr() % 16 == 0
        elif isinstance(v, int):
            signature[name], aligned = ("i32" if abs(v) < 2**31 else "i64"), v % 16 == 0 and v != 0
        else:
            signature[name], aligned = "fp32", False
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def _resources(kernel, args, kwargs, arch, workdir):
    import triton
    from triton.backends.compiler import GPUTarget

    constexprs = dict(kwargs)
    options = {"num_warps": constexprs.pop("num_warps", 4), "num_stages": constexprs.pop("num_stages", 3)}  # JIT defaults
    backend = triton.compiler.make_backend(GPUTarget("cuda", arch, 32))
    compiled = triton.compile(_source(kernel, args, constexprs), target=GPUTarget("cuda", arch, 32),
                              options=backend.parse_options(options).__dict__)  # fmt: skip
    cubin = os.path.join(workdir, f"{kernel.__name__}.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    reg, stack, local = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK", "LOCAL"))
    ptx = compiled.asm["ptx"]
    return dict(
        kernel=kernel.__name__, atomic_dq=kwargs.get("ATOMIC_DQ"), num_warps=options["num_warps"],
        num_stages=options["num_stages"], block_m=kwargs.get("BLOCK_M"), block_n=kwargs.get("BLOCK_N"),
        registers=reg, stack_bytes=stack, local_bytes=local, shared_bytes=compiled.metadata.shared,
        wgmma=ptx.count("wgmma.mma_async"), cp_async=ptx.count("cp.async.c"), vector_loads=ptx.count("ld.global.v4"),
    )  # fmt: skip


def report(head_dim, dtype=torch.bfloat16, arch=90, B=2, T=256, H=16):
    """Resource rows for every kernel the forward and both backwards launch at this head dim."""
    from . import _attention_triton as at

    if at.INTERPRET:
        raise RuntimeError("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")

    def run():
        q, k, v = torch.empty(B, T, 3, H, head_dim, dtype=dtype).unbind(2)
        o, lse = torch.empty(B, T, H, head_dim, dtype=dtype), torch.empty(B, H, T)
        at.forward(q, k, v)
        for deterministic in (False, True):
            at.backward(torch.empty_like(o), q, k, v, o, lse, deterministic)

    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for kernel, args, kwargs in _capture_launches(at, run):
            if not any(r["kernel"] == kernel.__name__ and r["atomic_dq"] == kwargs.get("ATOMIC_DQ") for r in rows):
                rows.append(dict(head_dim=head_dim, dtype=str(dtype)[6:], **_resources(kernel, args, kwargs, arch, workdir)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--head-dims", default="64,72,96,128")
    parser.add_argument("--dtype", default="bfloat16", choices=[str(t)[6:] for t in _TYPES])
    args = parser.parse_args()
    for head_dim in (int(d) for d in args.head_dims.split(",")):
        for row in report(head_dim, getattr(torch, args.dtype), args.arch):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
