"""Compile, before anything is timed, every Triton kernel variant the device check launches, in parallel.

    python -m benchmarks.precompile --json OUT.json [--workers N]

Compiling is device time too: one process compiling ~60 variants one after another would spend
about a minute of the budget. Here the device check's workloads (each suite's quick shapes and the
end-to-end model's training step and sampling step, on the GPU) run once with every kernel launch
recorded instead of run (fastdit/ops/_codegen.py), and a pool of processes compiles the distinct
variants into Triton's on-disk cache, from which every later step loads them. The GPU tests' odd
shapes compile in their own parallel workers (pytest-xdist).

Writes {wall_s, capture_s, workers, kernels: {name: {variants, seconds, max_seconds}}, errors}:
the compile time per kernel family, summed over its variants.
"""

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "i32": "int32", "i64": "int64"}


def workloads():
    """[(label, run)] of what the device check's suites and end-to-end jobs launch, on the GPU."""
    import torch

    from benchmarks import bench_attention, bench_end_to_end, kernel_bench, profile_step
    from benchmarks import workloads as e2e
    from fastdit.ops import _codegen

    bf16 = torch.bfloat16
    out = [
        (f"kernels {s}", lambda s=s: _codegen.row_ops(*s, bf16, bf16, device="cuda"))
        for s in kernel_bench.ROW_SHAPES_QUICK
    ]
    out += [
        (f"kernels {s}", lambda s=s: _codegen.layout_ops(s[0], 4, s[1], s[3], bf16, device="cuda"))
        for s in kernel_bench.LAYOUT_SHAPES_QUICK
    ]
    out += [(f"attention T={T} Dh={Dh}", lambda T=T, Dh=Dh: _codegen.attention_ops(bench_attention.batch(T, "triton"), T, bench_attention.H, Dh, bf16, device="cuda"))
            for T, Dh in bench_attention.SHAPES]  # fmt: skip

    def end_to_end():  # the steps the end-to-end suite times for fastdit: fastdit train's and fastdit sample's
        for model, res, train_batch, sample_batch in e2e.cases():
            cfg = e2e.config(model, res)
            profile_step.train_step("fastdit", cfg, train_batch)()
            bench_end_to_end.fastdit_sampler("fastdit", cfg, sample_batch)("ddpm", 2)
            e2e.release()

    return out + [("end to end", end_to_end)]


def _argument(spec):
    """A stand-in for a recorded argument that Triton specialises the same way (dtype, 16-byte alignment, value)."""
    import torch

    if spec[0] == "tensor":
        t = torch.empty(64, dtype=getattr(torch, DTYPES[spec[1]]), device="cuda")
        return t if spec[2] else t[1:]  # one element in: not 16-byte aligned
    return {"int": lambda: spec[1], "float": lambda: 1.0, "none": lambda: None}[spec[0]]()


def _compile(launch):
    """Compile one launch into Triton's cache: (kernel family, seconds, error or None)."""
    t0 = time.time()
    try:
        launch.function().warmup(*map(_argument, launch.args), grid=(1,), **dict(launch.constexprs), **launch.options())
        return launch.family(), time.time() - t0, None
    except Exception as exc:  # reported, and the kernel compiles on first use instead
        return launch.family(), time.time() - t0, f"{type(exc).__name__}: {exc}"[:500]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precompile", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the compile times")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    import torch

    from fastdit.ops import _codegen

    t0 = time.time()
    device = torch.device("cuda")
    sms, capability = (
        torch.cuda.get_device_properties(device).multi_processor_count,
        torch.cuda.get_device_capability(device),
    )
    launches, errors = [], []
    for label, run in workloads():  # one failing workload (reported) leaves the others' variants to compile
        try:
            launches += _codegen.launches_of([(label, run)], sms, capability)
        except Exception as exc:
            errors.append({"kernel": f"(listing {label})", "error": f"{type(exc).__name__}: {exc}"[:500]})
    launches = _codegen.distinct(launches)
    capture_s = time.time() - t0
    deadline = float(os.environ.get("FASTDIT_BENCH_DEADLINE") or "inf")
    kernels = {}
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in as_completed([pool.submit(_compile, launch) for launch in launches]):
            name, seconds, error = future.result()
            k = kernels.setdefault(name, {"variants": 0, "seconds": 0.0, "max_seconds": 0.0})
            k["variants"] += 1
            k["seconds"] = round(k["seconds"] + seconds, 2)
            k["max_seconds"] = round(max(k["max_seconds"], seconds), 2)
            if error:
                errors.append({"kernel": name, "error": error})
            if time.time() > deadline:
                pool.shutdown(wait=False, cancel_futures=True)
                errors.append(
                    {
                        "kernel": "(the rest)",
                        "error": "not compiled: the step's deadline passed; they compile on first use",
                    }
                )
                break
    info = {"wall_s": round(time.time() - t0, 1), "capture_s": round(capture_s, 1), "workers": args.workers,
            "kernels": dict(sorted(kernels.items(), key=lambda kv: -kv[1]["seconds"])), "errors": errors}  # fmt: skip
    args.json.write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
