"""`fastdit ablate`: the DiT paper's block-design ablation (its Figure 5) in miniature.

Trains each design of --blocks (default: all four) with `fastdit train` and one budget: the same data,
model size, steps, batch, learning rate and seed; any `fastdit train` option applies to every run.
Default: the digits job (DiT-Tiny/2 on the embedded 8x8 digits). Writes into the output folder:

    <design>/       each run's folder: checkpoint, samples.png (a row per class), loss.png, metrics.jsonl
    ablation.md     a table: design, parameters, Gflops per forward (the paper's convention), final loss
                    (mean of the last 100 steps), training seconds
    ablation.png    the designs' loss curves (moving averages), on one plot

The paper compares FID-50K over training; fastdit has no FID tool yet, so this compares the training
loss (the diffusion MSE + VLB), which ranks the designs but is not the paper's metric.
"""
import argparse
import time
from pathlib import Path

import torch

from . import _util, train
from ._util import UsageError
from .models import BLOCKS


def add_arguments(p):
    train.add_arguments(p)
    p.add_argument("--blocks", default=",".join(BLOCKS), help=f"comma-separated designs to train (default: all, "
                                                               f"{','.join(BLOCKS)})")


def parse_blocks(text):
    designs = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in designs if b not in BLOCKS]
    if unknown or not designs:
        raise UsageError(f"--blocks must be a comma-separated list of {', '.join(BLOCKS)}; got {text!r}")
    if len(set(designs)) != len(designs):
        raise UsageError(f"--blocks names a design twice: {text!r}")
    return designs


def ablate(args):
    """Train every design of args.blocks with the same options; returns the table's rows (dicts)."""
    designs = parse_blocks(args.blocks)
    if args.resume or args.block:
        raise UsageError("--resume and --block do not apply to ablate: it starts one run per design of --blocks")
    name = args.data.partition(":")[0] if args.data else "digits"
    out = Path(args.out or f"runs/ablate-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    rows = []
    for design in designs:
        run_args = argparse.Namespace(**{**vars(args), "block": design, "out": str(out / design)})
        del run_args.blocks
        result = train.run(run_args)
        rows.append(_row(design, result))
    table = format_table(rows)
    (out / "ablation.md").write_text(table + "\n")
    plot_losses({r["design"]: _util.read_jsonl(Path(r["run"]) / "metrics.jsonl") for r in rows}, out / "ablation.png")
    print(f"\n{table}\n\nwrote {out / 'ablation.md'} and {out / 'ablation.png'}")
    return rows


def _row(design, result):
    from .complexity import flops
    from ._registry import model_from_config

    ckpt = _util.load_plain(result.checkpoint, "checkpoint")
    with torch.device("meta"):
        cost = flops(model_from_config(ckpt["model_config"]))
    return dict(design=design, params=cost.params, gflops=cost.gflops, final_loss=result.final_loss,
                seconds=result.seconds, steps=ckpt["step"], run=result.out, samples=result.grid)


def format_table(rows):
    from .complexity import gflop_text

    lines = ["| block design | parameters | Gflops (paper) | final loss | steps | seconds | samples |",
             "|---|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        lines.append(f"| {r['design']} | {r['params'] / 1e6:.2f}M | {gflop_text(r['gflops'])} | {r['final_loss']:.4f} | "
                     f"{r['steps']} | {r['seconds']:.0f} | {r['design']}/samples.png |")
    return "\n".join(lines)


def plot_losses(records_by_design, path):
    """Each design's training loss, as a moving average over steps (log scale)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for design, records in records_by_design.items():
        steps, loss = _util.loss_series(records)
        if len(loss):
            k = _util.smoothing_window(len(loss))
            ax.plot(steps[k - 1 :], _util.moving_average(loss, k), linewidth=1.6, label=design)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss (MSE + VLB), moving average")
    ax.set_title("block designs, one budget (DiT Figure 5 in miniature)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _util.save_figure(fig, path)
