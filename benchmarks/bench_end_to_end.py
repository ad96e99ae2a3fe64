"""End to end: DiT training steps and CFG sampling, fastdit against the reference eager and compiled.

For each model of workloads.cases() and each implementation of workloads.IMPLS:
  train   images/s of the training step `fastdit train` runs (fastdit.train.TrainStep: no host
          synchronisation; the reference models run the same step), MFU (3 x forward FLOPs / step
          time / measured bf16 matmul rate), peak memory (torch.cuda.max_memory_allocated), and
          `breakdown`: the % of one step's op time per category (benchmarks/profile_step.py)
  sample  images/s of 250-step DDPM and 50-step DDIM with CFG (scale 4); in quick and smoke mode a
          few steps are timed and the per-step time extrapolated (rows say so: `extrapolated`).
          The reference models run DiT's sampling loop; fastdit runs `fastdit sample`'s
          (fastdit.sample.Sampler: the denoising step as one CUDA graph, GEMM weights in bf16)
  profile a per-op breakdown of one training step (benchmarks/profile_step.py), for the headline model
For the headline model, training also runs in the configurations of TRAIN_VARIANTS (activation
checkpointing, FP8), each its own row beside the bf16 one.

Jobs run headline model first, in the order the headline needs them, so a time budget cuts the
less important ones (recorded as skipped, with the reason). A job that runs out of memory is
recorded as such; one that fails is recorded and its test fails. In smoke mode the torch.compile
rows are recorded as skipped (compiling on a CPU runner takes minutes) unless
FASTDIT_BENCH_COMPILE=1, and every row names its stand-in model (`stand_in`, `config`).
"""

import functools
import os
import traceback

import pytest
import torch

from benchmarks import harness, profile_step, workloads
from fastdit.sample import Sampler, cast_gemm_weights

SUITE = "end_to_end"
PROFILE_IMPLS = ("eager", "fastdit")
# The headline model's jobs in the order the headline block needs them, then its profile.
HEADLINE_FIRST = [("train", "eager"), ("train", "fastdit"), ("sample", "fastdit"), ("train", "compile"), ("sample", "compile"),
                  ("train", "fastdit+compile"), ("sample", "fastdit+compile"), ("sample", "eager")]  # fmt: skip
HEADLINE_FIRST += [("profile", impl) for impl in reversed(PROFILE_IMPLS)]
# Training configurations of the headline model beyond bf16 with every activation kept:
# row name -> (implementation, --grad-checkpointing, --precision). FP8 (torchao's float8 linears)
# is compiled, as torchao intends: eager, its scaling and casts run as separate kernels.
TRAIN_VARIANTS = {
    "fastdit ckpt=selective": ("fastdit", "selective", "bf16"),
    "fastdit ckpt=full": ("fastdit", "full", "bf16"),
    "torch.compile(fastdit) fp8": ("fastdit+compile", "none", "fp8"),
}
# Seconds a job needs at least, to start it before the deadline (compilation dominates).
MIN_SECONDS = {"eager": 15, "fastdit": 15, "compile": 90, "fastdit+compile": 90}
TRAIN_WARMUP, TRAIN_ITERS = (1, 1) if harness.SMOKE else (3, 5) if harness.QUICK else (5, 20)
COMPILE_IN_SMOKE = os.environ.get("FASTDIT_BENCH_COMPILE") == "1"


def jobs():
    """(task, model, resolution, train batch, sample batch, impl) in the order they run: for the
    headline model, what the headline needs first (a time budget cuts from the end), then the rest;
    then the other models."""
    out = []
    for i, (model, res, train_batch, sample_batch) in enumerate(workloads.cases()):
        case = (model, res, train_batch, sample_batch)
        order = list(HEADLINE_FIRST) if i == 0 else []
        order += [(task, impl) for task in ("train", "sample") for impl in workloads.IMPLS if (task, impl) not in order]
        order += [("train", variant) for variant in TRAIN_VARIANTS] if i == 0 else []
        out += [(task, *case, impl) for task, impl in order]
    return out


def train_config(impl):
    """(implementation, checkpointing, precision) of a training row: a variant's, else impl's in bf16."""
    return TRAIN_VARIANTS.get(impl, (impl, "none", "bf16"))


def _job_id(job):
    task, model, res, _, _, impl = job
    return f"{task}-{model}-{res}-{impl}"


@pytest.mark.parametrize("job", jobs(), ids=_job_id)
def test_end_to_end(job):
    with workloads.cpu_threads_for_smoke():
        run_job(*job)


def run_job(task, model, resolution, train_batch, sample_batch, impl):
    cfg = workloads.config(model, resolution)
    base = dict(
        task=task, model=model, resolution=resolution, impl=impl, config=workloads.describe(cfg),
        case=f"{task} {model} {resolution}",
    )  # fmt: skip
    base["batch"] = sample_batch if task == "sample" else train_batch
    if harness.SMOKE:
        base["stand_in"] = True
    suite = profile_step.SUITE if task == "profile" else SUITE
    build_impl, checkpointing, precision = train_config(impl)
    if impl in TRAIN_VARIANTS:
        base.update(checkpointing=checkpointing, precision=precision)
    # A missing float8 stack first: that the row can never run here says more than a smoke-mode skip.
    skip = (_fp8_unavailable() if precision == "fp8" else None) or _skip_reason(build_impl)
    if skip:
        rows = [{"sampler": s, "steps": n} for s, n in workloads.SAMPLERS.items()] if task == "sample" else [{}]
        return [harness.record(suite, **base, **r, ms=None, status=skip) for r in rows][0]
    workloads.release()
    try:
        if task == "train":
            return measure_train(base, cfg, train_batch)
        if task == "sample":
            return measure_sample(base, cfg, sample_batch)
        return profile_step.record_breakdown(base, cfg, train_batch)
    except Exception as exc:
        oom = workloads.is_oom(exc)
        status = f"out of memory at batch {base['batch']}" if oom else f"error: {type(exc).__name__}: {exc}"
        row = harness.record(suite, **base, ms=None, status=status[:500])
        if oom:  # a measurement outcome, not a failure
            return row
        failure = traceback.format_exc()
    finally:
        workloads.release()
    # Failing outside the except clause drops the exception and its frames (and their GPU tensors),
    # which pytest would otherwise keep alive for the rest of the suite.
    pytest.fail(failure, pytrace=False)


def _fp8_unavailable():
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "not installed: torchao (pip install torchao)"
    if harness.DEVICE != "cuda" or torch.cuda.get_device_capability() < (8, 9):
        return "skipped: float8 GEMMs need compute capability 8.9+"
    return None


def _skip_reason(impl):
    if harness.SMOKE and impl in workloads.COMPILED and not COMPILE_IN_SMOKE:
        return "skipped: smoke mode (compiling on CPU is too slow; FASTDIT_BENCH_COMPILE=1 runs it)"
    return harness.skip_reason(MIN_SECONDS[impl])


def measure_train(base, cfg, batch):
    impl, checkpointing, precision = train_config(base["impl"])
    step = profile_step.train_step(impl, cfg, batch, checkpointing, precision)
    first_call_s = workloads.timed_first_call(step)
    with workloads.peak_memory() as mem:
        ms, spread = harness.time_steps(step, TRAIN_ITERS, warmup=TRAIN_WARMUP)
    flops = 3 * workloads.forward_flops(**cfg) * batch  # recomputation is not useful work: MFU leaves it out
    return harness.record(
        SUITE, **base, ms=ms, spread_ms=spread, img_per_s=batch / ms * 1e3, first_call_s=first_call_s,
        **_flop_rates(flops, ms), **mem, breakdown=profile_step.category_shares(step),
    )  # fmt: skip


def fastdit_sampler(impl, cfg, n):
    """`fastdit sample`'s loop for impl's model: sampler(name, steps) -> samples. One fastdit.sample.Sampler
    per (sampler, steps) -- each captures its CUDA graph on its first call -- on the same z and labels."""
    model = cast_gemm_weights(workloads.build(impl, cfg).eval(), torch.bfloat16)
    z = torch.randn(n, workloads.IN_CHANNELS, cfg["latent"], cfg["latent"], device=harness.DEVICE)
    y = torch.randint(0, workloads.NUM_CLASSES, (n,), device=harness.DEVICE)

    @functools.cache
    def sampler(name, steps):
        return Sampler(
            model,
            cfg_scale=workloads.CFG_SCALE,
            sampler=name,
            steps=steps,
            use_cfg=True,
            clip_denoised=False,
            precision="bf16",
            compile=impl in workloads.COMPILED,
            device=harness.DEVICE,
        )

    return lambda name, steps: sampler(name, steps)(y, z=z)


def measure_sample(base, cfg, n):
    impl = base["impl"]
    ours = impl not in ("eager", "compile")
    sampler = fastdit_sampler(impl, cfg, n) if ours else workloads.Sampler(workloads.build(impl, cfg), impl, cfg, n)
    first_call_s = workloads.timed_first_call(lambda: sampler("ddpm", 2))  # 1 step does not respace
    step_flops = workloads.forward_flops(**cfg) * 2 * n  # the model sees the conditional + unconditional batch
    rows = []
    for name, steps in workloads.SAMPLERS.items():
        timed = (
            workloads.SMOKE_TIMED_STEPS if harness.SMOKE else workloads.QUICK_TIMED_STEPS if harness.QUICK else steps
        )
        # warm: the first call compiled the model; fastdit's samplers also capture a graph per (sampler, steps)
        loop_ms, spread = harness.time_steps(lambda n=name, k=timed: sampler(n, k), iters=1, warmup=int(ours))
        ms = loop_ms * steps / timed  # the whole sampling run
        rows.append(harness.record(
            SUITE, **base, sampler=name, steps=steps, timed_steps=timed, extrapolated=timed != steps,
            ms=ms, spread_ms=spread * steps / timed, ms_per_step=loop_ms / timed, img_per_s=n / ms * 1e3,
            first_call_s=first_call_s, **_flop_rates(step_flops * steps, ms),
        ))  # fmt: skip
    return rows[0]


def _flop_rates(flops, ms):
    """{'tflops', 'mfu'}: achieved TFLOP/s and its % of the measured bf16 matmul rate."""
    tflops = flops / ms / 1e9
    peak = harness.ceilings()["bf16_matmul_tflops"]
    return {"flops": flops, "tflops": tflops, "mfu": 100 * tflops / peak if peak else None}
