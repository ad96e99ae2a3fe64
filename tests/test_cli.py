"""The `fastdit` command: one-line errors with exit code 2 for bad input, help, and `fastdit bench` forwarding."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastdit import cli

from _train_helpers import one_thread  # noqa: F401 (an autouse fixture)

ROOT = Path(__file__).resolve().parent.parent


def error_line(capsys):
    """The single line the command printed on stderr."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "/no/such/folder"], "data path '/no/such/folder' does not exist"),
    (["train", "--model", "DiT-XXL/2"], "unknown model 'DiT-XXL/2'; valid names: DiT-XL/2, DiT-XL/4"),
    (["train", "--global-batch-size", "0"], "--global-batch-size 0 must be a positive multiple"),
    (["train", "--lr", "-1"], "--lr must be positive"),
    (["train", "--latents", "/no/latents"], "latents folder '/no/latents' does not exist"),
    (["train", "--resume", "/no/run"], "--resume /no/run: no such checkpoint file or run folder"),
    (["train", "--vae", "v.pt"], "--vae needs --data (images encoded on the fly) or --latents"),
    (["train", "--fid-every", "5"], "--fid-every needs --fid-ref"),
    (["latents", "--vae", "v.pt", "--chunk-size", "0", "--out", "x"], "--chunk-size must be at least 1"),
    (["fid", "/no/samples.npz", "/no/ref.npz"], "samples '/no/samples.npz' is not a file"),
    (["train", "--image-size", "9"], "must be divisible by patch_size"),
    (["latents", "--vae", "/no/vae.pt", "--out", "x"], "--vae '/no/vae.pt' does not exist"),
    (["vae", "--image-size", "10", "--downsample", "2"], "--image-size 10 must be divisible"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, message, capsys):
    assert cli.main(argv) == 2
    line = error_line(capsys)
    assert line.startswith(f"fastdit {argv[0]}: error: ") and message in line


def test_global_batch_must_divide_the_world_size(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as under torchrun --nproc_per_node 3; checked before joining
    assert cli.main(["train", "--global-batch-size", "16"]) == 2
    assert "--global-batch-size 16 is not divisible by the world size 3" in error_line(capsys)


@pytest.mark.parametrize("argv, message", [
    (["train", "--precision", "fp4"], "--precision: invalid choice: 'fp4' (choose from"),
    (["train", "--steps", "ten"], "invalid int value: 'ten'"),
    (["train", "--steps", "3", "--epochs", "1"], "not allowed with argument"),
    (["sample"], "the following arguments are required: --ckpt"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_argparse_errors_are_one_line_too(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    line = error_line(capsys)
    assert message in line and line.endswith("--help)")


def test_console_command_prints_no_traceback():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "fastdit.cli", "train", "--data", "/no/such/dir"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "fastdit train: error: data path '/no/such/dir' does not exist"


def test_help_describes_the_main_job(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "PIXEL space" in out and "digits" in out and "--grad-checkpointing" in out and "DiT-Tiny/2" in out
    assert cli.main([]) == 2
    assert "sample-ddp" in capsys.readouterr().out


def test_bench_forwards_to_the_source_checkout(tmp_path, monkeypatch, capfd):
    fake = tmp_path / "checkout"
    (fake / "fastdit").mkdir(parents=True)
    (fake / "benchmarks").mkdir()
    (fake / "benchmarks" / "__init__.py").write_text("")
    (fake / "benchmarks" / "__main__.py").write_text("import sys; print('bench', sys.argv[1:]); sys.exit(5)")
    monkeypatch.setattr(cli, "__file__", str(fake / "fastdit" / "cli.py"))
    assert cli.main(["bench", "--smoke", "--help"]) == 5
    assert "bench ['--smoke', '--help']" in capfd.readouterr().out
    (fake / "benchmarks" / "__main__.py").unlink()
    assert cli.main(["bench"]) == 2
    assert "source checkout" in error_line(capfd)
