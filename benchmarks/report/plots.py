"""The report's PNG plots: always the same three files (a panel without data says why).

kernels.png     fastdit's speed-up over eager and torch.compile per kernel, shape and mode
roofline.png    % of the measured ceiling per kernel (copy bandwidth) and attention (bf16 matmul)
end_to_end.png  images/s per model and implementation, training and sampling
"""

import textwrap
from pathlib import Path

from benchmarks import cases
from benchmarks.report.load import (
    E2E_LABELS,
    KERNELS,
    attention_groups,
    best_fastdit,
    impls_of,
    kernel_groups,
    measured,
    model_label,
    ratio,
    rows_of,
    suite_absent,
)  # fmt: skip

NAMES = ("kernels.png", "roofline.png", "end_to_end.png")


def render(run, plot_dir):
    """Write the plots into plot_dir; their paths."""
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
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)

    fig, axes = plt.subplots(len(KERNELS), 2, figsize=(11, 3.2 * len(KERNELS)), squeeze=False)
    for row, suite in zip(axes, KERNELS):
        for ax, mode in zip(row, ("fwd", "bwd")):
            groups = [g for g in kernel_groups(run, suite) if g["mode"] == mode and best_fastdit(g["impls"])]
            series = {f"× {base}": [_speedup(g, base) for g in groups] for base in ("eager", "compile")}
            _bars(ax, [_shape_label(g) for g in groups], series, f"{suite} {mode}: fastdit speed-up", "speed-up (×)",
                  suite_absent(run, suite) or f"no {mode} rows", baseline=1.0)  # fmt: skip
    save(fig, NAMES[0], "fastdit kernels: speed-up over eager and torch.compile(reference)")

    fig, axes = plt.subplots(2, 3, figsize=(14, 7), squeeze=False)
    for ax, suite in zip(axes.flat, KERNELS):
        groups = kernel_groups(run, suite)
        series = {k: [(g["impls"].get(k) or {}).get("pct_copy_bw") for g in groups] for k in impls_of(groups)}
        _bars(ax, [f"{_shape_label(g)} {g['mode']}" for g in groups], series, suite, "% of copy bandwidth",
              suite_absent(run, suite) or "no % of copy bandwidth (ceilings not measured)")  # fmt: skip
    groups = attention_groups(run)
    series = {
        k: [g["impls"][k].get("pct_matmul") if k in g["impls"] else None for g in groups] for k in impls_of(groups)
    }
    _bars(axes.flat[5], [f"T{g['T']} hd{g['Dh']} {g['mode']}" for g in groups], series, "attention", "% of bf16 matmul rate",
          suite_absent(run, "attention") or "no % of matmul rate (ceilings not measured)")  # fmt: skip
    save(fig, NAMES[1], "% of the measured roofline per kernel and implementation")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), squeeze=False)
    sampling = ("sample", {"sampler": cases.SAMPLER}, f"{cases.SAMPLER_STEPS}-step DDPM sampling, CFG")
    for ax, (task, match, title) in zip(axes[0], (("train", {}, "training"), sampling)):
        rows = rows_of(run, "end_to_end", task=task, **match)
        labels = list(dict.fromkeys(model_label(r) for r in rows))
        series = {
            E2E_LABELS[impl]: [next((r.get("img_per_s") for r in rows if r["impl"] == impl and model_label(r) == c), None) for c in labels]
            for impl in E2E_LABELS
        }  # fmt: skip
        _bars(ax, labels, series, f"{title}: images/s", "images/s", suite_absent(run, "end_to_end") or "no rows")
    save(fig, NAMES[2], "images/s per model and implementation (bf16 autocast)")
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
        ax.text(
            0.5,
            0.5,
            "no data:\n" + textwrap.fill(empty_reason, 45),
            ha="center",
            va="center",
            fontsize=8,
            transform=ax.transAxes,
        )
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
    ax.set_xticklabels([textwrap.fill(label, 28) for label in labels], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7)
