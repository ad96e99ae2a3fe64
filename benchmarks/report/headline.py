"""The headline block of BENCHMARKING.md, from a run's rows: each number, or why it is null.

Each number comes from the case benchmarks/cases.py names (the kernels' closest measured shape
when that one is missing, said so in the sources).
"""

import math

from benchmarks import cases
from benchmarks.report.load import (
    E2E_LABELS,
    FASTDIT_KERNEL_IMPLS,
    KERNELS,
    attention_groups,
    best_e2e,
    best_fastdit,
    e2e_rows,
    kernel_groups,
    measured,
    ratio,
    suite_absent,
    why_missing,
)  # fmt: skip

TARGETS = (  # (headline path, target, higher is better, what)
    (("train", "mfu"), 55.0, True, "DiT-XL/2 256² training MFU (%)"),
    (("train", "speedup_vs_compile"), 1.15, True, "DiT-XL/2 256² training vs torch.compile(reference) (×)"),
    (("sample", "speedup_vs_compile"), 1.2, True, "DiT-XL/2 250-step DDPM sampling vs torch.compile(reference) (×)"),
    (("train", "peak_mem_ratio_vs_eager"), 0.6, False, "peak training memory / reference eager (×)"),
    (("attention", "hd72_over_hd64_per_flop"), 0.9, True, "attention head dim 72 / head dim 64 TFLOP/s (×)"),
    (("attention", "T256_hd72_vs_best_other"), 1.0, True, "attention T=256 head dim 72 vs the best other backend (×)"),
) + tuple(  # BENCHMARKING.md's fused-kernel targets, per kernel
    (("kernels", k, key), target, True, f"{k} {what}")
    for k in KERNELS
    for key, target, what in (("fwd_pct_copy_bw", 90.0, "forward, % of copy bandwidth"),
                              ("bwd_pct_copy_bw", 80.0, "backward, % of copy bandwidth"),
                              ("fwd_speedup_vs_compile", 1.25, "forward vs torch.compile(reference) (×)"),
                              ("bwd_speedup_vs_compile", 1.25, "backward vs torch.compile(reference) (×)"))
)  # fmt: skip
KERNEL_KEYS = ("fwd_pct_copy_bw", "bwd_pct_copy_bw", "fwd_speedup_vs_compile", "bwd_speedup_vs_compile")
TRAIN_KEYS = ("batch_per_gpu", "img_per_s", "mfu", "speedup_vs_eager", "speedup_vs_compile", "peak_mem_ratio_vs_eager")
HEADLINE_TOKENS = cases.KERNEL["B"] * cases.KERNEL["T"]


def headline(run):
    """(headline dict per BENCHMARKING.md, {dotted key: reason} for every null, {part: source note})."""
    env, ceil = run["environment"], run["ceilings"]
    missing, sources = {}, {}
    h = {
        "gpu": env.get("gpu"),
        "date": env.get("date"),
        "commit": env.get("commit"),
        "copy_bandwidth_gbs": ceil.get("copy_bandwidth_gbs"),
        "bf16_matmul_tflops": ceil.get("bf16_matmul_tflops"),
    }
    if h["gpu"] is None:
        missing["gpu"] = "no GPU: smoke run on CPU"
    for key in ("copy_bandwidth_gbs", "bf16_matmul_tflops"):
        if h[key] is None:
            missing[key] = "ceilings are not measured in smoke mode (no GPU)"
    h["kernels"] = {k: _kernel(run, k, missing, sources) for k in KERNELS}
    h["attention"] = _attention(run, missing, sources)
    h["train"] = _train(run, missing, sources)
    h["sample"] = _sample(run, missing, sources)
    return h, missing, sources


def _kernel(run, kernel, missing, sources):
    out = dict.fromkeys(KERNEL_KEYS)
    absent = suite_absent(run, kernel)
    groups = [g for g in kernel_groups(run, kernel) if best_fastdit(g["impls"])] if not absent else []
    for mode in ("fwd", "bwd"):
        keys = (f"{mode}_pct_copy_bw", f"{mode}_speedup_vs_compile")
        g = _closest_to_headline([g for g in groups if g["mode"] == mode])
        if g is None:
            for key in keys:
                missing[f"kernels.{kernel}.{key}"] = absent or f"no {mode} rows with a measured fastdit time"
            continue
        fd, comp = best_fastdit(g["impls"]), g["impls"].get("compile")
        out[keys[0]] = fd.get("pct_copy_bw")
        out[keys[1]] = ratio(comp["ms"], fd["ms"]) if measured(comp) else None
        if out[keys[0]] is None:
            missing[f"kernels.{kernel}.{keys[0]}"] = no_rate_reason(run, "copy_bandwidth_gbs", "pct_copy_bw")
        if out[keys[1]] is None:
            missing[f"kernels.{kernel}.{keys[1]}"] = why_missing(comp, "torch.compile(reference)")
        exact = (g.get("D"), g.get("tokens"), g.get("dtype")) == (
            cases.KERNEL["D"],
            HEADLINE_TOKENS,
            cases.KERNEL["dtype"],
        )
        sources[f"kernels.{kernel}.{mode}"] = (
            f"{g['case']} ({g['dtype']}, D={g['D']}, {g['tokens']} tokens), fastdit = {fd['impl']}"
            + ("" if exact else f"; the headline shape (D={cases.KERNEL['D']}, {HEADLINE_TOKENS} tokens, "
                                f"{cases.KERNEL['dtype']}) was not measured: closest shape used")
        )  # fmt: skip
    return out


def no_rate_reason(run, ceiling, field):
    if run["ceilings"].get(ceiling) is None:
        return f"no {field}: the ceiling {ceiling} is not measured in smoke mode"
    return f"the fastdit row carries no {field}"


def _closest_to_headline(groups):
    """The group closest to the headline kernel shape (exact where measured)."""

    def distance(g):
        d, tokens = g.get("D"), g.get("tokens")
        return (
            g.get("dtype") != cases.KERNEL["dtype"],
            abs(math.log(d / cases.KERNEL["D"])) if isinstance(d, (int, float)) and d > 0 else math.inf,
            abs(math.log(tokens / HEADLINE_TOKENS)) if isinstance(tokens, (int, float)) and tokens > 0 else math.inf,
        )

    return min(groups, key=distance) if groups else None


def _attention(run, missing, sources):
    out = dict.fromkeys(("T256_hd72_tflops", "T256_hd72_vs_best_other", "hd72_over_hd64_per_flop"))
    absent = suite_absent(run, "attention")
    groups = [g for g in attention_groups(run) if best_fastdit(g["impls"])] if not absent else []
    T = cases.ATTENTION_HEADLINE_T

    def pick(dh, like=None):
        cands = [g for g in groups if g["T"] == T and g["Dh"] == dh]
        if like is not None:
            cands = [g for g in cands if (g["mode"], g["dtype"]) == (like["mode"], like["dtype"])]
            work = (like["B"] or 0) * (like["H"] or 0)
            return min(cands, key=lambda g: abs((g["B"] or 0) * (g["H"] or 0) - work), default=None)
        # forward, bf16, the XL/2 head count, then the largest batch
        return min(
            cands,
            key=lambda g: (g["mode"] != "fwd", g["dtype"] != "bfloat16", g["H"] != 16, -(g["B"] or 0)),
            default=None,
        )

    g72 = pick(cases.ATTENTION_HEAD_DIM)
    if g72 is None:
        for key in out:
            missing[f"attention.{key}"] = (
                absent or f"no T={T}, head dim {cases.ATTENTION_HEAD_DIM} rows with a measured fastdit time"
            )
        return out
    fd = best_fastdit(g72["impls"])
    others = [r for k, r in g72["impls"].items() if k not in FASTDIT_KERNEL_IMPLS and measured(r)]
    best_other = max(others, key=lambda r: r.get("tflops") or 0) if others else None
    out["T256_hd72_tflops"] = fd.get("tflops")
    out["T256_hd72_vs_best_other"] = ratio(out["T256_hd72_tflops"], best_other.get("tflops")) if best_other else None
    g64 = pick(cases.ATTENTION_BASELINE_HEAD_DIM, like=g72)
    fd64 = best_fastdit(g64["impls"]) if g64 else None
    out["hd72_over_hd64_per_flop"] = ratio(out["T256_hd72_tflops"], fd64.get("tflops")) if fd64 else None
    sources["attention"] = (
        f"{g72['case']} (B={g72['B']}, H={g72['H']}, {g72['mode']}, {g72['dtype']}), fastdit = {fd['impl']}"
        + (f"; best other = {best_other['impl']}" if best_other else "")
        + (f"; head dim 64 case: {g64['case']}" if g64 else "")
    )  # fmt: skip
    reasons = {
        "T256_hd72_tflops": "no TFLOP/s recorded for the fastdit row",
        "T256_hd72_vs_best_other": "no other attention implementation measured at this shape",
        "hd72_over_hd64_per_flop": f"no T={T}, head dim 64 case measured with the same mode and dtype",
    }
    for key, why in reasons.items():
        if out[key] is None:
            missing[f"attention.{key}"] = why
    return out


def _model_name(row):
    return cases.MODEL + (" (smoke stand-in)" if row is not None and row.get("stand_in") else "")


def _train(run, missing, sources):
    out = {"model": cases.MODEL, "resolution": cases.RESOLUTION, **dict.fromkeys(TRAIN_KEYS)}
    rows = e2e_rows(run, "train", cases.MODEL, cases.RESOLUTION)
    fd = best_e2e(rows)
    if fd is None:
        why = suite_absent(run, "end_to_end") or why_missing(rows.get("fastdit"), "fastdit training")
        for key in TRAIN_KEYS:
            missing[f"train.{key}"] = why
        return out
    eager, comp = rows.get("eager"), rows.get("compile")
    out.update(
        model=_model_name(fd),
        batch_per_gpu=fd.get("batch"),
        img_per_s=fd["img_per_s"],
        mfu=fd.get("mfu"),
        speedup_vs_eager=ratio(fd["img_per_s"], eager["img_per_s"]) if measured(eager) else None,
        speedup_vs_compile=ratio(fd["img_per_s"], comp["img_per_s"]) if measured(comp) else None,
        peak_mem_ratio_vs_eager=ratio(fd.get("peak_mem_gib"), eager.get("peak_mem_gib")) if measured(eager) else None,
    )
    sources["train"] = f"fastdit = {E2E_LABELS[fd['impl']]} (the faster of fastdit and torch.compile(fastdit))" + (
        f", {fd['config']}" if fd.get("config") else ""
    )
    reasons = {
        "mfu": no_rate_reason(run, "bf16_matmul_tflops", "mfu"),
        "speedup_vs_eager": why_missing(eager, "reference eager"),
        "speedup_vs_compile": why_missing(comp, "torch.compile(reference)"),
        "peak_mem_ratio_vs_eager": "peak memory is measured on CUDA only"
        if measured(eager) else why_missing(eager, "reference eager"),
    }  # fmt: skip
    for key, why in reasons.items():
        if out[key] is None:
            missing[f"train.{key}"] = why
    return out


def _sample(run, missing, sources):
    out = {"model": cases.MODEL, "steps": cases.SAMPLER_STEPS, "img_per_s": None, "speedup_vs_compile": None}
    rows = e2e_rows(run, "sample", cases.MODEL, cases.RESOLUTION, sampler=cases.SAMPLER, steps=cases.SAMPLER_STEPS)
    fd = best_e2e(rows)
    if fd is None:
        why = suite_absent(run, "end_to_end") or why_missing(rows.get("fastdit"), "fastdit sampling")
        missing["sample.img_per_s"] = missing["sample.speedup_vs_compile"] = why
        return out
    comp = rows.get("compile")
    out["model"] = _model_name(fd)
    out["img_per_s"] = fd["img_per_s"]
    out["speedup_vs_compile"] = ratio(fd["img_per_s"], comp["img_per_s"]) if measured(comp) else None
    if out["speedup_vs_compile"] is None:
        missing["sample.speedup_vs_compile"] = why_missing(comp, "torch.compile(reference)")
    steps = cases.SAMPLER_STEPS
    extrapolated = f", {fd['timed_steps']} steps timed and extrapolated to {steps}" if fd.get("extrapolated") else ""
    sources["sample"] = (
        f"fastdit = {E2E_LABELS[fd['impl']]}, {fd.get('batch')} images (+ as many unconditional){extrapolated}"
    )
    return out


def target_rows(h, fmt):
    """[(what, target, measured, verdict)] for the targets."""
    out = []
    for path, target, higher, what in TARGETS:
        v = h
        for key in path:
            v = v[key]
        if v is None:
            verdict = "not measured"
        elif (v >= target) if higher else (v <= target):
            verdict = "met"
        elif higher:
            verdict = f"short by {fmt(target - v)} ({fmt(100 * (target - v) / target)} % of the target)"
        else:
            verdict = f"over by {fmt(v - target)} ({fmt(100 * (v - target) / target)} % of the target)"
        out.append((what, ("≥ " if higher else "≤ ") + fmt(target), v, verdict))
    return out
