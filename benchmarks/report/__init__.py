"""The per-GPU report: report.md, results.json (every number, the environment, the headline block
of BENCHMARKING.md) and PNG plots, built from what a run recorded in its folder's results.json.

  load.py      reading a run, and the queries over its rows
  headline.py  the headline block, the targets
  markdown.py  report.md
  plots.py     plots/*.png
  index.py     the committed reports, their index, README's section, adopting a run's folder
  __main__.py  the command line (python -m benchmarks.report)
"""

import json
import os
from pathlib import Path

from benchmarks.report import markdown, plots
from benchmarks.report.headline import headline
from benchmarks.report.index import REPORTS_DIR, adopt, gpu_slug, readme_section, render_index  # noqa: F401 (the package's API)
from benchmarks.report.load import KERNELS, RECORDED, RESULTS, load_run, read_json  # noqa: F401

UNITS = {"ms": "milliseconds", "mfu": "% of the measured bf16 matmul rate", "pct_copy_bw": "% of the measured copy bandwidth",
         "peak_mem_gib": "GiB (torch.cuda.max_memory_allocated)", "img_per_s": "images per second per GPU"}  # fmt: skip
PLOTS_DIR = "plots"


def save(out_dir, recorded, with_plots=False):
    """Write what a run recorded so far (RECORDED's parts) and the report derived from it."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(out_dir) / RESULTS, recorded)
    return build(out_dir, with_plots)


def build(out_dir, with_plots=True):
    """Rewrite results.json's derived parts, report.md and (with_plots) plots/*.png from out_dir's
    results.json; return the results."""
    out_dir = Path(out_dir)
    recorded = {k: v for k, v in (read_json(out_dir / RESULTS) or {}).items() if k in RECORDED}
    run = load_run(out_dir)
    h, missing, sources = headline(run)
    results = {"headline": h, "missing": missing, "headline_sources": sources, "units": UNITS, "mode": run["run"].get("mode"),
               **{k: v for k, v in recorded.items() if k != "rows"}, "rows": recorded.get("rows", [])}  # fmt: skip
    write_json(out_dir / RESULTS, results)
    pngs = plots.render(run, out_dir / PLOTS_DIR) if with_plots else sorted((out_dir / PLOTS_DIR).glob("*.png"))
    write_text(out_dir / "report.md", markdown.render(run, results, pngs))
    return results


def write_json(path, data):
    write_text(path, json.dumps(data, indent=1, default=str))


def write_text(path, text):
    """Replace a file whole: a reader (or a run killed now) never sees half of it."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
