"""The steps of `python -m benchmarks`, each a child process under a deadline, with the report
rewritten after every step (a run killed at any point keeps what finished).

Steps, in order (the device check runs all of them; a plain run the environment and the suites):
  environment  GPU, driver, versions, commit and the two ceilings (benchmarks/environment.py)
  native       the native CUDA kernels built from this checkout's kernels/ (kernels/build.py) unless
               fastdit/_native's library is newer than every source: once, before the tests and
               suites that run them (a GPU machine gets the working tree without the ignored build)
  compile      every Triton kernel variant the later steps launch, compiled up front by a pool of
               processes into Triton's on-disk cache (benchmarks/precompile.py); GPU only
  tests        the `gpu`-marked tests, compiled on the GPU: pytest -m gpu tests
  kernels      the five fused-kernel suites in one process, every suite's headline case first
  attention, end_to_end, and any other benchmarks/bench_<name>.py: one process each
then the report: report.md, results.json, run.log and plots/ (benchmarks/report/).

A time budget is split into deadlines: each step gets its share of the time still left (a step
that finishes early leaves its time to the next), every case checks its deadline before it starts
and records itself as skipped when it would not fit, and a step still running past its deadline
is stopped; its finished cases are kept and the rest are listed as not reached.
"""

import dataclasses
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from benchmarks import report
from benchmarks.report.markdown import fmt

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
NATIVE_BUILD = REPO / "kernels" / "build.py"
NATIVE = SimpleNamespace(**runpy.run_path(str(NATIVE_BUILD)))  # plain Python, outside the package
DEVICE_CHECK_BUDGET_S = 540
REPORT_RESERVE_S = 15  # of the budget, kept for the final report and plots
GRACE_S = 10  # past its deadline before a step is stopped (its cases stop themselves at the deadline)
ENVIRONMENT_TIMEOUT_S = 120
FULL_TEST_TIMEOUT_S = 3600  # per benchmark case in a run without a budget (compiling XL/2 at 512² is slow)
# Shares of the budget (the environment takes what it needs first). The end-to-end suite compiles
# DiT-XL/2 twice: it gets the most. The native build's share is a cap (it takes seconds, or none
# when up to date): killed half-way it would leave the cuda tests and rows unmeasured.
SHARES = {"native": 0.12, "compile": 0.08, "tests": 0.22, "kernels": 0.13, "attention": 0.13, "end_to_end": 0.44}
OTHER_SUITE_SHARE = 0.05
TEST_WORKERS = 8  # pytest-xdist processes for the GPU tests, where installed: their compiles overlap
OUTPUTS = ("report.md", report.RESULTS, "run.log", report.PLOTS_DIR)  # everything a run writes in its folder
BENCH_ENV = ("FASTDIT_BENCH_SMOKE", "FASTDIT_BENCH_QUICK", "FASTDIT_BENCH_DEADLINE", "FASTDIT_BENCH_CEILINGS", "FASTDIT_BENCH_JSON",
             "FASTDIT_TEST_LOG")  # fmt: skip


@dataclasses.dataclass
class Step:
    name: str
    kind: str  # environment | native | compile | tests | suites
    suites: tuple = ()  # the suites a `suites` step runs

    @property
    def share(self):
        return SHARES.get(self.name, OTHER_SUITE_SHARE)


def discover():
    """Suite names (bench_<name>.py), kernels first, then attention, the others, end_to_end last."""
    names = sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))
    first = [n for n in (*report.KERNELS, "attention") if n in names]
    last = [n for n in names if n == "end_to_end"]
    return first + [n for n in names if n not in first and n not in last] + last


def plan(suites, device_check, gpu):
    """The steps of a run over `suites` (in discover()'s order)."""
    steps = [Step("environment", "environment")]
    if device_check:
        steps += [Step("native", "native")]
        steps += [Step("compile", "compile")] if gpu else []
        steps += [Step("tests", "tests")]
    kernels = tuple(s for s in suites if s in report.KERNELS)
    steps += [Step("kernels", "suites", kernels)] if kernels else []
    steps += [Step(s, "suites", (s,)) for s in suites if s not in report.KERNELS]
    return steps


class Run:
    """One run: its folder, its recorded data (results.json's recorded parts) and its clock."""

    def __init__(self, out, mode, device_check, budget, command, previous=None):
        self.out, self.mode, self.device_check = out, mode, device_check
        self.t0 = time.time()
        self.end = self.t0 + budget - REPORT_RESERVE_S if budget else None
        self.scratch = Path(tempfile.mkdtemp(prefix="fastdit-bench-"))
        self.recorded = previous or {"rows": [], "suites": {}}
        self.recorded["run"] = {"mode": mode, "quick": device_check, "command": command, "started": self.t0,
                                "budget_s": budget, "steps": []}  # fmt: skip

    def deadline(self, step, remaining):
        """Unix time `step` should finish by: its share of the time left (None without a budget)."""
        if self.end is None:
            return None
        weights = [s.share for s in remaining]
        return time.time() + max(0.0, self.end - time.time()) * step.share / sum(weights)

    def child_env(self, **extra):
        env = {k: v for k, v in os.environ.items() if k not in BENCH_ENV}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        if self.mode == "smoke":
            env["FASTDIT_BENCH_SMOKE"] = "1"
        else:
            env.pop("TRITON_INTERPRET", None)  # on the GPU the kernels run compiled, never interpreted
        if self.device_check:
            env["FASTDIT_BENCH_QUICK"] = "1"
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run_child(self, name, cmd, env, kill_at):
        """Run cmd in its own process group until it exits or kill_at; (returncode or 'stopped', seconds, log)."""
        log = self.scratch / f"{name}.log"
        t0 = time.time()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=None if kill_at is None else max(1.0, kill_at - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the step and any worker it started
                proc.wait()
                rc = "stopped"
        with open(self.out / "run.log", "a") as f:
            f.write(f"\n===== {name}: {' '.join(map(str, cmd))} (exit {rc}, {time.time() - t0:.0f} s)\n")
            f.write(log.read_text(errors="replace"))
        return rc, time.time() - t0, log

    def record_step(self, step, status, seconds, summary="", **extra):
        info = {"name": step.name, "status": status, "seconds": round(seconds, 1), "summary": summary, **extra}
        steps = self.recorded["run"]["steps"]
        steps[:] = [s for s in steps if s["name"] != step.name] + [info]
        self.save()
        return info

    def save(self, with_plots=False):
        return report.save(self.out, self.recorded, with_plots)


def status_of(rc, stopped_reason="stopped at its deadline"):
    return {0: "ok", 1: "failures", 5: "nothing collected", "stopped": stopped_reason}.get(rc, f"exit {rc}")


def last_pytest_line(log):
    found = re.findall(
        r"^=*\s*(\d+ (?:passed|failed|error|skipped|deselected)[^=\n]*?)\s*=*$",
        Path(log).read_text(errors="replace"),
        re.MULTILINE,
    )
    return found[-1] if found else ""


# --------------------------------------------------------------------------------------------
# The steps


def run_environment(run, step):
    path = run.scratch / "environment.json"
    rc, seconds, log = run.run_child(step.name, [sys.executable, "-m", "benchmarks.environment", str(path)], run.child_env(),
                                     time.time() + ENVIRONMENT_TIMEOUT_S)  # fmt: skip
    if rc != 0:
        sys.exit(f"measuring the environment and ceilings failed ({status_of(rc)}); {log}:\n{log.read_text()[-3000:]}")
    data = json.loads(path.read_text())
    run.recorded.update(environment=data["environment"], ceilings=data["ceilings"])
    c = data["ceilings"]
    summary = (f"{data['environment'].get('gpu') or 'no GPU (CPU)'}; copy {fmt(c.get('copy_bandwidth_gbs'))} GB/s, "
               f"bf16 matmul {fmt(c.get('bf16_matmul_tflops'))} TFLOP/s")  # fmt: skip
    return run.record_step(step, "ok", seconds, summary)


def run_native(run, step, deadline):
    """The native kernels of this checkout, built once here (the tests' xdist workers and the
    suites then load fastdit/_native's library), unless up to date or FASTDIT_NATIVE_LIB names one."""
    lib = NATIVE.PACKAGE_DIR / NATIVE.LIB_NAME
    if os.environ.get("FASTDIT_NATIVE_LIB"):
        return run.record_step(step, "ok", 0.0, f"FASTDIT_NATIVE_LIB={os.environ['FASTDIT_NATIVE_LIB']} (not rebuilt)")
    if NATIVE.up_to_date(lib):
        return run.record_step(step, "ok", 0.0, f"{lib.relative_to(REPO)} is newer than every kernel source")
    unbuilt = "the cuda backend's tests and benchmark rows say not built"
    try:
        tools, why = NATIVE.decide()
    except NATIVE.BuildError as exc:
        tools, why = None, str(exc)
    if tools is None:
        return run.record_step(step, f"skipped: {why}", 0.0, unbuilt)
    cmd = [sys.executable, str(NATIVE_BUILD)]
    rc, seconds, _ = run.run_child(step.name, cmd, run.child_env(), _kill_at(run, deadline))
    summary = f"built {lib.relative_to(REPO)} with CMake" if rc == 0 else f"{unbuilt} (see run.log)"
    return run.record_step(step, status_of(rc), seconds, summary)


def run_compile(run, step, deadline):
    path = run.scratch / "compile.json"
    cmd = [sys.executable, "-m", "benchmarks.precompile", "--json", str(path), "--workers", str(os.cpu_count() or 1)]
    rc, seconds, log = run.run_child(
        step.name, cmd, run.child_env(FASTDIT_BENCH_DEADLINE=deadline or ""), _kill_at(run, deadline)
    )
    info = report.read_json(path) or {"status": f"{status_of(rc)}: no compile times recorded (see run.log)"}
    run.recorded["compile"] = info
    summary = (f"{sum(k['variants'] for k in info.get('kernels', {}).values())} kernel variants in {fmt(info.get('wall_s'))} s "
               f"on {info.get('workers')} processes" + (f", {len(info['errors'])} failed" if info.get("errors") else ""))  # fmt: skip
    return run.record_step(step, status_of(rc) if not info.get("errors") else "failures", seconds, summary)


def run_tests(run, step, deadline):
    log_path = run.scratch / "tests.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "tests",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "benchmarks.test_outcomes",
        "-rfE",
    ]
    if run.mode != "smoke" and _installed("xdist"):
        cmd += ["-n", str(TEST_WORKERS)]
    if deadline is not None:
        cmd.append(f"--timeout={max(10, int(deadline - time.time()))}")
    env = run.child_env(FASTDIT_TEST_LOG=log_path, FASTDIT_BENCH_DEADLINE=deadline or "")
    rc, seconds, log = run.run_child(step.name, cmd, env, _kill_at(run, deadline))
    records = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    collected = list(dict.fromkeys(t for r in records for t in r.get("collected", [])))
    results = [r for r in records if "test" in r]
    status = status_of(rc, "stopped at its deadline")
    ran = {r["test"] for r in results}
    run.recorded["tests"] = {
        "command": "python -m pytest -m gpu tests" + (f" -n {TEST_WORKERS}" if "-n" in cmd else ""),
        "status": status, "seconds": round(seconds, 1), "results": results,
        "not_reached": [t for t in collected if t not in ran],
    }  # fmt: skip
    return run.record_step(
        step, status, seconds, last_pytest_line(log) or f"{len(results)} of {len(collected)} tests reported"
    )


def run_suites(run, step, deadline):
    path = run.scratch / f"{step.name}.json"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:benchmark"]
    cmd += [f"benchmarks/bench_{s}.py" for s in step.suites]
    if deadline is None and run.mode == "full":
        cmd.append(f"--timeout={FULL_TEST_TIMEOUT_S}")
    env = run.child_env(
        FASTDIT_BENCH_JSON=path,
        FASTDIT_BENCH_DEADLINE=deadline or "",
        FASTDIT_BENCH_CEILINGS=json.dumps(run.recorded["ceilings"]),
    )
    rc, seconds, log = run.run_child(step.name, cmd, env, _kill_at(run, deadline))
    data = report.read_json(path) or {}
    status = status_of(rc)
    rows = [{**r, "step": step.name} for r in data.get("rows", [])]
    run.recorded["rows"] = [r for r in run.recorded["rows"] if r.get("step") != step.name] + rows
    finished = set(data.get("finished", []))
    for suite in step.suites:
        planned = [c for c in data.get("planned", []) if c.startswith(f"benchmarks/bench_{suite}.py::")]
        run.recorded["suites"][suite] = {
            "step": step.name, "status": status, "complete": bool(data.get("complete")),
            "not_reached": [c.partition("::")[2] for c in planned if c not in finished],
        }  # fmt: skip
    summary = f"{len(rows)} rows; " + (last_pytest_line(log) or "no pytest summary")
    info = run.record_step(step, status, seconds, summary)
    if rc not in (0, "stopped"):
        failures = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith(("FAILED", "ERROR"))]
        print("".join(f"    {ln}\n" for ln in failures[:20]) + f"    (full log: {run.out / 'run.log'})", flush=True)
    return info


def _kill_at(run, deadline):
    if deadline is None:
        return None
    return min(deadline + GRACE_S, run.end) if run.end else deadline + GRACE_S


def _installed(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


STEPS = {"environment": run_environment, "native": run_native, "compile": run_compile, "tests": run_tests,
         "suites": run_suites}  # fmt: skip


# --------------------------------------------------------------------------------------------
# The whole run


def execute(out, mode, device_check, budget, suites, command, resume=False):
    """Run every step into `out`; (results, exit status)."""
    out.mkdir(parents=True, exist_ok=True)
    previous = report.read_json(out / report.RESULTS) if resume else None
    if not resume:
        for name in OUTPUTS:
            shutil.rmtree(out / name, ignore_errors=True) if (out / name).is_dir() else (out / name).unlink(
                missing_ok=True
            )
    kept = {s["name"] for s in (previous or {}).get("run", {}).get("steps", []) if s["status"] == "ok"}
    recorded = {k: v for k, v in (previous or {}).items() if k in report.RECORDED} or None
    run = Run(out, mode, device_check, budget, command, recorded)
    steps = plan(suites, device_check, gpu=mode != "smoke")
    for prior in (previous or {}).get("run", {}).get("steps", []):
        if prior["name"] in kept and prior["name"] != "environment":
            run.recorded["run"]["steps"].append(prior)
    todo = [s for s in steps if s.name not in kept or s.kind == "environment" and "ceilings" not in run.recorded]
    print(f"fastdit benchmarks ({mode} mode{', device check' if device_check else ''}"
          f"{f', budget {budget:.0f} s' if budget else ''}) into {out}", flush=True)  # fmt: skip
    for i, step in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] {step.name} ...", end=" ", flush=True)
        if step.kind == "environment":
            info = run_environment(run, step)
        elif run.end is not None and time.time() >= run.end:
            info = run.record_step(step, "skipped: the time budget ran out before this step", 0.0)
            for suite in step.suites:
                run.recorded["suites"][suite] = {
                    "step": step.name,
                    "status": info["status"],
                    "complete": False,
                    "not_reached": [],
                }
        else:
            info = STEPS[step.kind](run, step, run.deadline(step, [s for s in todo[i:] if s.kind != "environment"]))
        print(f"{info['status']}, {info['seconds']:.0f} s: {info['summary']}", flush=True)
        for name, k in (run.recorded.get("compile") or {}).get("kernels", {}).items() if step.kind == "compile" else ():
            print(f"    {name:44} {k['variants']:3d} variants  {k['seconds']:7.1f} s compiling (sum)", flush=True)
    run.recorded["run"]["finished"] = time.time()
    results = run.save(with_plots=True)
    shutil.rmtree(run.scratch, ignore_errors=True)
    failed = [
        s["name"]
        for s in run.recorded["run"]["steps"]
        if s["status"] in ("failures",) or s["status"].startswith("exit")
    ]
    return results, (1 if failed else 0), time.time() - run.t0


def print_summary(results, out, seconds):
    """The compact table printed last: each step, the headline, what was skipped, where the report is."""
    steps = results["run"]["steps"]
    width = max(len(s["name"]) for s in steps)
    print(f"\n{'step':{width}}  {'status':30} {'s':>5}  result")
    for s in steps:
        print(f"{s['name']:{width}}  {s['status'][:30]:30} {s['seconds']:5.0f}  {s.get('summary') or ''}")
    h = results["headline"]
    t, sm, a = h["train"], h["sample"], h["attention"]
    print(f"\nheadline ({results['mode']} mode): {t['model']} {t['resolution']}² training {fmt(t['img_per_s'])} img/s, "
          f"MFU {fmt(t['mfu'])} %, × compile(reference) {fmt(t['speedup_vs_compile'])}, memory × eager {fmt(t['peak_mem_ratio_vs_eager'])}; "
          f"{sm['model']} {sm['steps']}-step sampling {fmt(sm['img_per_s'])} img/s, × compile(reference) {fmt(sm['speedup_vs_compile'])}; "
          f"attention T=256 hd72 {fmt(a['T256_hd72_tflops'])} TFLOP/s, × best other {fmt(a['T256_hd72_vs_best_other'])}")  # fmt: skip
    skipped = report.load.skipped_work(report.load_run(out))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    print(f"skipped: {sum(map(len, skipped.values()))} items ({'; '.join(skipped) or 'none'}); "
          f"{len(results['missing'])} headline numbers not measured (reasons in report.md)")  # fmt: skip
    print(f"report: {out / 'report.md'}  ({len(files)} files: {', '.join(files)})  [{seconds:.0f} s]")
