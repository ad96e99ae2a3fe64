"""`fastdit ablate`: the DiT paper's block-design ablation (its Figure 5) in miniature.

Trains each design of --blocks (default: all four) with `fastdit train` and one budget: the same data,
model size, steps, batch, learning rate and seed; any `fastdit train` option applies to every run.
Default: the digits job (DiT-Tiny/2 on the embedded 8x8 digits). Writes into the output folder:

    <design>/       each run's folder: checkpoint, samples.png (a row per class), loss.png, metrics.jsonl
    ablation.md     a table: design, parameters, Gflops per forward (the paper's convention), final loss
                    (mean of the last 100 steps), the last FID, training seconds
    ablation.png    the designs' loss curves (moving averages), and their FID over training

The paper compares FID-50K over training. With --fid-every N --fid-ref REF every run measures FID as it
trains (`fastdit train`'s FID in the loop: --fid-samples EMA samples against REF, e.g. an .npz of real
images); without them the miniature compares the training loss (the diffusion MSE + VLB).
"""

import argparse
import time
from pathlib import Path

import torch

from . import _util, datasets, train
from ._signals import reworded
from ._util import UsageError
from .models import BLOCKS


def add_arguments(p):
    train.add_arguments(p)
    for action in p._actions:  # train's options, as ablate takes them
        if action.dest in ("resume", "block", "results_dir"):
            action.help = argparse.SUPPRESS  # refused below: ablate starts one run per design of --blocks
        elif action.dest == "out":
            action.help = (
                "output folder: a run folder per design, ablation.md, ablation.png; an interrupted ablation "
                "continues when the same command is given it again; default runs/ablate-<data>-<time>"
            )
    p.add_argument(
        "--blocks",
        default=",".join(BLOCKS),
        help=f"comma-separated designs to train (default: all, {','.join(BLOCKS)})",
    )


def parse_blocks(text):
    designs = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in designs if b not in BLOCKS]
    if unknown or not designs:
        raise UsageError(f"--blocks must be a comma-separated list of {', '.join(BLOCKS)}; got {text!r}")
    if len(set(designs)) != len(designs):
        raise UsageError(f"--blocks names a design twice: {text!r}")
    return designs


def data_name(args):
    """What the output folder's name says of the data: digits, mnist, cifar10, or the folder's own name."""
    data = args.data or args.latents
    if data is None:
        return "digits"
    parsed = datasets.parse(data)
    return parsed[0] if parsed else Path(data).expanduser().resolve().name


def ablate(args):
    """Train every design of args.blocks with the same options; returns the table's rows (dicts)."""
    designs = parse_blocks(args.blocks)
    if args.resume or args.block:
        raise UsageError(
            "--resume and --block do not apply to ablate: it runs one design of --blocks after another (an "
            "interrupted ablation continues when the same command is run with its --out)"
        )
    if args.results_dir:
        raise UsageError("--results-dir does not apply to ablate: its runs go into one folder, --out")
    train.dits_data_path(args)
    out = Path(args.out or f"runs/ablate-{data_name(args)}-{time.strftime('%Y%m%d-%H%M%S')}")
    rows = []
    if args.out is None:
        print(f"fastdit ablate: into {out} (if interrupted, the same command with --out {out} continues it)")
    for design in designs:
        run = out / design
        # A run this command began (interrupted, or done) goes on from its last checkpoint, bit-exactly.
        resume = str(run) if any((run / "checkpoints").glob("*.pt")) else None
        run_args = argparse.Namespace(**{**vars(args), "block": design, "out": str(run), "resume": resume})
        del run_args.blocks
        try:
            result = train.run(run_args)
        except KeyboardInterrupt as e:  # instead of train's advice: the ablation goes on, not one run of it
            raise reworded(
                e,
                f"in {design}: the same command with --out {out} keeps the designs done and goes on from "
                f"{design}'s last checkpoint, if it has one",
            ) from None
        rows.append(_row(design, result))
    table = format_table(rows)
    _util.atomic_write(out / "ablation.md", lambda f: f.write((table + "\n").encode()))
    plot_losses({r["design"]: _util.read_jsonl(Path(r["run"]) / "metrics.jsonl") for r in rows}, out / "ablation.png")
    print(f"\n{table}\n\nwrote {out / 'ablation.md'} and {out / 'ablation.png'}")
    return rows


def _row(design, result):
    from ._registry import model_from_config
    from .complexity import flops

    ckpt = _util.load_plain(result.checkpoint, "checkpoint")
    with torch.device("meta"):
        cost = flops(model_from_config(ckpt["model_config"]))
    fids = [r["fid"] for r in _util.read_jsonl(Path(result.out) / "metrics.jsonl") if r.get("event") == "fid"]
    return dict(
        design=design,
        params=cost.params,
        gflops=cost.gflops,
        final_loss=result.final_loss,
        fid=fids[-1] if fids else None,
        seconds=result.run_seconds,
        steps=ckpt["step"],
        run=result.out,
        samples=result.grid,
    )


def format_table(rows):
    from .complexity import gflop_text

    lines = [
        "| block design | parameters | Gflops (paper) | final loss | FID | steps | seconds | samples |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        fid = "not measured" if r["fid"] is None else f"{r['fid']:.2f}"
        lines.append(
            f"| {r['design']} | {r['params'] / 1e6:.2f}M | {gflop_text(r['gflops'])} | {r['final_loss']:.4f} | "
            f"{fid} | {r['steps']} | {r['seconds']:.0f} | {r['design']}/samples.png |"
        )
    return "\n".join(lines)


def plot_losses(records_by_design, path):
    """Each design's training loss, as a moving average over steps (log scale); beside it their FID over
    training where the runs measured it (the paper's Figure 5)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fids = {
        d: [(r["step"], r["fid"]) for r in records if r.get("event") == "fid"]
        for d, records in records_by_design.items()
    }
    measured = any(fids.values())
    fig = Figure(figsize=(12 if measured else 7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if measured else 1, 1)
    if measured:
        fx = fig.add_subplot(1, 2, 2)
        for design, points in fids.items():
            if points:
                fx.plot(*zip(*points), marker="o", label=design)
        fx.set_xlabel("step")
        fx.set_ylabel("FID (EMA samples)")
        fx.set_title("FID over training")
        fx.grid(alpha=0.3)
        fx.legend()
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
