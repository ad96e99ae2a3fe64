"""fastdit train in one process: the default job, bit-exact resume, NaN guard, GradScaler, atomic checkpoints."""
import json
import os

import pytest
import torch

from fastdit import DiT, _util, load_checkpoint, train
from fastdit.cli import main as cli
from fastdit.diffusion import create_diffusion

from _train_helpers import FAST, one_thread  # noqa: F401 (an autouse fixture)


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
    records = _util.read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if "event" not in r] == [1, 2, 3]
    log = [r for r in records if r.get("event") == "log"][-1]
    assert log["images_per_s"] > 0 and log["memory_gb"] > 0 and log["loss"] > 0


def test_resume_is_bit_exact(tmp_path, monkeypatch):
    """6 steps in one go == 3 steps, a crash, --resume, 3 more: the same losses, weights, EMA and optimizer."""
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
    resumed = train.main(["--resume", str(tmp_path / "split")])  # every option comes from the checkpoint

    first = [r["loss"] for r in _util.read_jsonl(tmp_path / "split" / "metrics.jsonl") if "event" not in r]
    assert first[:3] + resumed.losses == whole.losses
    assert len(whole.losses) == 6 and len(set(whole.losses)) == 6
    a, b = torch.load(whole.checkpoint, weights_only=True), torch.load(resumed.checkpoint, weights_only=True)
    for key in ("model", "ema"):
        assert_same_state(a[key], b[key])
    assert a["opt"]["state"].keys() == b["opt"]["state"].keys()
    for i, state in a["opt"]["state"].items():
        assert state["step"] == b["opt"]["state"][i]["step"] == 6
        assert torch.equal(state["exp_avg_sq"], b["opt"]["state"][i]["exp_avg_sq"])
    assert a["scaler"] == b["scaler"] and a["data_position"] == b["data_position"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def test_resume_options_and_errors(tmp_path):
    run = train.main(FAST + ["--steps", "2", "--out", str(tmp_path / "r")])
    with pytest.raises(_util.UsageError, match="already at step 2"):
        train.main(["--resume", run.out])
    with pytest.raises(_util.UsageError, match="no checkpoints"):
        train.main(["--resume", str(tmp_path)])
    # Options given again win over the stored ones; the rest come from the checkpoint.
    more = train.main(["--resume", run.checkpoint, "--steps", "3", "--log-every", "1"])
    assert len(more.losses) == 1 and more.out == run.out
    stored = torch.load(more.checkpoint, weights_only=True)["args"]
    assert stored["steps"] == 3 and stored["log_every"] == 1 and stored["global_batch_size"] == 16


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
        loss, norm, bad = trainer.train_step(x, y).tolist()
        assert_same_state(before, trainer.raw.state_dict())
        assert trainer.scaler.get_scale() == 2.0**99 and norm != norm and bad == 0  # NaN norm: the scaler's skip
        trainer.step_fn.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        loss, norm, bad = trainer.train_step(x, y).tolist()
        assert bad == 0 and torch.isfinite(torch.tensor([loss, norm])).all()
        assert not torch.equal(before["final_layer.linear.weight"], trainer.raw.state_dict()["final_layer.linear.weight"])
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


def test_bf16_grad_clip_and_checkpointing_options(tmp_path):
    run = train.main(FAST + ["--precision", "bf16", "--grad-clip", "0.5", "--grad-checkpointing", "--steps", "2",
                             "--out", str(tmp_path)])
    assert len(run.losses) == 2 and all(v == v for v in run.losses)
    grad_norms = [r["grad_norm"] for r in _util.read_jsonl(tmp_path / "metrics.jsonl") if "grad_norm" in r]
    assert len(grad_norms) == 2 and all(g > 0 for g in grad_norms)


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
        [json.loads(l) for l in open(tmp_path / "metrics.jsonl").read().splitlines()[:-1]])
