"""One command for the per-GPU report: every benchmark suite, then report.md, results.json, plots.

    python -m benchmarks [--quick] [--smoke] [--out DIR] [--only SUITES] [--resume] [--budget S]

Run from the repository root. Steps:
  1. measure the GPU's ceilings (copy bandwidth, bf16 8192^3 matmul) and record the environment,
     in a child process (benchmarks/environment.py);
  2. run each suite benchmarks/bench_<name>.py in its own pytest process, its rows going to
     DIR/raw/<name>.json (a crash loses at most that suite; --resume skips suites already done);
     kernel suites first, then attention and any others, the end-to-end suite last;
  3. build the report (benchmarks/report.py) and print a summary.

DIR defaults to benchmarks/reports/<gpu-slug>/ (e.g. h100-sxm); smoke runs (--smoke, or no CUDA
GPU) write into a temporary folder or --out, never into benchmarks/reports/. --quick runs each
suite's representative subset of shapes within --budget seconds (default 450, so the whole
command, report included, stays under 8 minutes): every suite gets a deadline, a share of the
time left weighted by SUITE_WEIGHTS, and is stopped at it; the end-to-end suite runs its
headline jobs first and records what did not fit as skipped.
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
SUITE_WEIGHTS = {"end_to_end": 8.0, "attention": 1.5}  # others 1: shares of --quick's budget
QUICK_BUDGET_S = 450
REPORT_RESERVE_S = 30  # of the budget, kept for building the report
GRACE_S = 20  # past its deadline before a suite is killed (it should stop itself earlier)
FULL_TEST_TIMEOUT_S = 3600  # pytest-timeout per test in a full run (compiling XL/2 at 512^2 is slow)


def discover():
    """Suite names (bench_<name>.py) in run order: kernels, attention, the rest, end_to_end."""
    names = sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))
    order = [*report.KERNELS, "attention"]
    first = [n for n in order if n in names]
    last = [n for n in names if n == "end_to_end"]
    return first + [n for n in names if n not in first and n not in last] + last


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="representative shapes, time-budgeted (under 8 minutes on an H100)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, no ceilings: proves everything runs (the default without a GPU)")
    parser.add_argument("--out", type=Path, help="report folder (default benchmarks/reports/<gpu-slug>, smoke: a temporary folder)")
    parser.add_argument("--only", help="comma-separated suite names to run, e.g. end_to_end,attention")
    parser.add_argument("--resume", action="store_true", help="keep DIR's finished suites and run the rest (and --only's)")
    parser.add_argument("--budget", type=float, help=f"seconds for the whole run (default: {QUICK_BUDGET_S} with --quick, else none)")
    args = parser.parse_args(argv)
    suites = discover()
    if args.only:
        wanted = [s.strip().removeprefix("bench_") for s in args.only.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in suites]
        if unknown:
            parser.error(f"--only: no suite named {', '.join(unknown)} (suites: {', '.join(suites)})")
        args.only = wanted
    args.suites = suites
    return args


def child_env(mode, extra=()):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for key in ("FASTDIT_BENCH_SMOKE", "FASTDIT_BENCH_QUICK", "FASTDIT_BENCH_DEADLINE", "FASTDIT_BENCH_CEILINGS", "FASTDIT_BENCH_JSON"):
        env.pop(key, None)
    if mode == "smoke":
        env["FASTDIT_BENCH_SMOKE"] = "1"
    if mode == "quick":
        env["FASTDIT_BENCH_QUICK"] = "1"
    env.update(extra)
    return env


def run_child(cmd, env, log_path, timeout):
    """Run cmd in its own process group with output to log_path; (returncode or 'timeout', seconds)."""
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the suite and any compile workers it started
            proc.wait()
            rc = "timeout"
    return rc, time.time() - t0


def measure_environment(mode, path, log_path):
    """Ceilings + environment (child process) into `path`; the parsed JSON."""
    rc, _ = run_child([sys.executable, "-m", "benchmarks.environment", str(path)], child_env(mode), log_path, timeout=600)
    if rc != 0:
        sys.exit(f"measuring the environment and ceilings failed (exit {rc}); see {log_path}:\n{Path(log_path).read_text()[-3000:]}")
    return json.loads(Path(path).read_text())


def out_dir(args, mode, gpu):
    if args.out:
        out = args.out.resolve()
    elif mode == "smoke":
        out = Path(tempfile.mkdtemp(prefix="fastdit-bench-smoke-"))
    else:
        out = report.REPORTS_DIR / report.gpu_slug(gpu)
    if mode == "smoke" and (out == report.REPORTS_DIR or report.REPORTS_DIR in out.parents):
        sys.exit(f"--out {out}: smoke runs never write into {report.REPORTS_DIR}")
    return out


def suite_done(raw, name, previous):
    data = report._read_json(raw / f"{name}.json") or {}
    return bool(data.get("complete")) and previous.get(name, {}).get("status") == "ok"


def summarise_log(log_path):
    text = Path(log_path).read_text(errors="replace")
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|skipped)[^=\n]*?)\s*=*$", text, re.MULTILINE)
    return found[-1] if found else ""


def status_of(rc):
    return {0: "ok", 1: "failures (see log)", 5: "no tests collected", "timeout": "stopped at its time budget"}.get(rc, f"exit {rc}")


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    scratch = Path(tempfile.mkdtemp(prefix="fastdit-bench-env-"))
    print(f"fastdit benchmarks: measuring the environment and the GPU's ceilings ({mode} mode) ...", flush=True)
    env_data = measure_environment(mode, scratch / "environment.json", scratch / "environment.log")
    gpu = env_data["environment"].get("gpu")
    if gpu is None and mode != "smoke":
        print("no CUDA GPU here: running in smoke mode (tiny shapes; numbers are not measurements)")
        mode = "smoke"
        env_data = measure_environment(mode, scratch / "environment.json", scratch / "environment.log")
    out = out_dir(args, mode, gpu)
    raw, logs = out / "raw", out / "logs"
    previous = (report._read_json(raw / "run.json") or {}).get("suites", {}) if args.resume else {}
    if not args.resume:
        shutil.rmtree(raw, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
    raw.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    if not (args.resume and (raw / "environment.json").exists()):
        shutil.copy(scratch / "environment.json", raw / "environment.json")
    env_data = json.loads((raw / "environment.json").read_text())
    ceilings = env_data["ceilings"]
    print(f"  GPU: {gpu or 'none (CPU)'}; copy bandwidth {report.fmt(ceilings.get('copy_bandwidth_gbs'))} GB/s; "
          f"bf16 matmul {report.fmt(ceilings.get('bf16_matmul_tflops'))} TFLOP/s; report folder {out}", flush=True)  # fmt: skip

    budget = args.budget or (QUICK_BUDGET_S if mode == "quick" else None)
    end = t0 + budget - REPORT_RESERVE_S if budget else None
    done = {s for s in args.suites if s not in (args.only or ()) and suite_done(raw, s, previous)}
    to_run = [s for s in (args.only or args.suites) if s not in done]
    statuses = dict(previous)  # kept for the suites this run does not repeat (--resume)
    command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    run_info = {"mode": mode, "command": command.strip(), "started": t0, "suites": statuses}
    for i, name in enumerate(to_run):
        remaining = to_run[i:]
        extra = {"FASTDIT_BENCH_JSON": str(raw / f"{name}.json"), "FASTDIT_BENCH_CEILINGS": json.dumps(ceilings)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"benchmarks/bench_{name}.py"]
        timeout = None
        if end is not None:
            weights = [SUITE_WEIGHTS.get(s, 1.0) for s in remaining]
            deadline = time.time() + max(0.0, end - time.time()) * weights[0] / sum(weights)
            extra["FASTDIT_BENCH_DEADLINE"] = str(deadline)
            timeout = max(1.0, deadline - time.time() + GRACE_S)
        elif mode == "full":
            cmd.append(f"--timeout={FULL_TEST_TIMEOUT_S}")
        print(f"[{i + 1}/{len(to_run)}] {name} ...", end=" ", flush=True)
        log = logs / f"{name}.log"
        rc, seconds = run_child(cmd, child_env(mode, extra), log, timeout)
        rows = len((report._read_json(raw / f"{name}.json") or {}).get("rows", []))
        statuses[name] = {"status": status_of(rc), "returncode": rc, "duration_s": round(seconds, 1), "summary": summarise_log(log), "log": f"logs/{name}.log"}
        print(f"{statuses[name]['status']}: {rows} rows, {seconds:.0f} s {statuses[name]['summary']}", flush=True)
        if rc != 0:
            failures = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith(("FAILED", "ERROR"))]
            print("".join(f"    {ln}\n" for ln in failures[:20]) + f"    (full log: {log})", flush=True)
        (raw / "run.json").write_text(json.dumps(run_info, indent=1))
    run_info["finished"] = time.time()
    (raw / "run.json").write_text(json.dumps(run_info, indent=1))

    results = report.build(out)
    if mode != "smoke" and report.REPORTS_DIR in out.parents:
        (report.REPORTS_DIR / "README.md").write_text(report.render_index())
    print_summary(results, out, time.time() - t0)
    failed = [n for n, s in statuses.items() if s["status"] != "ok"]
    return 1 if failed else 0


def print_summary(results, out, seconds):
    rows = [(n, s.get("status"), s.get("duration_s"), s.get("summary")) for n, s in results["suites"].items()]
    width = max([len(r[0]) for r in rows] + [5])
    print(f"\n{'suite':{width}}  {'status':28} {'s':>6}  tests")
    for name, status, dur, summary in rows:
        print(f"{name:{width}}  {str(status):28} {report.fmt(dur):>6}  {summary or ''}")
    h = results["headline"]
    t, s = h["train"], h["sample"]
    print(f"\nheadline ({results['mode']} mode): {t['model']} {t['resolution']}² training {report.fmt(t['img_per_s'])} img/s, "
          f"MFU {report.fmt(t['mfu'])} %, × compile(reference) {report.fmt(t['speedup_vs_compile'])}; "
          f"{s['steps']}-step sampling {report.fmt(s['img_per_s'])} img/s, × compile(reference) {report.fmt(s['speedup_vs_compile'])}")  # fmt: skip
    print(f"report: {out / 'report.md'}  ({len(results['missing'])} headline numbers not measured; reasons in the report)  [{seconds:.0f} s]")


if __name__ == "__main__":
    sys.exit(main())
