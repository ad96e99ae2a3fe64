"""The committed reports: benchmarks/reports/<gpu-slug>/, their index, README's benchmark section,
and adopting a device check's folder as the report of its GPU."""

import re
import shutil
from pathlib import Path

from benchmarks.report.load import RESULTS, read_json
from benchmarks.report.markdown import fmt, table

REPORTS_DIR = Path(__file__).resolve().parents[1] / "reports"
COMMIT_AT_ADOPTION = "filled in by --adopt: the checkout that filed the run (the GPU machine had no git metadata)"
RUN_IT = ("On a machine with an NVIDIA GPU: `python -m benchmarks --device-check` (tests, every suite's headline "
          "cases and the report inside a 540 s budget), then `python -m benchmarks.report --adopt DIR` to file it here.")  # fmt: skip


def gpu_reports(reports_dir=REPORTS_DIR):
    """[(slug, results)] of the committed GPU reports (smoke runs excluded), newest first."""
    out = []
    for path in Path(reports_dir).glob(f"*/{RESULTS}"):
        res = read_json(path)
        if res and res.get("mode") != "smoke" and res.get("headline", {}).get("gpu"):
            out.append((path.parent.name, res))
    return sorted(
        out, key=lambda sr: sr[1]["environment"].get("time_utc") or sr[1]["headline"].get("date") or "", reverse=True
    )


def readme_section(reports_dir=REPORTS_DIR, link_base="benchmarks/reports"):
    """README.md's benchmark numbers: the newest GPU report's headline, its GPU and date, a link."""
    reports = gpu_reports(reports_dir)
    if not reports:
        return ("No GPU benchmark report yet: so far the benchmark suites have only run in smoke mode on CPU, "
                f"which proves they work but measures nothing. {RUN_IT} Reports are indexed in [{link_base}]({link_base}/README.md).\n")  # fmt: skip
    slug, res = reports[0]
    h, t, s, a = res["headline"], res["headline"]["train"], res["headline"]["sample"], res["headline"]["attention"]
    lines = [
        f"Measured on **one {h['gpu']}** on **{h['date']}** (fastdit commit `{str(h.get('commit'))[:12]}`, {res.get('mode')} run); "
        f"full report: [{link_base}/{slug}/report.md]({link_base}/{slug}/report.md). Other GPUs will differ.\n",
        table(
            ["", "fastdit", "× torch.compile(reference)", "× reference eager"],
            [
                (
                    f"{t['model']} {t['resolution']}² training, batch {fmt(t['batch_per_gpu'])}",
                    f"{fmt(t['img_per_s'])} img/s, {fmt(t['mfu'])} % MFU",
                    t["speedup_vs_compile"],
                    t["speedup_vs_eager"],
                ),
                ("peak training memory (fastdit / eager)", fmt(t["peak_mem_ratio_vs_eager"]), "", ""),
                (
                    f"{s['model']} {s['steps']}-step DDPM sampling, CFG 4",
                    f"{fmt(s['img_per_s'])} img/s",
                    s["speedup_vs_compile"],
                    "",
                ),
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
        "One folder per GPU model (`h100-sxm`, `h100-pcie`, `h200`, ...), each the folder one run of "
        "`python -m benchmarks --device-check` wrote on that GPU (at most 8 files): `report.md` (headline, targets, "
        "GPU test results, Triton compile times, every table, what was skipped and why), `results.json` (every number, "
        "the environment and the `headline` block of BENCHMARKING.md), `run.log` and `plots/`. "
        "`python -m benchmarks.report --adopt DIR` files a run's folder here and regenerates this index.\n",
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
    md.append(
        table(
            [
                "report",
                "GPU",
                "date",
                "commit",
                "mode",
                "XL/2 train img/s",
                "× compile",
                "XL/2 sample img/s",
                "× compile",
            ],
            rows,
        )
    )
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


def adopt(run_dir, reports_dir=REPORTS_DIR):
    """Copy a GPU run's report folder to reports_dir/<gpu-slug>/ (replacing that GPU's previous
    report) and regenerate the index; the new folder. Refuses smoke runs and folders without results.
    A run that could not read its commit (a GPU machine gets the working tree without .git) gets
    this checkout's, marked as filled in here."""
    run_dir = Path(run_dir)
    res = read_json(run_dir / RESULTS)
    if res is None:
        raise ValueError(f"--adopt {run_dir}: no readable {RESULTS} (a report folder of python -m benchmarks)")
    gpu = res.get("headline", {}).get("gpu")
    if res.get("mode") == "smoke" or not gpu:
        raise ValueError(f"--adopt {run_dir}: a smoke run on CPU measures nothing; only GPU runs are filed")
    dest = Path(reports_dir) / gpu_slug(gpu)
    if dest.resolve() != run_dir.resolve():
        shutil.rmtree(dest, ignore_errors=True)
        for src in sorted(p for p in run_dir.rglob("*") if p.is_file()):  # contents only: the source may be read-only
            target = dest / src.relative_to(run_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(src.read_bytes())
    if not res.get("environment", {}).get("commit"):
        from benchmarks import report
        from benchmarks.environment import git_commit  # imports torch: only here

        res.setdefault("environment", {}).update(commit=git_commit(), commit_source=COMMIT_AT_ADOPTION)
        report.write_json(dest / RESULTS, res)
        report.build(dest, with_plots=False)
    (Path(reports_dir) / "README.md").write_text(render_index(reports_dir))
    return dest
