"""fastdit train in one process: the default job, bit-exact resume, NaN guard, GradScaler, atomic checkpoints,
--deterministic, the defaults that follow the data, the progress bar and logs."""

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _train_helpers import FAST, another_process_holding, one_thread  # noqa: F401 (an autouse fixture)

import fastdit
from fastdit import DiT, _util, load_checkpoint, train
from fastdit.cli import main as cli
from fastdit.diffusion import create_diffusion


def weights(path, key="model"):
    return torch.load(path, weights_only=True)[key]


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_default_job_smoke(tmp_path, capsys):
    """`fastdit train --steps 3`: the main job's defaults write a checkpoint, a sample grid and a loss curve."""
    out = tmp_path / "run"
    assert cli(["train", "--steps", "3", "--sample-steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "DiT-Tiny/2" in printed and "pixel space" in printed and str(out) in printed
    ckpt = out / "checkpoints" / "0000003.pt"
    for f in (ckpt, out / "samples.png", out / "loss.png", out / "metrics.jsonl"):
        assert f.is_file() and f.stat().st_size > 0, f
    raw = torch.load(ckpt, weights_only=True)  # plain types only: safe loading reads everything
    assert raw["step"] == 3 and raw["args"]["model"] == "DiT-Tiny/2" and raw["args"]["global_batch_size"] == 128
    assert raw["model_config"]["in_channels"] == 1 and raw["data"]["kind"] == "digits"
    model = DiT(**{**raw["model_config"], "input_size": tuple(raw["model_config"]["input_size"])})
    load_checkpoint(str(ckpt), model)  # the EMA weights, into the stored config
    assert_same_state(model.state_dict(), raw["ema"])
    assert_same_state(fastdit.load_model(out).state_dict(), raw["ema"])  # the same in one call
    records = _util.read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if "event" not in r] == [1, 2, 3]
    log = [r for r in records if r.get("event") == "log"][-1]
    assert log["images_per_s"] > 0 and log["memory_gb"] > 0 and log["loss"] > 0


def test_resume_is_bit_exact(tmp_path, monkeypatch, capsys):
    """6 steps in one go == 3 steps, a crash, --resume, 3 more: the same losses, weights, EMA and optimizer.
    A --resume while another process writes the run folder is refused first, the folder untouched."""
    args = FAST + ["--steps", "6", "--ckpt-every", "3"]
    whole = train.main(args + ["--out", str(tmp_path / "whole")])

    step = train.Trainer.train_step

    def crash_after_3(self, x, y):
        if self.step == 3:
            raise KeyboardInterrupt  # killed: nothing after the step-3 checkpoint is saved
        return step(self, x, y)

    monkeypatch.setattr(train.Trainer, "train_step", crash_after_3)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--out", str(tmp_path / "split")])
    monkeypatch.setattr(train.Trainer, "train_step", step)
    assert sorted(os.listdir(tmp_path / "split" / "checkpoints")) == ["0000003.pt"]
    split = tmp_path / "split"
    files = {p: p.stat().st_mtime_ns for p in split.rglob("*")}
    capsys.readouterr()
    with another_process_holding(split / ".lock-rank00000"):  # e.g. the crashed run's orphaned process, still on
        assert cli(["train", "--resume", str(split)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"fastdit train: error: {split}: another fastdit process is writing it (it holds {split}/.lock-rank00000); "
        f"wait for it to end, or stop it, then run the command again"
    ]
    assert {p: p.stat().st_mtime_ns for p in split.rglob("*") if p in files} == files
    resumed = train.main(["--resume", str(split)])  # every option comes from the checkpoint
    assert not (split / ".lock-rank00000").exists()  # the killed holder's file, removed by the run that locked it

    first = [r["loss"] for r in _util.read_jsonl(tmp_path / "split" / "metrics.jsonl") if "event" not in r]
    assert first[:3] + resumed.losses == whole.losses
    assert len(whole.losses) == 6 and len(set(whole.losses)) == 6
    assert resumed.final_loss == whole.final_loss == sum(whole.losses) / 6  # the run's steps, both invocations'
    split_seconds = torch.load(tmp_path / "split" / "checkpoints" / "0000003.pt", weights_only=True)["train_seconds"]
    assert resumed.run_seconds == pytest.approx(split_seconds + resumed.seconds) and split_seconds > 0
    a, b = torch.load(whole.checkpoint, weights_only=True), torch.load(resumed.checkpoint, weights_only=True)
    for key in ("model", "ema"):
        assert_same_state(a[key], b[key])
    assert a["opt"]["state"].keys() == b["opt"]["state"].keys()
    for i, state in a["opt"]["state"].items():
        assert state["step"] == b["opt"]["state"][i]["step"] == 6
        assert torch.equal(state["exp_avg_sq"], b["opt"]["state"][i]["exp_avg_sq"])
    assert a["scaler"] == b["scaler"] and a["data_position"] == b["data_position"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def test_sigterm_stops_after_the_step_in_flight_with_its_checkpoint_and_resume_is_bit_exact(tmp_path):
    """A cluster's SIGTERM to `fastdit train` (a process of its own): the step in flight ends, its checkpoint
    is written, one line says how the run goes on, exit code 128 + 15; --resume then ends where an
    uninterrupted run does, bit for bit."""
    out = tmp_path / "stopped"
    argv = [*FAST, "--steps", "1000", "--ckpt-every", "0", "--log-every", "1", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), OMP_NUM_THREADS="1")
    with open(tmp_path / "stderr", "w") as err:  # a file, not a pipe: the progress bar never fills it and blocks
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastdit", "train", *argv], env=env, stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        deadline = time.monotonic() + 120
        while len([r for r in _util.read_jsonl(out / "metrics.jsonl") if "event" not in r]) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # a second one (in the step in flight, or the save) changes nothing
        while "stopped by" not in (tmp_path / "stderr").read_text() and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)  # nor does one after its line, as the process ends (torchrun's, say)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, (tmp_path / "stderr").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (ckpt,) = (out / "checkpoints").iterdir()
    step = torch.load(ckpt, weights_only=True)["step"]
    assert ckpt.name == f"{step:07d}.pt" and step >= 2
    assert (tmp_path / "stderr").read_text().strip().splitlines()[-1] == (
        f"fastdit train: stopped by SIGTERM: after step {step}; `fastdit train --resume {out}` goes on from the last "
        f"checkpoint, {ckpt}"
    )
    resumed = train.main(["--resume", str(out), "--steps", str(step + 2)])
    whole = train.main(FAST + ["--steps", str(step + 2), "--ckpt-every", "0", "--out", str(tmp_path / "whole")])
    assert resumed.losses == whole.losses[step:]
    a, b = torch.load(whole.checkpoint, weights_only=True), torch.load(resumed.checkpoint, weights_only=True)
    for key in ("model", "ema"):
        assert_same_state(a[key], b[key])


def test_resume_options_and_errors(tmp_path):
    run = train.main(FAST + ["--steps", "2", "--out", str(tmp_path / "r")])
    with pytest.raises(_util.UsageError, match="--steps 1: the resumed run is at step 2 already"):
        train.main(["--resume", run.out, "--steps", "1"])
    with pytest.raises(_util.UsageError, match="no checkpoints"):
        train.main(["--resume", str(tmp_path)])
    with pytest.raises(_util.UsageError, match="--global-batch-size 32 contradicts the resumed run's 16"):
        train.main(["--resume", run.out, "--global-batch-size", "32", "--steps", "3"])
    with pytest.raises(_util.UsageError, match="--num-classes 5 contradicts the resumed run's 10"):
        train.main(["--resume", run.out, "--num-classes", "5", "--steps", "3"])  # the run's 10: the data's
    # Options given again win over the stored ones (restating a kept one is no contradiction); the
    # rest come from the checkpoint.
    more = train.main(["--resume", run.checkpoint, "--steps", "3", "--log-every", "1", "--num-classes", "10"])
    assert len(more.losses) == 1 and more.out == run.out
    stored = torch.load(more.checkpoint, weights_only=True)["args"]
    assert stored["steps"] == 3 and stored["log_every"] == 1 and stored["global_batch_size"] == 16


def test_resume_finishes_a_run_killed_before_its_outputs(tmp_path):
    """Killed after the last checkpoint, before the sample grid and loss curve (and mid-write of a
    checkpoint, leaving its temporary file): --resume removes the temporary files and writes the
    outputs, the same as the uninterrupted run's; a finished run resumed is the same no-op."""
    run = train.main(FAST + ["--steps", "2", "--out", str(tmp_path)])
    grid = (tmp_path / "samples.png").read_bytes()
    for name in ("samples.png", "loss.png"):
        os.remove(tmp_path / name)
    stale = [tmp_path / "checkpoints" / ".0000003.pt.k2j4h5g1.tmp", tmp_path / ".metrics.jsonl.abcd_123.tmp"]
    for f in stale:
        f.write_bytes(b"half a file")
    (tmp_path / "notes.tmp").write_text("not ours")
    again = train.main(["--resume", run.out])
    assert again.losses == [] and again.checkpoint == run.checkpoint
    assert (tmp_path / "samples.png").read_bytes() == grid and (tmp_path / "loss.png").is_file()
    assert not any(f.exists() for f in stale) and (tmp_path / "notes.tmp").exists()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["0000002.pt"]
    assert cli(["train", "--resume", run.out]) == 0


def test_defaults_follow_the_data():
    """Small data gets DiT-Tiny (its patch size fitted to the input) and a short schedule; large data DiT's recipe."""
    assert [train.small_model(n) for n in (4, 8, 9, 12, 32, 256)] == [
        "DiT-Tiny/1",
        "DiT-Tiny/2",
        "DiT-Tiny/1",
        "DiT-Tiny/2",
        "DiT-Tiny/4",
        "DiT-Tiny/4",
    ]
    unset = {k: None for k in ("model", "global_batch_size", "lr", "steps", "ema_decay", "seed", "data", "num_classes")}
    small = argparse.Namespace(**unset)
    assert train.fill_defaults(small, 1797, 4, 1) == "small"  # the digits encoded to 4x4 latents
    assert (small.model, small.steps, small.global_batch_size, small.lr, small.ema_decay) == (
        "DiT-Tiny/1",
        1500,
        128,
        1e-3,
        0.995,
    )
    few = argparse.Namespace(**unset)
    train.fill_defaults(few, 50, 8, 4)
    assert few.global_batch_size == 48  # at most the data, a multiple of the 4 processes
    large = argparse.Namespace(**{**unset, "lr": 3e-4})
    assert train.fill_defaults(large, 1_281_167, 32, 8) == "large"  # ImageNet's latents
    assert (large.model, large.steps, large.global_batch_size, large.lr) == ("DiT-XL/2", 400_000, 256, 3e-4)


class NaNAt:
    """A diffusion whose loss is NaN on the given (1-based) training steps."""

    def __init__(self, bad_steps):
        self.bad, self.calls = set(bad_steps), 0

    def __call__(self, **kwargs):
        diffusion = create_diffusion(**kwargs)
        losses, guard = diffusion.training_losses, self

        def training_losses(model, x, t, model_kwargs=None, noise=None):
            guard.calls += 1
            out = losses(model, x, t, model_kwargs, noise)
            if guard.calls in guard.bad:
                out["loss"] = out["loss"] * float("nan")
            return out

        diffusion.training_losses = training_losses
        return diffusion


def test_nan_guard_skips_counts_and_aborts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "create_diffusion", NaNAt({2, 4}))
    run = train.main(FAST + ["--steps", "5", "--out", str(tmp_path / "a"), "--ckpt-every", "1"])
    assert run.skipped == 2 and run.losses[1] is None and run.losses[3] is None
    assert all(isinstance(v, float) for i, v in enumerate(run.losses) if i not in (1, 3))
    # A skipped step leaves the weights and the EMA untouched.
    ckpts = tmp_path / "a" / "checkpoints"
    for key in ("model", "ema"):
        assert_same_state(weights(ckpts / "0000001.pt", key), weights(ckpts / "0000002.pt", key))
    assert torch.load(ckpts / "0000005.pt", weights_only=True)["skipped"] == 2

    monkeypatch.setattr(train, "create_diffusion", NaNAt(range(2, 100)))
    with pytest.raises(train.TrainingError, match="NaN/Inf for 3 steps in a row"):
        train.main(FAST + ["--steps", "20", "--max-bad-steps", "3", "--out", str(tmp_path / "b")])
    assert cli(["train"] + FAST + ["--steps", "20", "--max-bad-steps", "3", "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fastdit")]  # the rest is the progress bar
    assert len(lines) == 1 and "stopped" in lines[0] and "--lr" in lines[0] and "Traceback" not in err


def test_fp16_grad_scaler_skips_overflow_backs_off_and_resumes(tmp_path):
    """fp16: an overflowing scaled backward makes GradScaler skip the step and halve the scale
    (not a NaN-guard skip); at a sane scale the step updates the weights; the scaler state is
    checkpointed and restored. (fp16 autocast on the CPU is slow: the full loop is exercised
    with fp32 in test_resume_is_bit_exact; on a GPU, run it with --precision fp16.)"""
    trainer = train.Trainer(train.parse_args(FAST + ["--precision", "fp16", "--steps", "2", "--out", str(tmp_path)]))
    try:
        assert trainer.scaler.is_enabled()
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        before = {k: v.clone() for k, v in trainer.raw.state_dict().items()}
        trainer.step_fn.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # fp16 backward overflows
        loss, norm, bad, _ = trainer.train_step(x, y).tolist()
        assert_same_state(before, trainer.raw.state_dict())
        assert trainer.scaler.get_scale() == 2.0**99 and norm != norm and bad == 0  # NaN norm: the scaler's skip
        trainer.step_fn.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        loss, norm, bad, _ = trainer.train_step(x, y).tolist()
        assert bad == 0 and torch.isfinite(torch.tensor([loss, norm])).all()
        assert not torch.equal(
            before["final_layer.linear.weight"], trainer.raw.state_dict()["final_layer.linear.weight"]
        )
        trainer.step, scale = 2, trainer.scaler.get_scale()
        trainer.out.mkdir(parents=True, exist_ok=True)
        path = trainer.save_checkpoint()
    finally:
        trainer.close()
    assert torch.load(path, weights_only=True)["scaler"]["scale"] == scale
    resumed = train.Trainer(train.parse_args(["--resume", str(path), "--steps", "3"]))
    try:
        assert resumed.scaler.is_enabled() and resumed.scaler.get_scale() == scale and resumed.step == 2
        assert_same_state(resumed.raw.state_dict(), trainer.raw.state_dict())
    finally:
        resumed.close()


def test_weights_made_nan_by_an_update_stop_the_run_keeping_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """A finite loss and gradient, then an update that overflows (a huge step): stop at once, before the EMA
    and before any checkpoint takes the broken weights in."""
    step = torch.optim.AdamW.step

    def overflow_on_second_call(opt, *args, **kwargs):
        out = step(opt, *args, **kwargs)
        overflow_on_second_call.calls += 1
        if overflow_on_second_call.calls == 2:
            with torch.no_grad():
                opt.param_groups[0]["params"][3].mul_(float("inf"))
        return out

    overflow_on_second_call.calls = 0
    monkeypatch.setattr(torch.optim.AdamW, "step", overflow_on_second_call)
    out = tmp_path / "run"
    assert cli(["train"] + FAST + ["--steps", "5", "--ckpt-every", "1", "--out", str(out)]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastdit")]
    assert len(lines) == 1 and "stopped: the update of step 2 made weights NaN/Inf" in lines[0]
    assert f"Last good checkpoint: {out / 'checkpoints' / '0000001.pt'}" in lines[0]
    assert sorted(os.listdir(out / "checkpoints")) == ["0000001.pt"] and not (out / "samples.png").exists()
    for key in ("model", "ema"):
        assert all(torch.isfinite(v).all() for v in weights(out / "checkpoints" / "0000001.pt", key).values())


def test_bf16_grad_clip_and_checkpointing_options(tmp_path):
    run = train.main(
        FAST
        + ["--precision", "bf16", "--grad-clip", "0.5", "--grad-checkpointing", "--steps", "2", "--out", str(tmp_path)]
    )
    assert len(run.losses) == 2 and all(v == v for v in run.losses)
    grad_norms = [r["grad_norm"] for r in _util.read_jsonl(tmp_path / "metrics.jsonl") if "grad_norm" in r]
    assert len(grad_norms) == 2 and all(g > 0 for g in grad_norms)


@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_grad_clip_clips(tmp_path, clip):
    """The optimizer steps with gradients of norm `clip` (not the larger norm the backward gave); 0: unclipped."""
    trainer = train.Trainer(train.parse_args(FAST + ["--grad-clip", str(clip), "--steps", "1", "--out", str(tmp_path)]))
    try:
        applied = []
        step = trainer.opt.step

        def record_then_step(*args, **kwargs):
            grads = [p.grad for p in trainer.step_fn.params if p.grad is not None]
            applied.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
            return step(*args, **kwargs)

        trainer.opt.step = record_then_step
        _, raw_norm, _, _ = trainer.train_step(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))).tolist()
    finally:
        trainer.close()
    assert raw_norm > 0.1  # the backward's norm, logged: clipping at 0.05 has something to do
    assert applied[0] == pytest.approx(clip if clip else raw_norm, rel=1e-4)


def _half_write_then_fail(obj, f):
    f.write(b"\x80\x02partial pickle")  # half a file...
    raise OSError("disk full")  # ...then the crash


def test_atomic_checkpoint_survives_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    _util.atomic_save({"step": 1, "w": torch.ones(3)}, path)
    monkeypatch.setattr(_util.torch, "save", _half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        _util.atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    old = torch.load(path, weights_only=True)
    assert old["step"] == 1 and torch.equal(old["w"], torch.ones(3))

    def refused(dir, prefix, suffix):  # a folder this user may not write in (simulated: root writes anywhere)
        raise PermissionError(13, "Permission denied", os.path.join(dir, prefix + "x1y2z3w4" + suffix))

    monkeypatch.setattr(_util.tempfile, "mkstemp", refused)
    with pytest.raises(PermissionError) as refusal:
        _util.atomic_save({}, path)
    assert refusal.value.filename == str(path)  # the error line names the file asked for, not the temporary


def test_crash_while_checkpointing_keeps_the_last_good_one(tmp_path, monkeypatch):
    run = train.main(FAST + ["--steps", "2", "--out", str(tmp_path)])
    save = train.Trainer.save_checkpoint

    def failing_save(self):
        monkeypatch.setattr(_util.torch, "save", _half_write_then_fail)
        return save(self)

    monkeypatch.setattr(train.Trainer, "save_checkpoint", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train.main(["--resume", run.out, "--steps", "3"])
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["0000002.pt"]
    assert train.find_checkpoint(tmp_path).name == "0000002.pt"
    assert torch.load(tmp_path / "checkpoints" / "0000002.pt", weights_only=True)["step"] == 2
    again = train.main(["--resume", str(tmp_path), "--steps", "3"])
    assert len(again.losses) == 1


def test_metrics_log_keeps_one_record_per_step_across_resumes(tmp_path, monkeypatch):
    train.main(FAST + ["--steps", "4", "--ckpt-every", "2", "--out", str(tmp_path)])
    os.remove(tmp_path / "checkpoints" / "0000004.pt")  # as if the run died after the step-2 checkpoint
    train.main(["--resume", str(tmp_path)])
    steps = [r["step"] for r in _util.read_jsonl(tmp_path / "metrics.jsonl") if "event" not in r]
    assert steps == [1, 2, 3, 4]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.')  # a line cut short by a crash is skipped when read
    assert len(_util.read_jsonl(tmp_path / "metrics.jsonl")) == len(
        [json.loads(l) for l in open(tmp_path / "metrics.jsonl").read().splitlines()[:-1]]
    )


def test_deterministic_pins_the_attention_backend_records_it_and_resumes_with_it(tmp_path, monkeypatch):
    from fastdit import ops
    from fastdit.ops import _attention_policy

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setenv("FASTDIT_ATTENTION", "sdpa_math")
    seen = []
    step = train.Trainer.train_step

    def spy(self, x, y):
        out = step(self, x, y)
        seen.append(
            (
                torch.are_deterministic_algorithms_enabled(),
                _attention_policy.deterministic(),
                ops.last_attention_backend(),
                os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            )
        )
        return out

    monkeypatch.setattr(train.Trainer, "train_step", spy)
    run = train.main(FAST + ["--deterministic", "--steps", "2", "--out", str(tmp_path)])
    assert seen == [(True, True, "sdpa_math", ":4096:8")] * 2
    assert not torch.are_deterministic_algorithms_enabled() and not _attention_policy.deterministic()  # undone
    stored = torch.load(run.checkpoint, weights_only=True)
    assert stored["attention_backend"] == "sdpa_math" and stored["args"]["deterministic"] is True

    monkeypatch.delenv("FASTDIT_ATTENTION")  # auto would pick `math` on the CPU: the recorded backend wins
    train.main(["--resume", run.out, "--steps", "3"])
    assert seen[-1] == (True, True, "sdpa_math", ":4096:8")
    monkeypatch.setenv("FASTDIT_ATTENTION", "math")
    with pytest.raises(
        _util.UsageError,
        match="FASTDIT_ATTENTION=math: the resumed --deterministic run used attention backend 'sdpa_math'",
    ):
        train.main(["--resume", run.out, "--steps", "4"])


def test_deterministic_mode_runs_the_fused_triton_ops(tmp_path, monkeypatch):
    """torch.use_deterministic_algorithms(True) lets the fused ops (torch.library custom ops) and the
    Triton attention run: one training step, every op on its Triton kernel (interpreted on a CPU)."""
    from fastdit import ops

    monkeypatch.setenv("FASTDIT_BACKEND", "triton")
    monkeypatch.delenv("FASTDIT_ATTENTION", raising=False)
    trainer = train.Trainer(
        train.parse_args(FAST + ["--deterministic", "--global-batch-size", "2", "--steps", "1", "--out", str(tmp_path)])
    )
    try:
        assert trainer.attention_backend == "triton"
        loss, norm, _, _ = trainer.train_step(torch.randn(2, 1, 8, 8), torch.randint(0, 10, (2,))).tolist()
        assert ops.last_attention_backend() == "triton" and torch.isfinite(torch.tensor([loss, norm])).all()
    finally:
        trainer.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_deterministic_training_and_resume_are_bitwise_on_cuda(tmp_path):
    """The GPU confirmation of --deterministic: two runs, and a run killed and resumed, give the same bits."""
    args = FAST + [
        "--deterministic",
        "--device",
        "cuda",
        "--precision",
        "bf16",
        "--model",
        "DiT-S/2",
        "--steps",
        "4",
        "--ckpt-every",
        "2",
    ]
    a = train.main(args + ["--out", str(tmp_path / "a")])
    b = train.main(args + ["--out", str(tmp_path / "b")])
    os.remove(tmp_path / "b" / "checkpoints" / "0000004.pt")  # as if killed after step 2's checkpoint
    resumed = train.main(["--resume", str(tmp_path / "b"), "--device", "cuda"])
    assert a.losses == b.losses and a.losses[2:] == resumed.losses
    stored = torch.load(a.checkpoint, weights_only=True)
    assert stored["attention_backend"] in ("triton", "flash_attn", "sdpa_math", "math")
    for key in ("model", "ema"):
        assert_same_state(weights(a.checkpoint, key), weights(b.checkpoint, key))
        assert_same_state(weights(a.checkpoint, key), weights(resumed.checkpoint, key))


def test_progress_bar_shows_the_logged_loss(tmp_path, monkeypatch):
    shown = []
    log = train.Trainer._log

    def spy(self, log_file, bar, window):
        shown.append((bar.postfix, f"loss={sum(window) / len(window):.4f}"))
        return log(self, log_file, bar, window)

    monkeypatch.setattr(train.Trainer, "_log", spy)
    train.main(FAST + ["--steps", "4", "--log-every", "2", "--out", str(tmp_path)])
    logged = [r["loss"] for r in _util.read_jsonl(tmp_path / "metrics.jsonl") if r.get("event") == "log"]
    assert len(shown) == 2 and all(bar == mean for bar, mean in shown)
    assert [f"loss={v:.4f}" for v in logged] == [mean for _, mean in shown]


def test_every_pause_runs_off_the_clock(tmp_path, monkeypatch):
    """Sample grids, checkpoints and the loss curve run inside _outside_clock or after the progress bar
    closed, never on the clock of the logged throughput and the bar's rate and ETA; a skipped step counts
    as a step in the throughput."""
    import tqdm

    state = {"paused": False, "closed": False, "pauses": []}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            assert state["paused"] or state["closed"], f"{name} ran on the training clock"
            state["pauses"].append(name)
            return fn(*args, **kwargs)

        return wrapped

    outside, close = train.Trainer._outside_clock, tqdm.tqdm.close

    def paused(self, bar, fn, *args):
        state["paused"] = True
        try:
            return outside(self, bar, fn, *args)
        finally:
            state["paused"] = False

    def closed(bar):
        state["closed"] = state["closed"] or not bar.disable
        return close(bar)

    monkeypatch.setattr(train.Trainer, "_outside_clock", paused)
    monkeypatch.setattr(tqdm.tqdm, "close", closed)
    for name in ("sample_grid", "save_checkpoint"):
        monkeypatch.setattr(train.Trainer, name, spy(name, getattr(train.Trainer, name)))
    monkeypatch.setattr(train, "plot_loss_curve", spy("plot_loss_curve", train.plot_loss_curve))
    train.main(FAST + ["--steps", "4", "--sample-every", "2", "--ckpt-every", "2", "--out", str(tmp_path)])
    assert state["pauses"] == ["save_checkpoint", "sample_grid", "save_checkpoint", "sample_grid", "plot_loss_curve"]


def test_throughput_counts_skipped_steps(monkeypatch):
    """4 steps in 2 s, two of them skipped (NaN/Inf): 2 steps/s; the loss is the mean of the two finite ones."""
    monkeypatch.setattr(train.time, "time", lambda: 102.0)
    records, lines = [], []
    host = SimpleNamespace(step=10, _window_step=6, _window_start=100.0, args=SimpleNamespace(global_batch_size=16),
                           device=torch.device("cpu"), skipped=2, dist=SimpleNamespace(is_main=True),
                           _record=lambda log, rec: records.append(rec))  # fmt: skip
    train.Trainer._log(host, None, SimpleNamespace(write=lines.append), [1.0, 3.0])
    assert (records[0]["steps_per_s"], records[0]["images_per_s"], records[0]["loss"]) == (2.0, 32.0, 2.0)
    assert (host._window_start, host._window_step) == (102.0, 10) and "loss 2.0000  32 img/s" in lines[0]
    host.step, host.args.global_batch_size = 11, 1  # then 1 step in 2.5 s: 0.4 img/s, not "0 img/s"
    monkeypatch.setattr(train.time, "time", lambda: 104.5)
    train.Trainer._log(host, None, SimpleNamespace(write=lines.append), [1.0])
    assert "loss 1.0000  0.4 img/s" in lines[1]


def test_pauses_are_outside_the_throughput_and_eta_clock(monkeypatch):
    """A sample grid (or checkpoint) of 30 s moves the log window's and the progress bar's start by 30 s."""
    from tqdm import tqdm

    clock = [100.0]
    monkeypatch.setattr(train.time, "time", lambda: clock[0])
    bar = tqdm(total=10, file=io.StringIO())
    host = SimpleNamespace(_window_start=90.0)
    start, last = bar.start_t, bar.last_print_t

    def grid():
        clock[0] += 30.0
        return "grid.png"

    assert train.Trainer._outside_clock(host, bar, grid) == "grid.png"
    assert host._window_start == 120.0 and bar.start_t == start + 30.0 and bar.last_print_t == last + 30.0


def test_a_run_on_relative_paths_resumes_from_another_working_directory(tmp_path, monkeypatch):
    """--data given relative is stored absolute (the checkpoint's args), so --resume alone works from elsewhere."""
    from PIL import Image

    work = tmp_path / "work"
    for cls in ("a", "b"):
        (work / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), 60 * i + (cls == "b") * 100).save(work / "imgs" / cls / f"{i}.png")
    monkeypatch.chdir(work)
    run = train.main(
        FAST + ["--data", "imgs", "--image-size", "8", "--global-batch-size", "4", "--steps", "1", "--out", "run"]
    )
    assert torch.load(run.checkpoint, weights_only=True)["args"]["data"] == str((work / "imgs").resolve())
    monkeypatch.chdir(tmp_path)  # where "imgs" does not exist
    more = train.main(["--resume", "work/run", "--steps", "2"])
    assert len(more.losses) == 1
    assert torch.load(more.checkpoint, weights_only=True)["data"]["size"] == 4


def test_dits_train_flags_keep_dits_meaning(tmp_path, monkeypatch):
    """--data-path is DiT's --data with DiT's VAE (ema) unless --vae is given; --results-dir makes DiT's
    numbered run folders, the next free number after a deletion; neither is kept by --resume."""
    seen = []

    def trainer(args):  # what the trainer would be given
        seen.append(args)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "Trainer", trainer)
    for argv in (["--data-path", "imgs"], ["--data-path", "imgs", "--vae", "mse"]):
        with pytest.raises(KeyboardInterrupt):
            train.run(train.parse_args(argv))
    assert [(a.data, a.vae, a.data_path) for a in seen] == [("imgs", "ema", None), ("imgs", "mse", None)]
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    runs = [train.main(FAST + ["--steps", "1", "--results-dir", "results"]) for _ in range(2)]
    Path(runs[0].out).rename(tmp_path / "elsewhere")  # DiT's count alone (1 entry) would reuse 001-
    runs.append(train.main(FAST + ["--steps", "1", "--results-dir", "results"]))
    model = torch.load(runs[1].checkpoint, weights_only=True)["model_name"].replace("/", "-")
    assert [Path(r.out).name for r in runs] == [f"000-{model}", f"001-{model}", f"002-{model}"]
    resumed = train.main(["--resume", runs[2].out, "--steps", "2"])  # its own folder, not a new number
    assert Path(resumed.out).resolve() == Path(runs[2].out).resolve() and len(resumed.losses) == 1


def test_tf32_as_dits_scripts_on_cuda_only_and_restored():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for enabled in (True, False):
        with _util.tf32(enabled, "cuda"):  # the flags alone: no GPU needed to set them
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (enabled, enabled)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with _util.tf32(True, "cpu"):  # the CPU's float32 stays float32
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_tf32_is_on_for_new_runs_and_a_resumed_run_keeps_its_own(tmp_path, monkeypatch):
    used = []

    @contextlib.contextmanager
    def tf32(enabled, device):
        used.append(enabled)
        yield

    monkeypatch.setattr(_util, "tf32", tf32)
    run = train.main(FAST + ["--steps", "1", "--out", str(tmp_path / "a")])
    off = train.main(FAST + ["--steps", "1", "--no-tf32", "--out", str(tmp_path / "b")])
    train.main(["--resume", off.out, "--steps", "2"])
    stored = [torch.load(r.checkpoint, weights_only=True)["args"]["tf32"] for r in (run, off)]
    # a run from before --tf32 (no such key): resumed, it goes on without TF32, as it ran
    old = torch.load(run.checkpoint, weights_only=True)
    del old["args"]["tf32"]
    torch.save(old, tmp_path / "a" / "checkpoints" / "0000001.pt")
    train.main(["--resume", run.out, "--steps", "2"])
    assert stored == [True, False] and used == [True, False, False, False]


def test_data_loader_workers_default_to_dits_for_image_folders_on_cuda(tmp_path):
    assert train.default_num_workers(str(tmp_path), torch.device("cuda", 0)) == 4  # DiT's --num-workers
    for data, device in ((str(tmp_path), "cpu"), (None, "cuda"), (f"mnist:{tmp_path}", "cuda")):
        assert train.default_num_workers(data, torch.device(device)) == 0
