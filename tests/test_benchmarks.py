"""The benchmark runner and report: the device check in smoke mode (every file, the deadlines, what
was skipped), the headline contract, the report of a synthetic GPU run, the FLOP count, the
README section, the reports index and filing a GPU run's folder."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import __main__ as cli
from benchmarks import cases, harness, kernel_bench, profile_step, report, runner, workloads
from benchmarks import conftest as bench_conftest
from fastdit.models import DiT
from fastdit.reference_model import ReferenceDiT

REPO = Path(__file__).resolve().parents[1]
KERNEL_KEYS = {"fwd_pct_copy_bw", "bwd_pct_copy_bw", "fwd_speedup_vs_compile", "bwd_speedup_vs_compile"}
CONTRACT = {  # BENCHMARKING.md's headline block: key -> nested keys (None: a leaf)
    "gpu": None, "date": None, "commit": None, "copy_bandwidth_gbs": None, "bf16_matmul_tflops": None,
    "kernels": {k: dict.fromkeys(KERNEL_KEYS) for k in report.KERNELS},
    "attention": dict.fromkeys(("T256_hd72_tflops", "T256_hd72_vs_best_other", "hd72_over_hd64_per_flop")),
    "train": dict.fromkeys(("model", "resolution", "batch_per_gpu", "img_per_s", "mfu", "speedup_vs_eager", "speedup_vs_compile", "peak_mem_ratio_vs_eager")),
    "sample": dict.fromkeys(("model", "steps", "img_per_s", "speedup_vs_compile")),
}  # fmt: skip
MAX_FILES, MAX_DEPTH = 8, 2  # what comes back from a GPU session's $OUT
LEGAL_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def leaves(tree, spec, prefix=""):
    """[(dotted key, value)] of `tree`, asserting it has exactly the keys of `spec`."""
    assert set(tree) == set(spec), f"{prefix or 'headline'}: keys {sorted(tree)}, contract {sorted(spec)}"
    out = []
    for key, sub in spec.items():
        path = f"{prefix}{key}"
        out += leaves(tree[key], sub, path + ".") if sub is not None else [(path, tree[key])]
    return out


def assert_valid_pngs(folder, report_md):
    pngs = sorted(Path(folder).glob("*.png"))
    assert [p.name for p in pngs] == sorted(report.plots.NAMES), f"plots in {folder}: {pngs}"
    for png in pngs:
        with Image.open(png) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100, png
        assert f"plots/{png.name}" in report_md, f"{png.name} is not shown in report.md"


def assert_complete_report(out):
    """Every file, within what a GPU session can bring back; every null headline number explained."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= MAX_FILES, f"{len(files)} files: {files}"
    for f in files:
        rel = f.relative_to(out)
        assert len(rel.parts) - 1 <= MAX_DEPTH and all(LEGAL_NAME.match(part) for part in rel.parts), rel
    results = json.loads((out / "results.json").read_text())
    md = (out / "report.md").read_text()
    for key, value in leaves(results["headline"], CONTRACT):
        if value is None:
            group, _, leaf = key.rpartition(".")
            assert key in results["missing"], f"headline {key} is null without a reason"
            assert leaf in md and results["missing"][key] in md, f"the reason for null {key} is not in report.md"
    assert_valid_pngs(out / "plots", md)
    assert "issue" not in md.lower(), "tracker words in the report"
    return results, md


# ---------------------------------------------------------------------------------------------
# The device check, as CI runs it (smoke mode on a CPU)


def run_command(*args):
    cmd = [sys.executable, "-m", "benchmarks", *args]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc.stdout, time.time() - t0


def test_device_check_smoke_writes_a_complete_report(tmp_path):
    out = tmp_path / "report"
    stdout, _ = run_command("--device-check", "--out", str(out))
    results, md = assert_complete_report(out)
    assert results["mode"] == "smoke" and "SMOKE RUN" in md
    targets = md.split("## Targets")[1].split("##")[0]
    assert "not judged: smoke run" in targets and "short by" not in targets and "missed" not in targets
    steps = {s["name"]: s for s in results["run"]["steps"]}
    assert list(steps) == ["environment", "native", "tests", "kernels", "attention", "end_to_end"]
    # the native kernels: built, or up to date, or skipped saying why (no nvcc here)
    native = steps.pop("native")
    assert native["status"] == "ok" or native["status"].startswith("skipped: ") and native["summary"], native
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert set(results["suites"]) == set(runner.discover())
    assert results["tests"]["results"] and all(t["outcome"] == "skipped" for t in results["tests"]["results"])
    # the end-to-end rows reach the headline, and their stand-in models say so wherever they are named
    assert results["headline"]["train"]["img_per_s"] > 0
    assert results["headline"]["train"]["model"] == "DiT-XL/2 (smoke stand-in)"
    assert "stand-in" in stdout.split("\nheadline")[-1] and "| DiT-XL/2 256² stand-in (depth 2" in md
    # every case not timed says why; none is a placeholder with a time
    for row in results["rows"]:
        assert ("ms" not in row) or row["ms"] is not None or row.get("status"), row
    # the summary table comes last
    tail = stdout.strip().splitlines()[-4:]
    assert tail[-1].startswith("report:") and "6 files" in tail[-1] and tail[-3].startswith("headline")

    # --resume keeps every finished step and only rebuilds the report
    stdout, _ = run_command("--device-check", "--out", str(out), "--resume")
    assert " ... " not in stdout, f"--resume re-ran a finished step:\n{stdout}"
    assert json.loads((out / "results.json").read_text())["headline"] == results["headline"]


def test_device_check_keeps_its_budget_and_reports_what_did_not_fit(tmp_path):
    out, budget = tmp_path / "report", 40
    stdout, seconds = run_command("--device-check", "--budget", str(budget), "--out", str(out))
    results, md = assert_complete_report(out)
    # the runner's own start-up and exit are outside its clock: a few seconds of interpreter
    assert seconds <= budget + 10, f"a {budget} s budget took {seconds:.0f} s"
    skipped = report.load.skipped_work(report.load_run(out))
    reasons = " ".join(skipped)
    assert "time budget" in reasons or "not reached" in reasons, skipped
    assert "## Skipped, and why" in md and any(f"({len(items)})" in md for items in skipped.values())
    assert "skipped:" in stdout.strip().splitlines()[-2]


def test_smoke_runs_never_write_into_the_reports_folder():
    args = cli.parse_args(["--smoke", "--out", str(report.REPORTS_DIR / "h100-sxm")])
    with pytest.raises(SystemExit, match="never write"):
        cli.out_dir(args, "smoke", None)


def test_output_folder_defaults_to_OUT(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert cli.out_dir(cli.parse_args(["--device-check"]), "device check", "NVIDIA H200") == tmp_path.resolve()


@pytest.mark.parametrize(
    "argv, message", [(["--only", "nope"], "no suite named nope"), (["--budget", "5"], "must exceed")]
)
def test_bad_arguments_give_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_gpu_query_that_hangs_ends_the_run_with_one_line(monkeypatch):
    monkeypatch.setattr(cli, "GPU_QUERY_S", 0.01)  # far less than importing torch takes
    with pytest.raises(SystemExit, match="the driver does not answer"):
        cli.cuda_gpu()


def test_deadline_shares_flow_to_later_steps():
    run = SimpleNamespace(end=time.time() + 100)
    steps = runner.plan(runner.discover(), device_check=True, gpu=True)[1:]
    first = runner.Run.deadline(run, steps[0], steps)
    assert first - time.time() == pytest.approx(100 * steps[0].share / sum(s.share for s in steps), abs=1)
    last = runner.Run.deadline(run, steps[-1], steps[-1:])
    assert last == pytest.approx(run.end, abs=1)  # the last step gets all that is left


def test_native_step_builds_once_only_when_stale_and_says_why_not(tmp_path, monkeypatch):
    run, step = runner.Run(tmp_path, "device check", True, 100, "test"), runner.Step("native", "native")
    built = []
    monkeypatch.setattr(
        run, "run_child", lambda name, cmd, env, kill_at: built.append((cmd, kill_at)) or (0, 3.0, None)
    )
    monkeypatch.delenv("FASTDIT_NATIVE_LIB", raising=False)
    monkeypatch.setattr(runner.NATIVE, "up_to_date", lambda lib: True)
    assert runner.run_native(run, step, time.time() + 10)["status"] == "ok" and not built
    monkeypatch.setattr(runner.NATIVE, "up_to_date", lambda lib: False)  # stale or missing: built, under the deadline
    monkeypatch.setattr(runner.NATIVE, "decide", lambda: (("nvcc", "cmake"), None))
    assert runner.run_native(run, step, time.time() + 10)["status"] == "ok"
    assert built and built[0][0][-1] == str(runner.NATIVE_BUILD) and built[0][1] <= time.time() + 10 + runner.GRACE_S
    monkeypatch.setattr(runner.NATIVE, "decide", lambda: (None, "nvcc not found (PATH, CUDA_HOME)"))
    info = runner.run_native(run, step, time.time() + 10)  # no nvcc: listed as skipped, with the reason
    assert info["status"] == "skipped: nvcc not found (PATH, CUDA_HOME)" and len(built) == 1
    assert report.load.skipped_work(report.load_run(tmp_path))[info["status"]] == ["step native"]


def test_test_step_plugin_logs_outcomes_and_skips_past_the_deadline(tmp_path):
    (tmp_path / "test_x.py").write_text("def test_a():\n    pass\n\ndef test_b():\n    assert 1 == 2\n")
    log = tmp_path / "log.jsonl"
    env = runner.Run.child_env(
        SimpleNamespace(mode="smoke", device_check=False), FASTDIT_TEST_LOG=log, FASTDIT_BENCH_DEADLINE=""
    )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "benchmarks.test_outcomes",
        str(tmp_path / "test_x.py"),
    ]
    subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=120)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records[0]["collected"]) == 2
    outcomes = {r["test"].split("::")[-1]: r for r in records[1:]}
    assert outcomes["test_a"]["outcome"] == "passed" and outcomes["test_b"]["outcome"] == "failed"
    assert "assert 1 == 2" in outcomes["test_b"]["message"]
    log.unlink()
    env["FASTDIT_BENCH_DEADLINE"] = str(time.time() - 1)
    subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=120)
    records = [json.loads(line) for line in log.read_text().splitlines()][1:]
    assert [r["outcome"] for r in records] == ["skipped", "skipped"] and "time budget" in records[0]["message"]


def test_headline_cases_run_first(monkeypatch):
    monkeypatch.setattr(harness, "SMOKE", False)
    monkeypatch.setattr(harness, "QUICK", True)
    params = kernel_bench.row_cases({"eager": None, "triton": None})
    assert params[0].values[0] == (cases.KERNEL["B"], cases.KERNEL["T"], cases.KERNEL["D"])
    headline = [p for p in params if p.marks]
    assert len(headline) == len(kernel_bench.MODES) * 2 and params[: len(headline)] == headline
    specs = (
        ("a", False, "triton"),
        ("b", True, "compile"),
        ("c", False, "eager"),
        ("d", True, "triton"),
        ("e", True, "eager"),
    )
    items = [SimpleNamespace(name=n, callspec=SimpleNamespace(params={"impl": impl}), get_closest_marker=lambda name, h=h: h or None)
             for n, h, impl in specs]  # fmt: skip
    bench_conftest.pytest_collection_modifyitems(None, None, items)
    assert [i.name for i in items] == ["d", "e", "b", "a", "c"]  # headline first, compiling last among them


# ---------------------------------------------------------------------------------------------
# The report of a (synthetic) GPU run: every headline number from the rows it should come from


def row(suite, case, impl, ms, **extra):
    return {"suite": suite, "smoke": False, "case": case, "impl": impl, "ms": ms, "spread_ms": 0.01, **extra}


def synthetic_run(out, gpu="NVIDIA H100 80GB HBM3", date="2031-01-02", commit="abc123"):
    """A GPU run's results.json: every kernel, attention, end-to-end and profile row the report reads."""
    rows = []
    for k in report.KERNELS:
        for D, tokens in ((1152, 65536), (768, 8192)):
            for mode, scale in (("fwd", 1.0), ("bwd", 2.0)):
                case = f"D{D} T{tokens}"
                shape = dict(mode=mode, dtype="bfloat16", D=D, tokens=tokens)
                rows += [row(k, case, "eager", 4 * scale, **shape), row(k, case, "compile", 2 * scale, **shape)]
                rows.append(row(k, case, "triton", scale, pct_copy_bw=80.0 / scale, gbs=2400.0 / scale, **shape))
                if D == 768:  # the native kernels, twice as fast as Triton here
                    rows.append(row(k, case, "cuda", scale / 2, pct_copy_bw=160.0 / scale, gbs=4800.0 / scale, **shape))
    for Dh, H, tflops in ((72, 16, 300.0), (64, 16, 400.0), (64, 12, 1.0)):
        shape = dict(T=256, Dh=Dh, H=H, B=64, mode="fwd", dtype="bfloat16")
        case = f"B64 H{H} T256 Dh{Dh}"
        rows += [row("attention", case, "triton", 1.0, tflops=tflops, pct_matmul=tflops / 7, **shape),
                 row("attention", case, "flash_attn", 1.5, tflops=tflops / 1.5, **shape),
                 row("attention", case, "sdpa_flash", 1.25, tflops=tflops / 1.25, **shape),
                 {**row("attention", case, "xformers", None, **shape), "status": "not installed"}]  # fmt: skip
    for impl, img_s, mem in (
        ("eager", 100.0, 40.0),
        ("compile", 150.0, 30.0),
        ("fastdit", 160.0, 20.0),
        ("fastdit+compile", 180.0, 22.0),
    ):
        base = dict(model="DiT-XL/2", resolution=256)
        rows.append(
            row(
                "end_to_end",
                "train DiT-XL/2 256",
                impl,
                64e3 / img_s,
                task="train",
                batch=64,
                img_per_s=img_s,
                mfu=img_s / 4,
                peak_mem_gib=mem,
                **base,
            )
        )
        for sampler, steps in workloads.SAMPLERS.items():
            rows.append(row("end_to_end", "sample DiT-XL/2 256", impl, 64e3 / img_s, task="sample", sampler=sampler, steps=steps,
                            timed_steps=10, extrapolated=True, batch=64, img_per_s=img_s / 100, **base))  # fmt: skip
    rows.append(row("end_to_end", "train DiT-B/2 256", "fastdit+compile", None, task="train", model="DiT-B/2", resolution=256,
                    status=harness.OUT_OF_TIME))  # fmt: skip
    for impl in ("eager", "fastdit"):
        p = dict(model="DiT-XL/2", resolution=256, batch=64, clock="device", total_ms=100.0)
        rows.append(
            row("profile", "profile", impl, 70.0, level="op", op="aten::mm", category="GEMM", calls=300, pct=70.0, **p)
        )
        rows += [
            row("profile", "profile", impl, ms, level="category", op=None, category=c, pct=ms, **p)
            for c, ms in (("GEMM", 70.0), ("attention", 30.0))
        ]
    suites = {
        s: {"step": s, "status": "ok", "complete": True, "not_reached": []}
        for s in (*report.KERNELS, "attention", "end_to_end")
    }
    suites["end_to_end"].update(
        status="stopped at its deadline", complete=False, not_reached=["test_end_to_end[sample-DiT-B/2-256-eager]"]
    )
    recorded = {
        "environment": {"gpu": gpu, "date": date, "time_utc": date + "T00:00:00+00:00", "commit": commit, "torch": "2.x"},
        "ceilings": {"copy_bandwidth_gbs": 3000.0, "bf16_matmul_tflops": 700.0},
        "run": {"mode": "device check", "quick": True, "command": "python -m benchmarks --device-check", "budget_s": 540,
                "steps": [{"name": "tests", "status": "failures", "seconds": 90.0, "summary": "1 failed, 1 passed"}]},
        "suites": suites, "rows": rows,
        "tests": {"command": "python -m pytest -m gpu tests", "status": "failures", "seconds": 90.0, "not_reached": ["tests/test_gpu.py::test_late"],
                  "results": [{"test": "tests/test_gpu.py::test_a", "outcome": "passed", "seconds": 3.0, "message": None},
                              {"test": "tests/test_gpu.py::test_b", "outcome": "failed", "seconds": 1.0, "message": "E   AssertionError: dq off"}]},
        "compile": {"wall_s": 20.0, "capture_s": 3.0, "workers": 16, "errors": [],
                    "kernels": {"modulate_layer_norm_fwd_kernel": {"variants": 4, "seconds": 8.0, "max_seconds": 2.5}}},
    }  # fmt: skip
    return report.save(out, recorded, with_plots=True)


def test_report_of_a_gpu_run_computes_the_headline(tmp_path):
    results = synthetic_run(tmp_path)
    h = results["headline"]
    assert leaves(h, CONTRACT)
    assert (h["gpu"], h["date"], h["commit"], h["copy_bandwidth_gbs"]) == (
        "NVIDIA H100 80GB HBM3",
        "2031-01-02",
        "abc123",
        3000.0,
    )
    for k in report.KERNELS:  # the D=1152, 64K-token bf16 case; compile twice as slow as fastdit
        assert h["kernels"][k] == {
            "fwd_pct_copy_bw": 80.0,
            "bwd_pct_copy_bw": 40.0,
            "fwd_speedup_vs_compile": 2.0,
            "bwd_speedup_vs_compile": 2.0,
        }
    assert h["attention"] == {
        "T256_hd72_tflops": 300.0,
        "T256_hd72_vs_best_other": 1.25,
        "hd72_over_hd64_per_flop": 0.75,
    }
    t = h["train"]  # fastdit = the faster of fastdit and torch.compile(fastdit)
    assert (t["model"], t["batch_per_gpu"], t["img_per_s"], t["mfu"]) == ("DiT-XL/2", 64, 180.0, 45.0)
    assert (t["speedup_vs_eager"], t["speedup_vs_compile"], t["peak_mem_ratio_vs_eager"]) == (1.8, 1.2, 22.0 / 40.0)
    assert h["sample"] == {"model": "DiT-XL/2", "steps": 250, "img_per_s": 1.8, "speedup_vs_compile": 1.2}
    assert results["missing"] == {}
    md = (tmp_path / "report.md").read_text()
    assert "| DiT-XL/2 256² training MFU (%) | ≥ 55.0 | 45.0 | short by 10.0" in md  # a missed target: by how much
    assert "Where the time goes" in md and "GEMM 70.0 %" in md  # ... and where the time goes
    assert "xformers ms" in md and "not installed" in md  # a missing alternative is listed, not dropped
    # Triton and the native kernels side by side, each with its bandwidth; and per kernel, its targets
    header = "| case | mode | dtype | eager ms | compile ms | triton ms | cuda ms | triton GB/s | triton % copy BW | cuda GB/s | cuda % copy BW | fastdit × eager | fastdit × compile | cuda × triton |"
    assert header in md
    assert (
        "| D768 T8192 | fwd | bfloat16 | 4.00 ± 0.010 | 2.00 ± 0.010 | 1.00 ± 0.010 | 0.500 ± 0.010 | 2400 | 80.0 | 4800 | 160 | 8.00 | 4.00 | 2.00 |"
        in md
    )
    assert "| modulate_layer_norm backward, % of copy bandwidth | ≥ 80.0 | 40.0 | short by 40.0" in md
    skipped = md.split("## Skipped, and why")[1].split("##")[0]  # what did not fit, with the reason
    assert harness.OUT_OF_TIME in skipped and "train DiT-B/2 256 fastdit+compile" in skipped
    assert "not reached: stopped at its deadline (1): `test_end_to_end[sample-DiT-B/2-256-eager]`" in skipped
    assert "`test tests/test_gpu.py::test_late`" in skipped
    tests = md.split("## GPU tests")[1].split("##")[0]
    assert "1 passed, 1 failed, 0 skipped, 1 not reached" in tests and "dq off" in tests
    assert "| modulate_layer_norm_fwd_kernel | 4 | 8.00 | 2.50 |" in md
    assert_valid_pngs(tmp_path / "plots", md)


def test_headline_falls_back_to_the_closest_kernel_shape_and_says_so(tmp_path):
    rows = [
        row("patchify", "small", impl, ms, mode="fwd", dtype="float32", D=16, tokens=64)
        for impl, ms in (("compile", 3.0), ("triton", 1.0))
    ]
    results = report.save(tmp_path, {"rows": rows, "suites": {"patchify": {"status": "ok"}}})
    assert results["headline"]["kernels"]["patchify"]["fwd_speedup_vs_compile"] == 3.0
    assert "closest shape used" in results["headline_sources"]["kernels.patchify.fwd"]
    assert "no bwd rows" in results["missing"]["kernels.patchify.bwd_pct_copy_bw"]
    assert "not measured in smoke mode" in results["missing"]["kernels.patchify.fwd_pct_copy_bw"]


# ---------------------------------------------------------------------------------------------
# README section, the reports index, filing a run


def test_readme_section_and_index_follow_the_newest_gpu_report(tmp_path):
    assert "No GPU benchmark report yet" in report.readme_section(tmp_path)
    assert "No GPU report exists yet" in report.render_index(tmp_path)
    synthetic_run(tmp_path / "h100-sxm", date="2031-01-02")
    synthetic_run(tmp_path / "h200", gpu="NVIDIA H200", date="2031-02-03")
    section = report.readme_section(tmp_path)
    assert "one NVIDIA H200" in section and "2031-02-03" in section and "(benchmarks/reports/h200/report.md)" in section
    assert "180 img/s, 45.0 % MFU | 1.20 | 1.80 |" in section
    index = report.render_index(tmp_path)
    assert index.index("[h200]") < index.index("[h100-sxm]")


def test_adopt_files_a_gpu_run_under_its_slug_and_refuses_smoke_runs(tmp_path):
    synthetic_run(tmp_path / "out", gpu="NVIDIA H200")
    reports = tmp_path / "reports"
    dest = report.adopt(tmp_path / "out", reports)
    assert dest == reports / "h200" and (dest / "plots" / "kernels.png").is_file()
    assert "[h200](h200/report.md)" in (reports / "README.md").read_text()
    smoke = tmp_path / "smoke"
    report.save(smoke, {"run": {"mode": "smoke"}, "rows": []})
    with pytest.raises(ValueError, match="smoke run"):
        report.adopt(smoke, reports)
    with pytest.raises(ValueError, match="no readable results.json"):
        report.adopt(tmp_path / "nothing", reports)


def test_adopt_fills_in_the_commit_a_gpu_machine_could_not_read(tmp_path):
    # the device tool copies the working tree without .git: the run records no commit
    synthetic_run(tmp_path / "out", gpu="NVIDIA H200", commit=None)
    dest = report.adopt(tmp_path / "out", tmp_path / "reports")
    results = json.loads((dest / "results.json").read_text())
    here = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert here and results["headline"]["commit"].startswith(here)
    assert results["environment"]["commit_source"] == report.index.COMMIT_AT_ADOPTION
    assert report.index.COMMIT_AT_ADOPTION in (dest / "report.md").read_text()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["environment"]["commit"] is None  # source kept


def test_committed_reports_index_is_current():
    committed = (report.REPORTS_DIR / "README.md").read_text()
    assert committed == report.render_index(), "regenerate it: python -m benchmarks.report --index"


@pytest.mark.parametrize(
    "name,slug",
    [("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H100 NVL", "h100-nvl"),
     ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100-sxm4-80gb"), ("NVIDIA GH200 480GB", "gh200-480gb")],
)  # fmt: skip
def test_gpu_slug(name, slug):
    assert report.gpu_slug(name) == slug


# ---------------------------------------------------------------------------------------------
# FLOPs behind MFU, and the harness's mode helpers


@pytest.mark.parametrize("cls", [ReferenceDiT, DiT])
def test_forward_flops_match_torch_flop_counter(cls):
    cfg = {"depth": 2, "hidden_size": 48, "num_heads": 3, "patch_size": 2, "latent": 8}
    model_kwargs = dict(cfg, input_size=cfg.pop("latent"), num_classes=10)
    model = cls(**model_kwargs, **({"math_attention": True} if cls is ReferenceDiT else {})).eval()
    n = 3
    x, t, y = torch.randn(n, 4, 8, 8), torch.randint(0, 1000, (n,)), torch.randint(0, 10, (n,))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    assert counter.get_total_flops() == n * workloads.forward_flops(**cfg, latent=8)


def test_shapes_follow_the_mode(monkeypatch):
    full, quick, smoke = [1, 2, 3], [2], [0]
    for is_smoke, is_quick, expected in ((True, True, smoke), (False, True, quick), (False, False, full)):
        monkeypatch.setattr(harness, "SMOKE", is_smoke)
        monkeypatch.setattr(harness, "QUICK", is_quick)
        assert harness.shapes(full, quick, smoke) == expected


def test_end_to_end_job_records_oom_and_fails_on_errors(monkeypatch):
    from benchmarks import bench_end_to_end

    monkeypatch.setattr(harness, "RESULTS", [])  # keep these rows out of the process's own

    def build(error):
        def fail(*args, **kwargs):
            raise error

        return fail

    monkeypatch.setattr(
        profile_step, "train_step", build(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    )
    row = bench_end_to_end.run_job("train", "DiT-XL/2", 256, 4, 2, "eager")
    assert row["ms"] is None and row["status"] == "out of memory at batch 4"
    monkeypatch.setattr(profile_step, "train_step", build(RuntimeError("kernel exploded")))
    with pytest.raises(pytest.fail.Exception, match="kernel exploded"):
        bench_end_to_end.run_job("train", "DiT-XL/2", 256, 4, 2, "fastdit")
    assert harness.RESULTS[-1]["status"] == "error: RuntimeError: kernel exploded"


def test_attention_rows_say_why_another_backend_refused_a_case_and_fastdits_own_fail(monkeypatch):
    """A forced SDPA kernel may refuse a case (shape or stride limits, "No available kernel"): its row says so,
    untimed, and the suite goes on; an error in fastdit's own backends fails the case."""
    from benchmarks import bench_attention

    monkeypatch.setattr(harness, "RESULTS", [])
    monkeypatch.setattr(bench_attention, "cannot_run", lambda impl, T, Dh: None)

    def runner(error):
        def run(q, k, v):
            raise error

        return lambda impl: run

    monkeypatch.setattr(bench_attention, "runner", runner(RuntimeError("No available kernel. Aborting execution.")))
    row = bench_attention.measure("sdpa_cudnn", 32, 72, "fwd")
    assert (
        row["ms"] is None
        and row["status"] == "rejected this case: RuntimeError: No available kernel. Aborting execution."
    )
    monkeypatch.setattr(bench_attention, "runner", runner(torch.cuda.OutOfMemoryError("CUDA out of memory.")))
    assert bench_attention.measure("triton", 32, 72, "bwd")["status"].startswith("out of memory at batch")
    monkeypatch.setattr(bench_attention, "runner", runner(RuntimeError("kernel exploded")))
    with pytest.raises(RuntimeError, match="kernel exploded"):
        bench_attention.measure("triton", 32, 72, "fwd")


def test_end_to_end_training_rows_per_configuration(monkeypatch):
    """The headline model trains in every configuration as its own row: images/s, MFU, peak memory (None
    on the CPU) and the step's breakdown by op category; the checkpointing modes named; FP8 without
    torchao (or without a float8 GPU) says why instead of a time."""
    from benchmarks import bench_end_to_end

    monkeypatch.setattr(harness, "RESULTS", [])
    case = workloads.cases()[0]
    for impl in ("fastdit", "fastdit ckpt=selective", "fastdit ckpt=full"):
        with workloads.cpu_threads_for_smoke():
            row = bench_end_to_end.run_job("train", *case, impl)
        assert row["img_per_s"] > 0 and {"mfu", "peak_mem_gib"} <= row.keys(), row
        assert row.get("checkpointing", "none") == bench_end_to_end.train_config(impl)[1]
        shares = row["breakdown"]
        assert set(shares) <= {name for name, _ in profile_step.CATEGORIES} and shares["GEMM"] > 0, shares
        assert sum(shares.values()) == pytest.approx(100)
    fp8 = bench_end_to_end.run_job("train", *case, "torch.compile(fastdit) fp8")
    assert fp8["ms"] is None and fp8["precision"] == "fp8"
    try:
        import torchao  # noqa: F401

        assert "compute capability" in fp8["status"] or torch.cuda.is_available()
    except ImportError:
        assert fp8["status"] == "not installed: torchao (pip install torchao)"
