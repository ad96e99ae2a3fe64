"""Where one training step's time goes: a per-op breakdown from torch.profiler.

Each op's self device time (on CPU, in smoke mode: self CPU time) over one training step, after
warm-up; ops grouped into categories (GEMM, attention, fastdit fused ops, normalisation/elementwise,
casts and copies, optimizer + EMA). The step is fastdit.train.TrainStep, the one `fastdit train`
runs (train_step below builds it for any implementation's model), so the profile and the
end-to-end timings see the real step. The end-to-end suite records the top ops for the headline
model and the categories of every training configuration; the report shows them next to any
missed target.

    python -m benchmarks.profile_step [--model DiT-XL/2] [--resolution 256] [--batch 64] [--impl fastdit]
prints the table for one model and implementation.
"""

import argparse
import copy
import re

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks import harness, workloads
from fastdit import train
from fastdit._dist import Dist
from fastdit.diffusion import create_diffusion

SUITE = "profile"
TOP_OPS = 25
# First match wins; names are profiler event keys such as aten::addmm or fastdit::attention.
CATEGORIES = (
    ("attention", r"attention|flash|softmax|_efficient_attention|cudnn_attention"),
    ("GEMM", r"aten::(mm|addmm|_addmm_activation|bmm|baddbmm|matmul|linear|_scaled_mm)\b|conv|gemm"),
    ("fastdit fused ops", r"^fastdit::"),
    ("optimizer + EMA", r"_foreach|adam|lerp|optimizer"),
    ("casts and copies", r"aten::(_to_copy|copy_|to|clone|contiguous|cat|_unsafe_view|index)\b"),
    ("norm / elementwise / other", r""),
)
LAUNCHES = re.compile(r"^(cudaLaunchKernel|cuLaunchKernel|cudaLaunchKernelExC|cuLaunchKernelEx)$")


def train_step(impl, cfg, batch, checkpointing="none", precision="bf16"):
    """A zero-argument callable running one fastdit.train.TrainStep -- the step `fastdit train` runs:
    random t, MSE + VLB loss, backward, fused AdamW (lr 1e-4), EMA, no host synchronisation -- on a
    fixed batch of latents, with implementation `impl`'s model (compiled for the compiled ones)."""
    model = workloads.build(impl, cfg).train()  # train mode: label dropout, as in training
    if checkpointing != "none":  # fastdit's models (the reference model has no such option)
        model.set_gradient_checkpointing(checkpointing)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    device = torch.device(harness.DEVICE)
    if precision == "fp8":
        train.to_float8(model, device)
    single = Dist(rank=0, world_size=1, local_rank=0, device=device, owns_group=False)
    step = train.TrainStep(
        workloads.maybe_compile(model, impl),
        model,
        ema,
        create_diffusion(timestep_respacing=""),
        single,
        precision=precision,
        lr=1e-4,
        ema_decay=workloads.EMA_DECAY,
    )
    x = torch.randn(batch, workloads.IN_CHANNELS, cfg["latent"], cfg["latent"], device=device)
    y = torch.randint(0, workloads.NUM_CLASSES, (batch,), device=device)
    return lambda: step(x, y)


def category(op):
    return next(name for name, pattern in CATEGORIES if re.search(pattern, op, re.IGNORECASE))


def breakdown(step):
    """[{op, category, ms, calls, pct}] of one call of `step`, most expensive first, and the total ms."""
    on_gpu = harness.DEVICE == "cuda"
    step()  # warm-up: allocator, autotuning, lazy initialisation
    workloads.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        step()
        workloads.sync()
    ops = []
    for e in prof.key_averages():
        if e.device_type != DeviceType.CPU:  # kernels themselves: already counted as their op's self time
            continue
        us = e.self_device_time_total if on_gpu else e.self_cpu_time_total
        if us > 0:
            op = "(kernels launched outside any op)" if LAUNCHES.match(e.key) else e.key
            ops.append({"op": op, "category": category(op), "ms": us / 1e3, "calls": e.count})
    total = sum(o["ms"] for o in ops)
    for o in ops:
        o["pct"] = 100 * o["ms"] / total if total else None
    return sorted(ops, key=lambda o: -o["ms"]), total


def categories(ops):
    """{category: ms} of a breakdown, most expensive first."""
    out = {}
    for o in ops:
        out[o["category"]] = out.get(o["category"], 0.0) + o["ms"]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def category_shares(step):
    """{category: % of the step's op time} of one profiled call of `step` (after a warm-up call)."""
    ops, total = breakdown(step)
    return {name: 100 * ms / total for name, ms in categories(ops).items()} if total else {}


def record_breakdown(base, cfg, batch):
    """Profile one training step of base['impl'] and record its top ops, the rest and the categories."""
    ops, total = breakdown(train_step(base["impl"], cfg, batch))
    clock = "device" if harness.DEVICE == "cuda" else "cpu"
    common = dict(base, clock=clock, total_ms=total)
    rows = [
        harness.record(SUITE, **common, level="op", ms=o["ms"], **{k: o[k] for k in ("op", "category", "calls", "pct")})
        for o in ops[:TOP_OPS]
    ]
    rest = ops[TOP_OPS:]
    if rest:
        ms = sum(o["ms"] for o in rest)
        rows.append(
            harness.record(
                SUITE,
                **common,
                level="op",
                op=f"({len(rest)} other ops)",
                category="",
                ms=ms,
                calls=sum(o["calls"] for o in rest),
                pct=100 * ms / total,
            )
        )
    for name, ms in categories(ops).items():
        rows.append(
            harness.record(
                SUITE,
                **common,
                level="category",
                op=None,
                category=name,
                ms=ms,
                pct=100 * ms / total if total else None,
            )
        )
    return rows[0] if rows else harness.record(SUITE, **common, level="op", ms=None, status="profiler recorded no ops")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=None, help="default: the end-to-end suite's training batch")
    parser.add_argument("--impl", default="fastdit", choices=workloads.IMPLS)
    args = parser.parse_args(argv)
    cfg = workloads.config(args.model, args.resolution)
    batch = args.batch or next((c[2] for c in workloads.cases() if c[:2] == (args.model, args.resolution)), 8)
    ops, total = breakdown(train_step(args.impl, cfg, batch))
    clock = "device" if harness.DEVICE == "cuda" else "CPU"
    print(
        f"{args.model} {args.resolution}px, {workloads.IMPL_LABELS[args.impl]}, batch {batch}: {total:.2f} ms {clock} time in ops"
    )
    for name, ms in categories(ops).items():
        print(f"  {name:28s} {ms:10.3f} ms {100 * ms / total:5.1f} %")
    print()
    for o in ops[:TOP_OPS]:
        print(f"  {o['op'][:60]:60s} {o['ms']:10.3f} ms {o['pct']:5.1f} % {o['calls']:6d} calls")


if __name__ == "__main__":
    main()
