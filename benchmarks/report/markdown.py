"""report.md: the headline, the targets, what was not measured or not run and why, the GPU tests,
the Triton compile times, the environment, every suite's table and the per-op profile."""

import math

from benchmarks.report.headline import target_rows
from benchmarks.report.load import (
    E2E_LABELS,
    FASTDIT_KERNEL_IMPLS,
    KERNELS,
    attention_groups,
    best_fastdit,
    impls_of,
    kernel_groups,
    measured,
    model_label,
    ratio,
    rows_of,
    skipped_work,
    suite_absent,
)  # fmt: skip

SKIPPED_SHOWN = 12  # items listed per reason (the rest counted)


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
    lines += ["| " + " | ".join(fmt(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render(run, results, plots):
    h, missing, sources = results["headline"], results["missing"], results["headline_sources"]
    env, mode = run["environment"], run["run"].get("mode")
    md = [f"# fastdit benchmark report: {env.get('gpu') or 'no GPU (CPU)'}\n"]
    if mode == "smoke":
        md.append("> **SMOKE RUN — not measurements.** Tiny shapes on CPU, stand-in models labelled as such, "
                  "prove that every step and this report run; no number below describes a GPU.\n")  # fmt: skip
    md.append(
        f"Date {env.get('date')} ({env.get('time_utc')}), fastdit commit `{env.get('commit')}`, mode **{mode}**"
        + (f", command `{run['run']['command']}`" if run["run"].get("command") else "")
        + (f", budget {fmt(run['run']['budget_s'])} s" if run["run"].get("budget_s") else "")
        + ".\n"
    )
    if run["run"].get("quick"):
        md.append("Quick mode: each suite's headline case first, then a few representative shapes while the budget "
                  "lasts; sampling times a few steps and extrapolates (rows say so); what did not fit is listed under "
                  "[Skipped](#skipped-and-why).\n")  # fmt: skip
    md += ["## Headline\n", table(["metric", "value"], _headline_rows(h)), ""]
    if sources:
        md += ["Where the headline numbers come from:\n"] + [f"- {k}: {v}" for k, v in sources.items()] + [""]
    targets = target_rows(h, fmt)
    if mode == "smoke":  # tiny shapes on a CPU: nothing to judge against a GPU's targets
        targets = [(*t[:3], "not judged: smoke run" if t[3] != "not measured" else t[3]) for t in targets]
    md += ["## Targets\n", table(["target", "goal", "measured", "verdict"], targets), ""]
    short = [row for row in targets if row[3].startswith(("short", "over"))]
    if short:
        md.append(f"{len(short)} target(s) missed. Where one training step's time goes — {_where_time_goes(run) or 'no profile recorded'} — "
                  "is broken down per op in [Where the time goes](#where-the-time-goes).\n")  # fmt: skip
    if missing:
        md += ["## Numbers not measured, and why\n"] + _missing_lines(missing) + [""]
    md += ["## Skipped, and why\n", _skipped_section(run), ""]
    md += ["## GPU tests\n", _tests_section(run["tests"]), ""]
    md += ["## Triton compile time\n", _compile_section(run["compile"]), ""]
    md += ["## Environment\n", table(["", ""], _env_rows(env, run["ceilings"])), ""]
    for suite in KERNELS:
        md += [f"## Kernel: {suite}\n", suite_absent(run, suite) or _kernel_section(run, suite), ""]
    md += ["## Attention\n", suite_absent(run, "attention") or _attention_section(run), ""]
    for suite in [s for s in run["suites"] if s not in (*KERNELS, "attention", "end_to_end", "profile")]:
        md += [
            f"## Suite: {suite}\n",
            table(["case", "impl", "ms"], [(r.get("case"), r.get("impl"), _ms_cell(r)) for r in rows_of(run, suite)]),
            "",
        ]
    md += ["## End to end\n", suite_absent(run, "end_to_end") or _e2e_sections(run), ""]
    md += [
        "## Where the time goes\n",
        "Per-op breakdown of one training step (torch.profiler; self time per op).\n",
        _profile_section(run),
        "",
    ]
    md += ["## Steps\n", table(["step", "status", "seconds", "result"], _step_rows(run)), ""]
    md += ["## Plots\n"] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    return "\n".join(md)


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
        rows.append(
            (f"{k}: fwd / bwd % of copy bandwidth", f"{fmt(v['fwd_pct_copy_bw'])} / {fmt(v['bwd_pct_copy_bw'])}")
        )
        rows.append(
            (
                f"{k}: fwd / bwd × torch.compile",
                f"{fmt(v['fwd_speedup_vs_compile'])} / {fmt(v['bwd_speedup_vs_compile'])}",
            )
        )
    return rows


def _missing_lines(missing):
    """One line per headline group and reason: `kernels.patchify`: fwd_pct_copy_bw, ... — why."""
    grouped = {}
    for key, why in missing.items():
        group, _, leaf = key.rpartition(".")
        grouped.setdefault((group, why), []).append(leaf)
    return [f"- `{g or 'headline'}`: {', '.join(leaves)} — {why}" for (g, why), leaves in grouped.items()]


def _skipped_section(run):
    skipped = skipped_work(run)
    if not skipped:
        return "Nothing: every step and case ran (alternatives not installed are listed in their tables)."
    lines = []
    for why, items in skipped.items():
        shown = ", ".join(f"`{i}`" for i in items[:SKIPPED_SHOWN])
        more = f" and {len(items) - SKIPPED_SHOWN} more" if len(items) > SKIPPED_SHOWN else ""
        lines.append(f"- {why} ({len(items)}): {shown}{more}")
    return "\n".join(lines)


def _tests_section(tests):
    if not tests:
        return "Not run (the device check runs them: `python -m benchmarks --device-check`)."
    results = tests.get("results", [])
    counts = {o: sum(t["outcome"] == o for t in results) for o in ("passed", "failed", "skipped")}
    head = (f"`{tests.get('command')}`: {tests.get('status')}; {counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['skipped']} skipped, {len(tests.get('not_reached', []))} not reached, in {fmt(tests.get('seconds'))} s.\n")  # fmt: skip
    failed = [(t["test"], (t.get("message") or "")[:300]) for t in results if t["outcome"] == "failed"]
    slowest = sorted((t for t in results if t["outcome"] != "skipped"), key=lambda t: -t.get("seconds", 0))[:5]
    skips = {}
    for t in results:
        if t["outcome"] == "skipped":
            skips[t.get("message") or ""] = skips.get(t.get("message") or "", 0) + 1
    parts = [head]
    if failed:
        parts += ["Failed:\n", table(["test", "message"], failed), ""]
    if skips:
        parts += ["Skipped:\n", table(["reason", "tests"], list(skips.items())), ""]
    if slowest:
        parts += ["Slowest:\n", table(["test", "seconds"], [(t["test"], t.get("seconds")) for t in slowest])]
    return "\n".join(parts)


def _compile_section(info):
    if not info:
        return "Not measured."
    if info.get("status") and not info.get("kernels"):
        return str(info["status"])
    rows = [(k, v["variants"], v["seconds"], v.get("max_seconds")) for k, v in info["kernels"].items()]
    text = (f"Every kernel variant the device check launches, compiled up front by {info.get('workers')} processes "
            f"in {fmt(info.get('wall_s'))} s of wall time ({fmt(info.get('capture_s'))} s to list them); "
            "the later steps load them from Triton's cache.\n\n")  # fmt: skip
    text += table(["kernel", "variants", "compile s (sum)", "slowest s"], rows)
    if info.get("errors"):
        text += "\n\nFailed to compile:\n\n" + table(
            ["kernel", "error"], [(e["kernel"], e["error"][:300]) for e in info["errors"]]
        )
    return text


def _env_rows(env, ceil):
    keys = ("gpu", "driver", "cuda", "cudnn", "torch", "triton", "python", "commit", "commit_source", "date", "gpu_memory_gib", "sm_count",
            "compute_capability", "max_sm_clock_mhz", "max_memory_clock_mhz", "power_limit_w", "cpu")  # fmt: skip
    rows = [(k, env.get(k)) for k in keys if k in env]
    rows += [(f"package {p}", v or "not installed") for p, v in env.get("packages", {}).items()]
    rows += [(k, v) for k, v in ceil.items()]
    return rows


def _step_rows(run):
    return [(s["name"], s.get("status"), s.get("seconds"), s.get("summary")) for s in run["run"].get("steps", [])]


def _ms_cell(row):
    if row is None:
        return None
    if measured(row):
        return f"{fmt(row['ms'])} ± {fmt(row.get('spread_ms'), 2)}"
    return row.get("status") or "—"


def _kernel_section(run, suite):
    """Every implementation's time; each of fastdit's (Triton, native CUDA) with its GB/s and % of
    copy bandwidth; the faster one against eager and compile, and CUDA against Triton."""
    groups = kernel_groups(run, suite)
    kinds = impls_of(groups)
    ours = [k for k in FASTDIT_KERNEL_IMPLS if k in kinds]
    header = ["case", "mode", "dtype"] + [f"{k} ms" for k in kinds]
    header += [h for k in ours for h in (f"{k} GB/s", f"{k} % copy BW")] + ["fastdit × eager", "fastdit × compile"]
    header += ["cuda × triton"] if len(ours) == 2 else []
    rows = []
    for g in groups:
        fd = best_fastdit(g["impls"])
        eager, comp = g["impls"].get("eager"), g["impls"].get("compile")
        cells = [g["case"], g["mode"], g["dtype"]] + [_ms_cell(g["impls"].get(k)) for k in kinds]
        for k in ours:
            r = g["impls"].get(k) if measured(g["impls"].get(k)) else {}
            cells += [r.get("gbs"), r.get("pct_copy_bw")]
        cells += [ratio(r["ms"], fd["ms"]) if fd and measured(r) else None for r in (eager, comp)]
        if len(ours) == 2:
            triton, cuda = (g["impls"].get(k) for k in ours)
            cells.append(ratio(triton["ms"], cuda["ms"]) if measured(triton) and measured(cuda) else None)
        rows.append(cells)
    return table(header, rows)


def _attention_section(run):
    groups = attention_groups(run)
    kinds = impls_of(groups)
    header = (
        ["case", "B", "H", "T", "Dh", "mode", "dtype"]
        + [f"{k} ms" for k in kinds]
        + ["fastdit TFLOP/s", "% matmul", "× best other"]
    )
    rows = []
    for g in groups:
        fd = best_fastdit(g["impls"])
        others = [
            r["tflops"]
            for k, r in g["impls"].items()
            if k not in FASTDIT_KERNEL_IMPLS and measured(r) and r.get("tflops")
        ]
        cells = [g[k] for k in ("case", "B", "H", "T", "Dh", "mode", "dtype")] + [
            _ms_cell(g["impls"].get(k)) for k in kinds
        ]
        cells += [
            fd and fd.get("tflops"),
            fd and fd.get("pct_matmul"),
            ratio(fd.get("tflops"), max(others)) if fd and others else None,
        ]
        rows.append(cells)
    return table(header, rows)


def _e2e_sections(run):
    train = rows_of(run, "end_to_end", task="train")
    sample = rows_of(run, "end_to_end", task="sample")
    out = [
        "### Training step (DiT train.py: diffusion loss, backward, AdamW, EMA; bf16 autocast)\n",
        table(
            ["model", "batch", "implementation", "images/s", "ms/step ± spread", "TFLOP/s", "MFU %", "peak GiB", "first call s", "status"],
            [(model_label(r), r.get("batch"), E2E_LABELS.get(r["impl"], r["impl"]), r.get("img_per_s"),
              _ms_cell(r) if measured(r) else None, r.get("tflops"), r.get("mfu"), r.get("peak_mem_gib"),
              r.get("first_call_s"), r.get("status") or "ok") for r in train],
        ),
        "\n### Sampling with classifier-free guidance (scale 4; batch = conditional images, the model sees twice as many)\n",
        table(
            ["model", "sampler", "steps", "batch", "implementation", "images/s", "s per run", "ms/step", "timed steps", "TFLOP/s", "% matmul", "status"],
            [(model_label(r), r.get("sampler"), r.get("steps"), r.get("batch"), E2E_LABELS.get(r["impl"], r["impl"]),
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
        p = out.setdefault(r["impl"], {"case": model_label(r), "clock": r.get("clock"), "total_ms": r.get("total_ms"),
                                       "batch": r.get("batch"), "categories": {}, "ops": [], "status": r.get("status")})  # fmt: skip
        if r.get("level") == "category":
            p["categories"][r["category"]] = r.get("pct")
        elif r.get("level") == "op" and measured(r):
            p["ops"].append(r)
    return out


def _profile_section(run):
    prof = profile_summary(run)
    if not prof:
        return "No profile recorded (" + (suite_absent(run, "end_to_end") or "the profile jobs did not run") + ")."
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
