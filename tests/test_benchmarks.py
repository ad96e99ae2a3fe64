"""The benchmark runner and report: the whole command in smoke mode, the headline contract, the
report built from a synthetic GPU run, the FLOP count, the README section and the reports index."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import __main__ as runner
from benchmarks import harness, profile_step, report, workloads
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
    assert pngs, f"no plots in {folder}"
    for png in pngs:
        with Image.open(png) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100, png
        assert f"plots/{png.name}" in report_md, f"{png.name} is not shown in report.md"


def assert_complete_report(out):
    results = json.loads((out / "results.json").read_text())
    md = (out / "report.md").read_text()
    for key, value in leaves(results["headline"], CONTRACT):
        if value is None:
            group, _, leaf = key.rpartition(".")
            assert key in results["missing"], f"headline {key} is null without a reason"
            assert leaf in md and results["missing"][key] in md, f"the reason for null {key} is not in report.md"
    assert_valid_pngs(out / "plots", md)
    return results, md


# ---------------------------------------------------------------------------------------------
# The whole command, as CI runs it


def run_command(*args):
    cmd = [sys.executable, "-m", "benchmarks", "--smoke", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_smoke_command_writes_a_complete_report(tmp_path):
    out = tmp_path / "report"
    stdout = run_command("--out", str(out))
    results, md = assert_complete_report(out)
    assert results["mode"] == "smoke" and "SMOKE RUN" in md
    assert set(results["suites"]) == set(runner.discover())
    assert all(s["status"] == "ok" for s in results["suites"].values()), results["suites"]
    assert results["headline"]["train"]["img_per_s"] > 0, "the end-to-end smoke rows did not reach the headline"
    assert "report:" in stdout and "end_to_end" in stdout

    # --resume keeps every finished suite and only rebuilds the report
    stdout = run_command("--out", str(out), "--resume")
    assert " ... " not in stdout, f"--resume re-ran a finished suite:\n{stdout}"
    assert json.loads((out / "results.json").read_text())["headline"] == results["headline"]


def test_smoke_runs_never_write_into_the_reports_folder():
    args = runner.parse_args(["--smoke", "--out", str(report.REPORTS_DIR / "h100-sxm")])
    with pytest.raises(SystemExit, match="never write"):
        runner.out_dir(args, "smoke", None)


# ---------------------------------------------------------------------------------------------
# The report of a (synthetic) GPU run: every headline number from the rows it should come from


def row(suite, case, impl, ms, **extra):
    return {"suite": suite, "smoke": False, "case": case, "impl": impl, "ms": ms, "spread_ms": 0.01, **extra}


def synthetic_run(out, gpu="NVIDIA H100 80GB HBM3", date="2031-01-02"):
    """A GPU run's raw/ folder: every kernel, attention, end-to-end and profile row the report reads."""
    raw = out / "raw"
    raw.mkdir(parents=True)
    env = {"environment": {"gpu": gpu, "date": date, "time_utc": date + "T00:00:00+00:00", "commit": "abc123", "torch": "2.x"},
           "ceilings": {"copy_bandwidth_gbs": 3000.0, "bf16_matmul_tflops": 700.0}}  # fmt: skip
    (raw / "environment.json").write_text(json.dumps(env))
    suites = {}
    for k in report.KERNELS:
        rows = []
        for D, tokens in ((1152, 65536), (768, 8192)):
            for mode, scale in (("fwd", 1.0), ("bwd", 2.0)):
                case = f"D{D} T{tokens}"
                shape = dict(mode=mode, dtype="torch.bfloat16", D=D, tokens=tokens)
                rows += [row(k, case, "eager", 4 * scale, **shape), row(k, case, "torch.compile", 2 * scale, **shape)]
                rows.append(row(k, case, "triton", scale, pct_copy_bw=80.0 / scale, gbs=2400.0 / scale, **shape))
        suites[k] = rows
    attn = []
    for Dh, H, tflops in ((72, 16, 300.0), (64, 16, 400.0), (64, 12, 1.0)):
        shape = dict(T=256, Dh=Dh, H=H, B=64, mode="fwd", dtype="bfloat16")
        case = f"B64 H{H} T256 Dh{Dh}"
        attn += [row("attention", case, "triton", 1.0, tflops=tflops, pct_matmul=tflops / 7, **shape),
                 row("attention", case, "flash_attn", 1.5, **shape), row("attention", case, "sdpa_flash", 1.25, **shape),
                 {**row("attention", case, "xformers", None, **shape), "status": "not installed"}]  # fmt: skip
    suites["attention"] = attn
    e2e = []
    for impl, img_s, mem in (("eager", 100.0, 40.0), ("compile", 150.0, 30.0), ("fastdit", 160.0, 20.0), ("fastdit+compile", 180.0, 22.0)):
        base = dict(model="DiT-XL/2", resolution=256)
        e2e.append(row("end_to_end", "train DiT-XL/2 256", impl, 64e3 / img_s, task="train", batch=64, img_per_s=img_s, mfu=img_s / 4, peak_mem_gib=mem, **base))
        for sampler, steps in workloads.SAMPLERS.items():
            e2e.append(row("end_to_end", "sample DiT-XL/2 256", impl, 64e3 / img_s, task="sample", sampler=sampler, steps=steps,
                           timed_steps=10, extrapolated=True, batch=64, img_per_s=img_s / 100, **base))  # fmt: skip
    for impl in ("eager", "fastdit"):
        p = dict(model="DiT-XL/2", resolution=256, batch=64, clock="device", total_ms=100.0)
        e2e.append(row("profile", "profile", impl, 70.0, level="op", op="aten::mm", category="GEMM", calls=300, pct=70.0, **p))
        e2e += [row("profile", "profile", impl, ms, level="category", op=None, category=c, pct=ms, **p) for c, ms in (("GEMM", 70.0), ("attention", 30.0))]
    suites["end_to_end"] = e2e
    for name, rows in suites.items():
        (raw / f"{name}.json").write_text(json.dumps({"complete": True, "rows": rows}))
    run = {"mode": "quick", "command": "python -m benchmarks --quick", "suites": {n: {"status": "ok", "duration_s": 1.0} for n in suites}}
    (raw / "run.json").write_text(json.dumps(run))
    return report.build(out)


def test_report_of_a_gpu_run_computes_the_headline(tmp_path):
    results = synthetic_run(tmp_path)
    h = results["headline"]
    assert leaves(h, CONTRACT)
    assert (h["gpu"], h["date"], h["commit"], h["copy_bandwidth_gbs"]) == ("NVIDIA H100 80GB HBM3", "2031-01-02", "abc123", 3000.0)
    for k in report.KERNELS:  # the D=1152, 64K-token bf16 case; compile twice as slow as fastdit
        assert h["kernels"][k] == {"fwd_pct_copy_bw": 80.0, "bwd_pct_copy_bw": 40.0, "fwd_speedup_vs_compile": 2.0, "bwd_speedup_vs_compile": 2.0}
    assert h["attention"] == {"T256_hd72_tflops": 300.0, "T256_hd72_vs_best_other": 1.25, "hd72_over_hd64_per_flop": 0.75}
    t = h["train"]  # fastdit = the faster of fastdit and torch.compile(fastdit)
    assert (t["batch_per_gpu"], t["img_per_s"], t["mfu"]) == (64, 180.0, 45.0)
    assert (t["speedup_vs_eager"], t["speedup_vs_compile"], t["peak_mem_ratio_vs_eager"]) == (1.8, 1.2, 22.0 / 40.0)
    assert h["sample"] == {"model": "DiT-XL/2", "steps": 250, "img_per_s": 1.8, "speedup_vs_compile": 1.2}
    assert results["missing"] == {}
    md = (tmp_path / "report.md").read_text()
    assert "| DiT-XL/2 256² training MFU (%) | ≥ 55.0 | 45.0 | short by 10.0" in md  # a missed target: by how much
    assert "Where the time goes" in md and "GEMM 70.0 %" in md  # ... and where the time goes
    assert "xformers ms" in md and "not installed" in md  # a missing alternative is listed, not dropped
    assert_valid_pngs(tmp_path / "plots", md)


def test_headline_falls_back_to_the_closest_kernel_shape_and_says_so(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [row("patchify", "small", impl, ms, mode="fwd", dtype="float32", D=16, tokens=64) for impl, ms in (("compile", 3.0), ("triton", 1.0))]
    (raw / "patchify.json").write_text(json.dumps({"complete": True, "rows": rows}))
    results = report.build(tmp_path)
    assert results["headline"]["kernels"]["patchify"]["fwd_speedup_vs_compile"] == 3.0
    assert "closest shape used" in results["headline_sources"]["kernels.patchify.fwd"]
    assert "no bwd rows" in results["missing"]["kernels.patchify.bwd_pct_copy_bw"]
    assert "not measured in smoke mode" in results["missing"]["kernels.patchify.fwd_pct_copy_bw"]


# ---------------------------------------------------------------------------------------------
# README section and the reports index


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
    head = harness.HEADLINE_KERNEL_SHAPE
    assert any(B * T == head["tokens"] and D == head["D"] for B, T, D in harness.DIT_TOKEN_SHAPES_QUICK)
    assert head == report.HEADLINE_KERNEL


def test_end_to_end_job_records_oom_and_fails_on_errors(monkeypatch):
    from benchmarks import bench_end_to_end

    monkeypatch.setattr(harness, "RESULTS", [])  # keep these rows out of the process's own

    def build(error):
        def fail(*args, **kwargs):
            raise error
        return fail

    monkeypatch.setattr(profile_step, "train_step", build(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate")))
    row = bench_end_to_end.run_job("train", "DiT-XL/2", 256, 4, 2, "eager")
    assert row["ms"] is None and row["status"] == "out of memory at batch 4"
    monkeypatch.setattr(profile_step, "train_step", build(RuntimeError("kernel exploded")))
    with pytest.raises(pytest.fail.Exception, match="kernel exploded"):
        bench_end_to_end.run_job("train", "DiT-XL/2", 256, 4, 2, "fastdit")
    assert harness.RESULTS[-1]["status"] == "error: RuntimeError: kernel exploded"
