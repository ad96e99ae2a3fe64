"""The per-GPU report: report.md, results.json (every number, the environment, the headline
block of BENCHMARKING.md) and PNG plots, built from the raw files a run left in its folder.

    python -m benchmarks.report DIR     rebuild DIR's report from DIR/raw/
    python -m benchmarks.report --readme print README.md's benchmark section (newest GPU report)

DIR/raw/ holds environment.json (environment + ceilings), run.json (mode, command, per-suite
status) and one <suite>.json of rows per suite (benchmarks/harness.py's rows). A row's
implementation names are normalised here: eager | compile | triton | cuda (fastdit's own) |
any third-party name; end-to-end rows use workloads.IMPLS.
"""
import argparse
import json
import math
import re
import textwrap
from pathlib import Path

REPORTS_DIR = Path(__file__).resolve().parent / "reports"
KERNELS = ("modulate_layer_norm", "gated_residual_modulate_layer_norm", "gated_residual", "patchify", "unpatchify")
HEADLINE_KERNEL = {"D": 1152, "tokens": 65536, "dtype": "bfloat16"}  # = harness.HEADLINE_KERNEL_SHAPE
HEADLINE_MODEL = ("DiT-XL/2", 256)
HEADLINE_SAMPLER = ("ddpm", 250)
TARGETS = (  # (headline path, target, higher is better, what)
    (("train", "mfu"), 55.0, True, "DiT-XL/2 256² training MFU (%)"),
    (("train", "speedup_vs_compile"), 1.15, True, "DiT-XL/2 256² training vs torch.compile(reference) (×)"),
    (("sample", "speedup_vs_compile"), 1.2, True, "DiT-XL/2 250-step DDPM sampling vs torch.compile(reference) (×)"),
    (("train", "peak_mem_ratio_vs_eager"), 0.6, False, "peak training memory / reference eager (×)"),
)
E2E_LABELS = {"eager": "reference eager", "compile": "torch.compile(reference)", "fastdit": "fastdit", "fastdit+compile": "torch.compile(fastdit)"}
FASTDIT_E2E = ("fastdit", "fastdit+compile")
IMPL_ALIASES = {
    "eager": "eager", "reference": "eager", "torch": "eager", "pytorch": "eager",
    "compile": "compile", "torch.compile": "compile", "torch_compile": "compile", "compiled": "compile", "inductor": "compile",
    "triton": "triton", "fastdit": "triton", "fastdit-triton": "triton", "fastdit_triton": "triton",
    "cuda": "cuda", "fastdit-cuda": "cuda", "fastdit_cuda": "cuda", "native": "cuda",
}  # fmt: skip
FASTDIT_KERNEL_IMPLS = ("triton", "cuda")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
MODE_ALIASES = {"forward": "fwd", "fwd": "fwd", "backward": "bwd", "bwd": "bwd", "fwd+bwd": "fwd+bwd", "fwd_bwd": "fwd+bwd", "fwdbwd": "fwd+bwd"}


# --------------------------------------------------------------------------------------------
# Loading and normalising a run


def load_run(out_dir):
    """{'environment', 'ceilings', 'run', 'suites': {name: {'rows', 'complete', ...status}}} of DIR/raw."""
    raw = Path(out_dir) / "raw"
    env = _read_json(raw / "environment.json") or {}
    run = _read_json(raw / "run.json") or {}
    suites = {}
    for path in sorted(raw.glob("*.json")):
        if path.stem in ("environment", "run"):
            continue
        data = _read_json(path) or {}
        rows = [{**normalise(r), "file": path.stem} for r in data.get("rows", [])]
        suites[path.stem] = {**run.get("suites", {}).get(path.stem, {}), "complete": data.get("complete"), "rows": rows}
    for name, status in run.get("suites", {}).items():
        suites.setdefault(name, {**status, "complete": False, "rows": []})
    smoke = any(r.get("smoke") for s in suites.values() for r in s["rows"])
    run.setdefault("mode", "smoke" if smoke else "full")
    return {"environment": env.get("environment", {}), "ceilings": env.get("ceilings", {}), "run": run, "suites": suites}


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def normalise(row):
    """A row with canonical impl (`impl_kind`), mode and dtype names; the raw ones stay where given."""
    row = dict(row)
    impl = str(row.get("impl", ""))
    row["impl_kind"] = IMPL_ALIASES.get(impl.lower(), impl)
    if row.get("mode") is not None:
        row["mode"] = MODE_ALIASES.get(str(row["mode"]).lower(), str(row["mode"]))
    if row.get("dtype") is not None:
        dtype = str(row["dtype"]).replace("torch.", "")
        row["dtype"] = DTYPE_ALIASES.get(dtype.lower(), dtype)
    return row


def rows_of(run, suite=None, **match):
    """Rows of `suite` (labelled so, or in bench_<suite>.py's file; all rows if None) whose fields equal `match`."""
    return [
        r for s in run["suites"].values() for r in s["rows"]
        if suite in (None, r.get("suite"), r.get("file")) and all(r.get(k) == v for k, v in match.items())
    ]  # fmt: skip


def measured(row):
    return row is not None and isinstance(row.get("ms"), (int, float)) and row["ms"] > 0


def ratio(num, den):
    return num / den if isinstance(num, (int, float)) and isinstance(den, (int, float)) and den else None


# --------------------------------------------------------------------------------------------
# Comparisons: rows of one case side by side


def kernel_groups(run, suite):
    """[{case, mode, dtype, D, tokens, impls: {kind: row}}] of a kernel suite, in recorded order."""
    return _groups(rows_of(run, suite), ("case", "mode", "dtype"), ("D", "tokens"))


def attention_groups(run):
    return _groups(rows_of(run, "attention"), ("case", "T", "Dh", "H", "B", "mode", "dtype"), ())


def _groups(rows, key_fields, extra_fields):
    groups = {}
    for r in rows:
        key = tuple(r.get(k) for k in key_fields)
        g = groups.setdefault(key, {**{k: r.get(k) for k in key_fields + extra_fields}, "impls": {}})
        old = g["impls"].get(r["impl_kind"])
        if old is None or (measured(r) and (not measured(old) or r["ms"] < old["ms"])):
            g["impls"][r["impl_kind"]] = r
    return list(groups.values())


def best_fastdit(impls, kinds=FASTDIT_KERNEL_IMPLS):
    """The fastest measured row among fastdit's implementations (None if none ran)."""
    rows = [impls[k] for k in kinds if measured(impls.get(k))]
    return min(rows, key=lambda r: r["ms"]) if rows else None


def _why_missing(row, what):
    if row is None:
        return f"{what} not recorded"
    return f"{what}: {row.get('status') or 'no time recorded'}"


# --------------------------------------------------------------------------------------------
# The headline block


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
    h["kernels"] = {k: _kernel_headline(run, k, missing, sources) for k in KERNELS}
    h["attention"] = _attention_headline(run, missing, sources)
    h["train"] = _train_headline(run, missing, sources)
    h["sample"] = _sample_headline(run, missing, sources)
    return h, missing, sources


def _suite_absent(run, suite):
    s = run["suites"].get(suite)
    if s is None:
        return f"suite {suite} did not run (benchmarks/bench_{suite}.py absent or not selected)"
    if not s["rows"]:
        return f"suite {suite} recorded no rows ({s.get('status', 'unknown status')})"
    return None


def _kernel_headline(run, kernel, missing, sources):
    out = dict.fromkeys(("fwd_pct_copy_bw", "bwd_pct_copy_bw", "fwd_speedup_vs_compile", "bwd_speedup_vs_compile"))
    absent = _suite_absent(run, kernel)
    groups = [g for g in kernel_groups(run, kernel) if best_fastdit(g["impls"])] if not absent else []
    for mode in ("fwd", "bwd"):
        keys = (f"{mode}_pct_copy_bw", f"{mode}_speedup_vs_compile")
        g = _representative(groups, mode)
        if g is None:
            for key in keys:
                missing[f"kernels.{kernel}.{key}"] = absent or f"no {mode} rows with a measured fastdit time"
            continue
        fd, comp = best_fastdit(g["impls"]), g["impls"].get("compile")
        out[keys[0]] = fd.get("pct_copy_bw")
        out[keys[1]] = ratio(comp["ms"], fd["ms"]) if measured(comp) else None
        if out[keys[0]] is None:
            missing[f"kernels.{kernel}.{keys[0]}"] = _no_rate_reason(run, "copy_bandwidth_gbs", "pct_copy_bw")
        if out[keys[1]] is None:
            missing[f"kernels.{kernel}.{keys[1]}"] = _why_missing(comp, "torch.compile(reference)")
        sources[f"kernels.{kernel}.{mode}"] = (
            f"{g['case']} ({g['dtype']}, D={g['D']}, {g['tokens']} tokens), fastdit = {fd['impl']}"
            + ("" if _is_headline_shape(g) else "; the headline shape (D=1152, 65536 tokens, bf16) was not measured: closest shape used")
        )  # fmt: skip
    return out


def _no_rate_reason(run, ceiling, field):
    if run["ceilings"].get(ceiling) is None:
        return f"no {field}: the ceiling {ceiling} is not measured in smoke mode"
    return f"the fastdit row carries no {field}"


def _is_headline_shape(g):
    return all(g.get(k) == v for k, v in HEADLINE_KERNEL.items())


def _representative(groups, mode):
    """The group of `mode` closest to the headline kernel shape (exact where measured)."""
    cands = [g for g in groups if g["mode"] == mode]

    def distance(g):
        d, tokens = g.get("D"), g.get("tokens")
        return (
            g.get("dtype") != HEADLINE_KERNEL["dtype"],
            abs(math.log(d / HEADLINE_KERNEL["D"])) if isinstance(d, (int, float)) and d > 0 else math.inf,
            abs(math.log(tokens / HEADLINE_KERNEL["tokens"])) if isinstance(tokens, (int, float)) and tokens > 0 else math.inf,
        )

    return min(cands, key=distance) if cands else None


def _attention_tflops(row):
    if row.get("tflops") is not None:
        return row["tflops"]
    if row.get("mode") == "fwd" and all(isinstance(row.get(k), int) for k in ("B", "H", "T", "Dh")):
        return 4 * row["B"] * row["H"] * row["T"] ** 2 * row["Dh"] / row["ms"] / 1e9
    return None


def _attention_headline(run, missing, sources):
    out = dict.fromkeys(("T256_hd72_tflops", "T256_hd72_vs_best_other", "hd72_over_hd64_per_flop"))
    absent = _suite_absent(run, "attention")
    groups = [g for g in attention_groups(run) if best_fastdit(g["impls"])] if not absent else []

    def pick(dh, like=None):
        cands = [g for g in groups if g["T"] == 256 and g["Dh"] == dh]
        if like is not None:
            cands = [g for g in cands if (g["mode"], g["dtype"]) == (like["mode"], like["dtype"])]
            work = (like["B"] or 0) * (like["H"] or 0)
            return min(cands, key=lambda g: abs((g["B"] or 0) * (g["H"] or 0) - work), default=None)
        # forward, bf16, the XL/2 head count, then the largest batch
        return min(cands, key=lambda g: (g["mode"] != "fwd", g["dtype"] != "bfloat16", g["H"] != 16, -(g["B"] or 0)), default=None)

    g72 = pick(72)
    if g72 is None:
        for key in out:
            missing[f"attention.{key}"] = absent or "no T=256, head dim 72 rows with a measured fastdit time"
        return out
    fd = best_fastdit(g72["impls"])
    others = [r for k, r in g72["impls"].items() if k not in FASTDIT_KERNEL_IMPLS and measured(r)]
    best_other = min(others, key=lambda r: r["ms"]) if others else None
    out["T256_hd72_tflops"] = _attention_tflops(fd)
    out["T256_hd72_vs_best_other"] = ratio(best_other["ms"], fd["ms"]) if best_other else None
    g64 = pick(64, like=g72)
    fd64 = best_fastdit(g64["impls"]) if g64 else None
    out["hd72_over_hd64_per_flop"] = ratio(out["T256_hd72_tflops"], _attention_tflops(fd64)) if fd64 else None
    sources["attention"] = (
        f"{g72['case']} (B={g72['B']}, H={g72['H']}, {g72['mode']}, {g72['dtype']}), fastdit = {fd['impl']}"
        + (f"; best other = {best_other['impl']}" if best_other else "")
        + (f"; head dim 64 case: {g64['case']}" if g64 else "")
    )  # fmt: skip
    reasons = {
        "T256_hd72_tflops": "no TFLOP/s recorded for the fastdit row",
        "T256_hd72_vs_best_other": "no other attention implementation measured at this shape",
        "hd72_over_hd64_per_flop": "no T=256, head dim 64 case measured with the same mode and dtype",
    }
    for key, why in reasons.items():
        if out[key] is None:
            missing[f"attention.{key}"] = why
    return out


def e2e_rows(run, task, model, resolution, **match):
    """{impl: row} of the end-to-end suite for one task, model and resolution."""
    return {r["impl"]: r for r in rows_of(run, "end_to_end", task=task, model=model, resolution=resolution, **match)}


def best_e2e(rows):
    """The faster of fastdit eager and torch.compile(fastdit) (None if neither ran)."""
    cands = [rows[k] for k in FASTDIT_E2E if measured(rows.get(k))]
    return max(cands, key=lambda r: r["img_per_s"]) if cands else None


def _train_headline(run, missing, sources):
    model, res = HEADLINE_MODEL
    out = {"model": model, "resolution": res, **dict.fromkeys(("batch_per_gpu", "img_per_s", "mfu", "speedup_vs_eager", "speedup_vs_compile", "peak_mem_ratio_vs_eager"))}
    rows = e2e_rows(run, "train", model, res)
    fd = best_e2e(rows)
    if fd is None:
        why = _suite_absent(run, "end_to_end") or _why_missing(rows.get("fastdit"), "fastdit training")
        for key in ("batch_per_gpu", "img_per_s", "mfu", "speedup_vs_eager", "speedup_vs_compile", "peak_mem_ratio_vs_eager"):
            missing[f"train.{key}"] = why
        return out
    eager, comp = rows.get("eager"), rows.get("compile")
    out.update(
        batch_per_gpu=fd.get("batch"),
        img_per_s=fd["img_per_s"],
        mfu=fd.get("mfu"),
        speedup_vs_eager=ratio(fd["img_per_s"], eager["img_per_s"]) if measured(eager) else None,
        speedup_vs_compile=ratio(fd["img_per_s"], comp["img_per_s"]) if measured(comp) else None,
        peak_mem_ratio_vs_eager=ratio(fd.get("peak_mem_gib"), eager.get("peak_mem_gib")) if measured(eager) else None,
    )
    sources["train"] = f"fastdit = {E2E_LABELS[fd['impl']]} (the faster of fastdit and torch.compile(fastdit))" + (f", {fd['config']}" if fd.get("config") else "")
    reasons = {
        "mfu": _no_rate_reason(run, "bf16_matmul_tflops", "mfu"),
        "speedup_vs_eager": _why_missing(eager, "reference eager"),
        "speedup_vs_compile": _why_missing(comp, "torch.compile(reference)"),
        "peak_mem_ratio_vs_eager": "peak memory is measured on CUDA only"
        if measured(eager) else _why_missing(eager, "reference eager"),
    }  # fmt: skip
    for key, why in reasons.items():
        if out[key] is None:
            missing[f"train.{key}"] = why
    return out


def _sample_headline(run, missing, sources):
    model, res = HEADLINE_MODEL
    sampler, steps = HEADLINE_SAMPLER
    out = {"model": model, "steps": steps, "img_per_s": None, "speedup_vs_compile": None}
    rows = e2e_rows(run, "sample", model, res, sampler=sampler, steps=steps)
    fd = best_e2e(rows)
    if fd is None:
        why = _suite_absent(run, "end_to_end") or _why_missing(rows.get("fastdit"), "fastdit sampling")
        missing["sample.img_per_s"] = missing["sample.speedup_vs_compile"] = why
        return out
    comp = rows.get("compile")
    out["img_per_s"] = fd["img_per_s"]
    out["speedup_vs_compile"] = ratio(fd["img_per_s"], comp["img_per_s"]) if measured(comp) else None
    if out["speedup_vs_compile"] is None:
        missing["sample.speedup_vs_compile"] = _why_missing(comp, "torch.compile(reference)")
    extrapolated = f", {fd['timed_steps']} steps timed and extrapolated to {steps}" if fd.get("extrapolated") else ""
    sources["sample"] = f"fastdit = {E2E_LABELS[fd['impl']]}, {fd.get('batch')} images (+ as many unconditional){extrapolated}"
    return out


# --------------------------------------------------------------------------------------------
# Markdown


def fmt(v, digits=3):
    """A number for a table: 3 significant digits (at least the integer part); '—' for None."""
    if v is None:
        return "—"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int) or v == 0 or not math.isfinite(v):
        return str(v)
    return f"{v:.{max(0, digits - 1 - int(math.floor(math.log10(abs(v)))))}f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _headline_rows(h):
    t, s, a = h["train"], h["sample"], h["attention"]
    rows = [
        ("copy bandwidth (GB/s)", h["copy_bandwidth_gbs"]),
        ("bf16 matmul 8192³ (TFLOP/s)", h["bf16_matmul_tflops"]),
        (f"{t['model']} {t['resolution']}² training: batch per GPU", t["batch_per_gpu"]),
        ("  images/s", t["img_per_s"]),
        ("  MFU (%)", t["mfu"]),
        ("  × reference eager", t["speedup_vs_eager"]),
        ("  × torch.compile(reference)", t["speedup_vs_compile"]),
        ("  peak memory / reference eager", t["peak_mem_ratio_vs_eager"]),
        (f"{s['model']} {s['steps']}-step DDPM sampling, CFG: images/s", s["img_per_s"]),
        ("  × torch.compile(reference)", s["speedup_vs_compile"]),
        ("attention T=256, head dim 72: TFLOP/s", a["T256_hd72_tflops"]),
        ("  × best other implementation", a["T256_hd72_vs_best_other"]),
        ("  head dim 72 / head dim 64 TFLOP/s", a["hd72_over_hd64_per_flop"]),
    ]
    for k, v in h["kernels"].items():
        rows.append((f"{k}: fwd / bwd % of copy bandwidth", f"{fmt(v['fwd_pct_copy_bw'])} / {fmt(v['bwd_pct_copy_bw'])}"))
        rows.append((f"{k}: fwd / bwd × torch.compile", f"{fmt(v['fwd_speedup_vs_compile'])} / {fmt(v['bwd_speedup_vs_compile'])}"))
    return rows


def _lookup(h, path):
    for key in path:
        h = h[key]
    return h


def target_rows(h):
    """[(what, target, measured, verdict)] for the issue's targets."""
    out = []
    for path, target, higher, what in TARGETS:
        v = _lookup(h, path)
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


def _kernel_section(run, suite):
    groups = kernel_groups(run, suite)
    kinds = _impl_kinds(groups)
    header = ["case", "mode", "dtype"] + [f"{k} ms" for k in kinds] + ["fastdit GB/s", "% copy BW", "× eager", "× compile"]
    rows = []
    for g in groups:
        fd = best_fastdit(g["impls"])
        eager, comp = g["impls"].get("eager"), g["impls"].get("compile")
        cells = [g["case"], g["mode"], g["dtype"]] + [_ms_cell(g["impls"].get(k)) for k in kinds]
        cells += [fd and fd.get("gbs"), fd and fd.get("pct_copy_bw")]
        cells += [ratio(r["ms"], fd["ms"]) if fd and measured(r) else None for r in (eager, comp)]
        rows.append(cells)
    return table(header, rows)


def _impl_kinds(groups):
    """Every implementation of the groups, in order of first appearance."""
    return list(dict.fromkeys(k for g in groups for k in g["impls"]))


def _ms_cell(row):
    if row is None:
        return None
    if measured(row):
        return f"{fmt(row['ms'])} ± {fmt(row.get('spread_ms'), 2)}"
    return row.get("status") or "—"


def _attention_section(run):
    groups = attention_groups(run)
    kinds = _impl_kinds(groups)
    header = ["case", "B", "H", "T", "Dh", "mode", "dtype"] + [f"{k} ms" for k in kinds] + ["fastdit TFLOP/s", "% matmul", "× best other"]
    rows = []
    for g in groups:
        fd = best_fastdit(g["impls"])
        others = [r["ms"] for k, r in g["impls"].items() if k not in FASTDIT_KERNEL_IMPLS and measured(r)]
        cells = [g[k] for k in ("case", "B", "H", "T", "Dh", "mode", "dtype")] + [_ms_cell(g["impls"].get(k)) for k in kinds]
        cells += [fd and _attention_tflops(fd), fd and fd.get("pct_matmul"), ratio(min(others), fd["ms"]) if fd and others else None]
        rows.append(cells)
    return table(header, rows)


def _e2e_sections(run):
    train = rows_of(run, "end_to_end", task="train")
    sample = rows_of(run, "end_to_end", task="sample")
    out = [
        "### Training step (DiT train.py: diffusion loss, backward, AdamW, EMA; bf16 autocast)\n",
        table(
            ["model", "res", "batch", "implementation", "images/s", "ms/step ± spread", "TFLOP/s", "MFU %", "peak GiB", "first call s", "status"],
            [(r["model"], r["resolution"], r.get("batch"), E2E_LABELS.get(r["impl"], r["impl"]), r.get("img_per_s"),
              _ms_cell(r) if measured(r) else None, r.get("tflops"), r.get("mfu"), r.get("peak_mem_gib"),
              r.get("first_call_s"), r.get("status") or "ok") for r in train],
        ),
        "\n### Sampling with classifier-free guidance (scale 4; batch = conditional images, the model sees twice as many)\n",
        table(
            ["model", "res", "sampler", "steps", "batch", "implementation", "images/s", "s per run", "ms/step", "timed steps", "TFLOP/s", "% matmul", "status"],
            [(r["model"], r["resolution"], r.get("sampler"), r.get("steps"), r.get("batch"), E2E_LABELS.get(r["impl"], r["impl"]),
              r.get("img_per_s"), r["ms"] / 1e3 if measured(r) else None, r.get("ms_per_step"),
              (f"{r['timed_steps']} (extrapolated)" if r.get("extrapolated") else r.get("timed_steps")),
              r.get("tflops"), r.get("mfu"), r.get("status") or "ok") for r in sample],
        ),
    ]  # fmt: skip
    return "\n".join(out)


def profile_summary(run):
    """{impl: {'case', 'clock', 'total_ms', 'batch', 'categories': {name: pct}, 'ops': [rows], 'status'}}."""
    out = {}
    for r in rows_of(run, "profile"):
        p = out.setdefault(r["impl"], {"case": f"{r.get('model')} {r.get('resolution')}²", "clock": r.get("clock"), "total_ms": r.get("total_ms"), "batch": r.get("batch"), "categories": {}, "ops": [], "status": r.get("status")})
        if r.get("level") == "category":
            p["categories"][r["category"]] = r.get("pct")
        elif r.get("level") == "op" and measured(r):
            p["ops"].append(r)
    return out


def _profile_section(run):
    prof = profile_summary(run)
    if not prof:
        return "No profile recorded (" + (_suite_absent(run, "end_to_end") or "the profile jobs did not run") + ")."
    parts = []
    for impl, p in prof.items():
        label = E2E_LABELS.get(impl, impl)
        if p["status"] and not p["ops"]:
            parts.append(f"**{label}**: {p['status']}\n")
            continue
        parts.append(
            f"**{label}**, one training step of {p['case']} (batch {p['batch']}): {fmt(p['total_ms'])} ms of {p['clock']} time in ops.\n\n"
            + table(["category", "% of op time"], list(p["categories"].items()))
            + "\n\n"
            + table(["op", "category", "ms", "% of op time", "calls"], [(o["op"], o["category"], o["ms"], o["pct"], o.get("calls")) for o in p["ops"]])
            + "\n"
        )  # fmt: skip
    return "\n".join(parts)


def _where_time_goes(run):
    """One line per profiled implementation: its three largest categories."""
    lines = []
    for impl, p in profile_summary(run).items():
        cats = ", ".join(f"{name} {fmt(pct)} %" for name, pct in list(p["categories"].items())[:3])
        if cats:
            lines.append(f"{E2E_LABELS.get(impl, impl)}: {cats}")
    return "; ".join(lines)


def render_markdown(run, results, plots):
    h, missing, sources = results["headline"], results["missing"], results["headline_sources"]
    env, mode = run["environment"], run["run"].get("mode")
    gpu = env.get("gpu") or "no GPU (CPU)"
    md = [f"# fastdit benchmark report: {gpu}\n"]
    if mode == "smoke":
        md.append("> **SMOKE RUN — not measurements.** Tiny shapes on CPU (stand-in models under the real names) "
                  "prove that every suite and this report run; no number below describes a GPU.\n")  # fmt: skip
    md.append(
        f"Date {env.get('date')} ({env.get('time_utc')}), fastdit commit `{env.get('commit')}`, mode **{mode}**"
        + (f", command `{run['run']['command']}`" if run["run"].get("command") else "")
        + ".\n"
    )
    if mode == "quick":
        md.append("Quick mode: a representative subset of kernel shapes; sampling times a few steps and extrapolates "
                  "(rows say so); end-to-end jobs that did not fit the time budget are listed as skipped.\n")  # fmt: skip
    md += ["## Headline\n", table(["metric", "value"], _headline_rows(h)), ""]
    if sources:
        md += ["Where the headline numbers come from:\n"] + [f"- {k}: {v}" for k, v in sources.items()] + [""]
    md += ["## Targets (issue 6)\n", table(["target", "goal", "measured", "verdict"], target_rows(h)), ""]
    short = [row for row in target_rows(h) if row[3] not in ("met", "not measured")]
    if short:
        md.append(f"{len(short)} target(s) missed. Where one training step's time goes — {_where_time_goes(run) or 'no profile recorded'} — "
                  "is broken down per op in [Where the time goes](#where-the-time-goes).\n")  # fmt: skip
    if missing:
        md += ["## Numbers not measured, and why\n"] + _missing_lines(missing) + [""]
    md += ["## Environment\n", table(["", ""], _env_rows(env, run["ceilings"])), ""]
    for suite in KERNELS:
        md += [f"## Kernel: {suite}\n", _suite_absent(run, suite) or _kernel_section(run, suite), ""]
    md += ["## Attention\n", _suite_absent(run, "attention") or _attention_section(run), ""]
    others = [s for s in run["suites"] if s not in (*KERNELS, "attention", "end_to_end", "profile")]
    for suite in others:
        md += [f"## Suite: {suite}\n", table(["case", "impl", "ms"], [(r.get("case"), r.get("impl"), _ms_cell(r)) for r in rows_of(run, suite)]), ""]
    md += ["## End to end\n", _suite_absent(run, "end_to_end") or _e2e_sections(run), ""]
    md += ["## Where the time goes\n", "Per-op breakdown of one training step (torch.profiler; self time per op).\n", _profile_section(run), ""]
    md += ["## Suites\n", table(["suite", "status", "rows", "seconds", "log"], _suite_rows(run)), ""]
    md += ["## Plots\n"] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    return "\n".join(md)


def _missing_lines(missing):
    """One line per headline group and reason: `kernels.patchify`: fwd_pct_copy_bw, ... — why."""
    grouped = {}
    for key, why in missing.items():
        group, _, leaf = key.rpartition(".")
        grouped.setdefault((group, why), []).append(leaf)
    return [f"- `{g or 'headline'}`: {', '.join(leaves)} — {why}" for (g, why), leaves in grouped.items()]


def _env_rows(env, ceil):
    keys = ("gpu", "driver", "cuda", "cudnn", "torch", "triton", "python", "commit", "date", "gpu_memory_gib", "sm_count",
            "compute_capability", "max_sm_clock_mhz", "max_memory_clock_mhz", "power_limit_w", "cpu")  # fmt: skip
    rows = [(k, env.get(k)) for k in keys if k in env]
    rows += [(f"package {p}", v or "not installed") for p, v in env.get("packages", {}).items()]
    rows += [(k, v) for k, v in ceil.items()]
    return rows


def _suite_rows(run):
    return [(name, s.get("status", "—"), len(s["rows"]), s.get("duration_s"), s.get("log")) for name, s in run["suites"].items()]


# --------------------------------------------------------------------------------------------
# Plots


def render_plots(run, plot_dir):
    """Write the PNG plots (always the same set of files; panels without data say why)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    prefix = "SMOKE (CPU, not measurements): " if run["run"].get("mode") == "smoke" else ""
    gpu = run["environment"].get("gpu") or "CPU"
    paths = []

    def save(fig, name, title):
        fig.suptitle(f"{prefix}{title} — {gpu}", fontsize=10)
        fig.tight_layout()
        path = plot_dir / name
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)

    for suite in KERNELS:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), squeeze=False)
        for ax, mode in zip(axes[0], ("fwd", "bwd")):
            groups = [g for g in kernel_groups(run, suite) if g["mode"] == mode and best_fastdit(g["impls"])]
            series = {f"× {base}": [_speedup(g, base) for g in groups] for base in ("eager", "compile")}
            _bars(ax, [_shape_label(g) for g in groups], series, f"{suite} {mode}: fastdit speed-up", "speed-up (×)",
                  _suite_absent(run, suite) or f"no {mode} rows", baseline=1.0)  # fmt: skip
        save(fig, f"speedup_{suite}.png", f"{suite}: fastdit speed-up over eager and torch.compile vs shape")

    fig, axes = plt.subplots(2, 3, figsize=(14, 7), squeeze=False)
    for ax, suite in zip(axes.flat, KERNELS):
        groups = kernel_groups(run, suite)
        kinds = _impl_kinds(groups)
        series = {k: [(g["impls"].get(k) or {}).get("pct_copy_bw") for g in groups] for k in kinds}
        _bars(ax, [f"{_shape_label(g)} {g['mode']}" for g in groups], series, suite, "% of copy bandwidth",
              _suite_absent(run, suite) or "no % of copy bandwidth (ceilings not measured)")  # fmt: skip
    groups = attention_groups(run)
    kinds = _impl_kinds(groups)
    series = {k: [g["impls"][k].get("pct_matmul") if k in g["impls"] else None for g in groups] for k in kinds}
    _bars(axes.flat[5], [f"B{g['B']} H{g['H']} T{g['T']} hd{g['Dh']} {g['mode']}" for g in groups], series, "attention", "% of bf16 matmul rate",
          _suite_absent(run, "attention") or "no % of matmul rate (ceilings not measured)")  # fmt: skip
    save(fig, "roofline.png", "% of the measured roofline per kernel and implementation")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), squeeze=False)
    for ax, (task, match, title) in zip(axes[0], (("train", {}, "training"), ("sample", {"sampler": "ddpm"}, "250-step DDPM sampling, CFG"))):
        rows = rows_of(run, "end_to_end", task=task, **match)
        cases = list(dict.fromkeys(f"{r['model']} {r['resolution']}" for r in rows))
        series = {
            E2E_LABELS[impl]: [next((r.get("img_per_s") for r in rows if r["impl"] == impl and f"{r['model']} {r['resolution']}" == c), None) for c in cases]
            for impl in E2E_LABELS
        }  # fmt: skip
        _bars(ax, cases, series, f"{title}: images/s", "images/s", _suite_absent(run, "end_to_end") or "no rows")
    save(fig, "end_to_end.png", "images/s per model and implementation (bf16 autocast)")
    return paths


def _speedup(g, base):
    fd, other = best_fastdit(g["impls"]), g["impls"].get(base)
    return ratio(other["ms"], fd["ms"]) if fd and measured(other) else None


def _shape_label(g):
    if g.get("D") is not None and g.get("tokens") is not None:
        return f"D{g['D']} {g['tokens']}t {g.get('dtype') or ''}".strip()
    return f"{g['case']} {g.get('dtype') or ''}".strip()


def _bars(ax, labels, series, title, ylabel, empty_reason, baseline=None):
    """Grouped bars: one group per label, one bar per series (None values leave a gap)."""
    colors = {name: f"C{i}" for i, name in enumerate(series)}  # an implementation keeps its colour
    series = {k: v for k, v in series.items() if any(x is not None for x in v)}
    ax.set_title(title, fontsize=9)
    if not labels or not series:
        text = "no data:\n" + textwrap.fill(empty_reason, 45)
        ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width, label=name, color=colors[name])
    if baseline is not None:
        ax.axhline(baseline, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7)


# --------------------------------------------------------------------------------------------
# Building a report, and the index of reports


def build(out_dir):
    """Write report.md, results.json and plots/*.png into out_dir from out_dir/raw; return results."""
    out_dir = Path(out_dir)
    run = load_run(out_dir)
    h, missing, sources = headline(run)
    results = {
        "headline": h,
        "missing": missing,
        "headline_sources": sources,
        "units": {"ms": "milliseconds", "mfu": "% of the measured bf16 matmul rate", "pct_copy_bw": "% of the measured copy bandwidth",
                  "peak_mem_gib": "GiB (torch.cuda.max_memory_allocated)", "img_per_s": "images per second per GPU"},  # fmt: skip
        "mode": run["run"].get("mode"),
        "run": run["run"],
        "environment": run["environment"],
        "ceilings": run["ceilings"],
        "suites": {n: {k: v for k, v in s.items() if k != "rows"} for n, s in run["suites"].items()},
        "rows": [r for s in run["suites"].values() for r in s["rows"]],
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plots = render_plots(run, out_dir / "plots")
    (out_dir / "report.md").write_text(render_markdown(run, results, plots))
    return results


def gpu_reports(reports_dir=REPORTS_DIR):
    """[(slug, results)] of the committed GPU reports (smoke runs excluded), newest first."""
    out = []
    for path in Path(reports_dir).glob("*/results.json"):
        res = _read_json(path)
        if res and res.get("mode") != "smoke" and res.get("headline", {}).get("gpu"):
            out.append((path.parent.name, res))
    return sorted(out, key=lambda sr: (sr[1]["environment"].get("time_utc") or sr[1]["headline"].get("date") or ""), reverse=True)


RUN_IT = "On a machine with an NVIDIA GPU: `python -m benchmarks --quick` (under 8 minutes on an H100) or `python -m benchmarks` (every shape, resumable with `--resume`)."


def readme_section(reports_dir=REPORTS_DIR, link_base="benchmarks/reports"):
    """README.md's benchmark section: the newest GPU report's headline, its GPU and date, a link."""
    reports = gpu_reports(reports_dir)
    lines = ["## Benchmarks\n"]
    if not reports:
        lines += [
            "No GPU benchmark report yet: so far the benchmark suites have only run in smoke mode on CPU, "
            "which proves they work but measures nothing. " + RUN_IT + f" Reports are indexed in [{link_base}]({link_base}/README.md).",
        ]  # fmt: skip
        return "\n".join(lines) + "\n"
    slug, res = reports[0]
    h, t, s, a = res["headline"], res["headline"]["train"], res["headline"]["sample"], res["headline"]["attention"]
    lines += [
        f"Measured on **one {h['gpu']}** on **{h['date']}** (fastdit commit `{str(h.get('commit'))[:12]}`, {res.get('mode')} run); "
        f"full report: [{link_base}/{slug}/report.md]({link_base}/{slug}/report.md). Other GPUs will differ.\n",
        table(
            ["", "fastdit", "× torch.compile(reference)", "× reference eager"],
            [
                (f"{t['model']} {t['resolution']}² training, batch {fmt(t['batch_per_gpu'])}", f"{fmt(t['img_per_s'])} img/s, {fmt(t['mfu'])} % MFU", t["speedup_vs_compile"], t["speedup_vs_eager"]),
                ("peak training memory (fastdit / eager)", fmt(t["peak_mem_ratio_vs_eager"]), "", ""),
                (f"{s['model']} {s['steps']}-step DDPM sampling, CFG 4", f"{fmt(s['img_per_s'])} img/s", s["speedup_vs_compile"], ""),
                ("attention, 256 tokens, head dim 72", f"{fmt(a['T256_hd72_tflops'])} TFLOP/s", "", ""),
            ],
        ),  # fmt: skip
        f"\nCeilings measured in the same run: copy {fmt(h['copy_bandwidth_gbs'])} GB/s, bf16 matmul {fmt(h['bf16_matmul_tflops'])} TFLOP/s. "
        f"All reports: [{link_base}/README.md]({link_base}/README.md).",
    ]
    return "\n".join(lines) + "\n"


def render_index(reports_dir=REPORTS_DIR):
    """benchmarks/reports/README.md: one line per GPU report, newest first."""
    reports = gpu_reports(reports_dir)
    md = [
        "# Benchmark reports\n",
        "One folder per GPU model (`h100-sxm`, `h100-pcie`, `h200`, ...), each written by one run of "
        "`python -m benchmarks` on that GPU: `report.md` (tables, targets, per-op profile), `results.json` "
        "(every number, the environment and the `headline` block of BENCHMARKING.md) and `plots/`. "
        "This index is regenerated by every GPU run (`benchmarks.report.render_index`).\n",
    ]
    if not reports:
        md.append("**No GPU report exists yet.** The suites have only run in smoke mode on CPU (CI), which checks "
                  "that they and the report builder work, not how fast anything is. " + RUN_IT + "\n")  # fmt: skip
        return "\n".join(md)
    rows = []
    for slug, res in reports:
        h = res["headline"]
        rows.append((f"[{slug}]({slug}/report.md)", h["gpu"], h["date"], str(h.get("commit"))[:12], res.get("mode"),
                     h["train"]["img_per_s"], h["train"]["speedup_vs_compile"], h["sample"]["img_per_s"], h["sample"]["speedup_vs_compile"]))  # fmt: skip
    md.append(table(["report", "GPU", "date", "commit", "mode", "XL/2 train img/s", "× compile", "XL/2 sample img/s", "× compile"], rows))
    return "\n".join(md) + "\n"


def gpu_slug(name):
    """A report folder name for a GPU: 'NVIDIA H100 80GB HBM3' -> 'h100-sxm', 'NVIDIA H100 PCIe' ->
    'h100-pcie', 'NVIDIA H200' -> 'h200'; others: the lower-cased name without the vendor."""
    low = name.lower()
    for chip in ("h100", "h200", "h800", "h20", "b200"):
        if re.search(rf"\b{chip}\b", low):
            for form in ("pcie", "nvl"):
                if form in low:
                    return f"{chip}-{form}"
            return f"{chip}-sxm" if chip in ("h100", "h800") else chip
    low = re.sub(r"^(nvidia|amd)\s+", "", low)
    return re.sub(r"[^a-z0-9]+", "-", low).strip("-") or "unknown-gpu"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", nargs="?", help="a run's folder (with raw/) to rebuild the report of")
    parser.add_argument("--readme", action="store_true", help="print README.md's benchmark section")
    parser.add_argument("--index", action="store_true", help="rewrite benchmarks/reports/README.md")
    args = parser.parse_args(argv)
    if args.readme:
        print(readme_section(), end="")
    if args.index:
        (REPORTS_DIR / "README.md").write_text(render_index())
    if args.dir:
        build(args.dir)
        print(Path(args.dir) / "report.md")
    if not (args.readme or args.index or args.dir):
        parser.error("give a run folder, --readme or --index")


if __name__ == "__main__":
    main()
