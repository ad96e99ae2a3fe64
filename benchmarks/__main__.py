"""python -m benchmarks: the per-GPU report, from the benchmark suites (and, for a GPU session, the
GPU tests) in one command.

    python -m benchmarks --device-check [--budget S] [--out DIR]
        What a session with a GPU runs: environment and ceilings, every Triton kernel variant
        compiled up front in parallel, the `gpu`-marked tests compiled on the GPU, each suite's
        headline cases first and more while time lasts, and the report, all inside the budget
        (default 540 s). Writes report.md, results.json, run.log and plots/ (at most 8 files)
        as it goes. On a CPU it runs the same steps in smoke mode (CI).
    python -m benchmarks [--only SUITES] [--resume] [--budget S] [--out DIR]
        Every shape of every suite (no time limit unless --budget); --resume keeps the suites a
        previous run of DIR finished.

DIR defaults to $OUT when that is set, else benchmarks/reports/<gpu-slug>/ on a GPU; smoke runs
(--smoke, or no CUDA GPU) write into a temporary folder or DIR, never into benchmarks/reports/.
Steps and deadlines: benchmarks/runner.py; the report: benchmarks/report/.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

from benchmarks import report, runner

GPU_QUERY_S = 120  # a driver that hangs would otherwise hang the run before its budget starts


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device-check", action="store_true",
                        help=f"a GPU session's one command: tests, headline cases first, report, in --budget (default {runner.DEVICE_CHECK_BUDGET_S} s)")  # fmt: skip
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes, no ceilings: proves everything runs (the default without a GPU)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="report folder (default $OUT, else benchmarks/reports/<gpu-slug>; smoke: a temporary folder)",
    )
    parser.add_argument("--only", help="comma-separated suite names to run, e.g. end_to_end,attention")
    parser.add_argument(
        "--resume", action="store_true", help="keep the steps DIR's previous run finished and run the rest"
    )
    parser.add_argument(
        "--budget",
        type=float,
        help=f"seconds for the whole run (default {runner.DEVICE_CHECK_BUDGET_S} with --device-check, else none)",
    )
    args = parser.parse_args(argv)
    suites = runner.discover()
    if args.only:
        wanted = [s.strip().removeprefix("bench_") for s in args.only.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in suites]
        if unknown:
            parser.error(f"--only: no suite named {', '.join(unknown)} (suites: {', '.join(suites)})")
        suites = [s for s in suites if s in wanted]
    if args.budget is not None and args.budget <= runner.REPORT_RESERVE_S:
        parser.error(f"--budget {args.budget:g}: must exceed the {runner.REPORT_RESERVE_S} s kept for the report")
    args.suites = suites
    return args


def out_dir(args, mode, gpu):
    if args.out:
        out = args.out.resolve()
    elif os.environ.get("OUT"):
        out = Path(os.environ["OUT"]).resolve()
    elif mode == "smoke":
        out = Path(tempfile.mkdtemp(prefix="fastdit-bench-smoke-"))
    else:
        out = report.REPORTS_DIR / report.gpu_slug(gpu)
    if mode == "smoke" and (out == report.REPORTS_DIR or report.REPORTS_DIR in out.parents):
        sys.exit(f"--out {out}: smoke runs never write into {report.REPORTS_DIR}")
    return out


def cuda_gpu():
    """The CUDA GPU's name, asked in a child process (this one never holds GPU memory); None without one."""
    import subprocess

    code = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=GPU_QUERY_S)
    except subprocess.TimeoutExpired:
        sys.exit(f"asking torch for the CUDA GPU took over {GPU_QUERY_S} s: the driver does not answer (nvidia-smi?)")
    return done.stdout.strip() or None


def main(argv=None):
    args = parse_args(argv)
    gpu = None if args.smoke else cuda_gpu()
    mode = "smoke" if gpu is None else "device check" if args.device_check else "full"
    if gpu is None and not args.smoke:
        print("no CUDA GPU here: running in smoke mode (tiny shapes; numbers are not measurements)")
    budget = args.budget or (runner.DEVICE_CHECK_BUDGET_S if args.device_check else None)
    out = out_dir(args, mode, gpu)
    command = " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)])
    results, status, seconds = runner.execute(
        out, mode, args.device_check, budget, args.suites, command, resume=args.resume
    )
    if mode != "smoke" and report.REPORTS_DIR in out.parents:
        (report.REPORTS_DIR / "README.md").write_text(report.render_index())
    runner.print_summary(results, out, seconds)
    return status


if __name__ == "__main__":
    sys.exit(main())
