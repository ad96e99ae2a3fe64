"""fastdit.train.TrainStep: the training step without host synchronisation, equivalent to the step
before it (DiT's order: read the loss, skip on NaN/Inf, AdamW, EMA); the NaN/Inf guard on the device;
the read-back once per log interval; checkpointing modes and precisions."""

import copy
import math

import pytest
import torch
from _sync_trap import SyncTrap, checks_as_on_a_gpu  # noqa: F401 (a fixture)
from _train_helpers import FAST, one_thread  # noqa: F401 (an autouse fixture)

from fastdit import train
from fastdit._dist import init_distributed
from fastdit._util import UsageError
from fastdit.diffusion import create_diffusion
from fastdit.models import DiT
from fastdit.reference_model import ReferenceDiT


def tiny():
    torch.manual_seed(0)
    return DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=48, depth=2, num_heads=3, num_classes=10)


def data(step, n=6):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


class NaNLossAt:
    """diffusion.training_losses with a NaN loss on the given (1-based) calls."""

    def __init__(self, diffusion, bad):
        self.diffusion, self.bad, self.calls = diffusion, set(bad), 0
        self.num_timesteps = diffusion.num_timesteps

    def training_losses(self, *args, **kwargs):
        self.calls += 1
        out = self.diffusion.training_losses(*args, **kwargs)
        if self.calls in self.bad:
            out["loss"] = out["loss"] * float("nan")
        return out


def dit_step(model, ema, opt, diffusion, x, y, decay, clip=0.0):
    """The step before (and DiT's train.py): read the loss back, skip a NaN/Inf one; clip-norm; AdamW; EMA."""
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],))
    loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
    if not math.isfinite(loss.item()):
        return None
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip or math.inf)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.mul_(decay).add_(p, alpha=1 - decay)
    return loss.item(), norm.item()


def make_step(model, diffusion, **kwargs):
    ema = copy.deepcopy(model).requires_grad_(False)
    return train.TrainStep(model, model, ema, diffusion, init_distributed("cpu"), lr=1e-3, ema_decay=0.9, **kwargs), ema


@pytest.mark.parametrize("clip", [0.0, 0.05], ids=["unclipped", "clipped"])
def test_train_step_matches_the_step_before_it_including_a_skipped_step(clip):
    """Five steps, the third with a NaN loss: fastdit's model and step give the losses, grad norms, skipped
    step, weights and EMA of the official model (ReferenceDiT) under the host-synchronising step (fp32:
    the fused ops, the fused AdamW and the lerp EMA round differently in the last bits); with gradients
    clipped too (0.05 is below every step's norm here)."""
    new = tiny()
    old = ReferenceDiT(input_size=8, patch_size=2, in_channels=1, hidden_size=48, depth=2, num_heads=3, num_classes=10)
    old.load_state_dict(new.state_dict())
    old_ema = copy.deepcopy(old).requires_grad_(False)
    old_opt = torch.optim.AdamW(old.parameters(), lr=1e-3, weight_decay=0.0)
    old_diffusion = NaNLossAt(create_diffusion(timestep_respacing=""), {3})
    step, new_ema = make_step(new, NaNLossAt(create_diffusion(timestep_respacing=""), {3}), grad_clip=clip)
    for i in range(5):
        x, y = data(i)
        torch.manual_seed(i)
        expected = dit_step(old, old_ema, old_opt, old_diffusion, x, y, 0.9, clip)
        torch.manual_seed(i)
        loss, norm, bad, broken = step(x, y).tolist()
        assert not broken
        if expected is None:
            assert bad == 1.0 and loss != loss
        else:
            assert bad == 0.0 and norm > clip
            torch.testing.assert_close(torch.tensor([loss, norm]), torch.tensor(expected), rtol=1e-5, atol=1e-7)
    for a, b in ((old, new), (old_ema, new_ema)):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7, msg=name)
    for p in step.params:
        if p.requires_grad:
            assert step.opt.state[p]["step"] == 4  # the skipped step did not count


@pytest.mark.parametrize(
    "options, checkpointing, nan",
    [
        (dict(), "none", False),
        (dict(grad_clip=0.5), "none", False),
        (dict(precision="bf16"), "selective", False),
        (dict(precision="fp16"), "none", True),
        (dict(), "full", True),
    ],
    ids=["fp32", "clip", "bf16-selective", "fp16-nan", "fp32-full-nan"],
)
def test_train_step_never_reads_the_device(options, checkpointing, nan, checks_as_on_a_gpu):
    """Every path of the step (clipping, autocast, GradScaler, both checkpointing modes, a NaN loss
    skipped on the device) issues no host read."""
    model = tiny().set_gradient_checkpointing(checkpointing)
    step, _ = make_step(model, NaNLossAt(create_diffusion(timestep_respacing=""), {2} if nan else ()), **options)
    step(*data(0))  # the first step creates the optimizer state and the scaler's tensors
    x, y = data(1)
    with SyncTrap() as trap:
        stats = step(x, y)
    trap.check()
    assert stats[2].item() == float(nan)  # the NaN step was flagged bad (and skipped)


def test_sync_trap_sees_host_reads():
    t = torch.tensor([1.0, float("nan")])
    for read in (
        lambda: t.tolist(),
        lambda: float(t[0]),
        lambda: bool(t[0] > 0),
        lambda: t[t > 0],
        lambda: t.sum().item(),
        lambda: t.numpy(),
        lambda: t.cpu(),
        lambda: torch.tensor(0.5).to(t),
        lambda: torch.as_tensor([1, 2]),
    ):
        with SyncTrap() as trap:
            read()
        with pytest.raises(AssertionError, match="host synchronisation"):
            trap.check()
    with SyncTrap() as trap:
        torch.where(torch.isfinite(t), t, 0.0).sum()
        torch.as_tensor(t)  # already a tensor: no copy from the host
    trap.check()


def test_trainer_reads_back_once_per_log_interval(tmp_path, monkeypatch, checks_as_on_a_gpu):
    """No step syncs (gradients clipped); the stats come back at the log interval (and before checkpoints and
    at the end)."""
    reads = []
    read_back, step_call = train.Trainer._read_back, train.TrainStep.__call__

    def counted(self, pending, *args):
        reads.append((self.step, len(pending)))
        return read_back(self, pending, *args)

    def trapped(self, x, y):
        with SyncTrap() as trap:
            out = step_call(self, x, y)
        trap.check()
        return out

    monkeypatch.setattr(train.Trainer, "_read_back", counted)
    monkeypatch.setattr(train.TrainStep, "__call__", trapped)
    run = train.main(
        [
            "--global-batch-size",
            "8",
            "--sample-steps",
            "2",
            "--sample-every",
            "0",
            "--steps",
            "7",
            "--log-every",
            "3",
            "--ckpt-every",
            "5",
            "--grad-clip",
            "0.5",
            "--out",
            str(tmp_path),
        ]
    )
    assert reads == [(3, 3), (5, 2), (6, 1), (7, 1)]  # log at 3 and 6, checkpoint at 5, the end at 7
    assert len(run.losses) == 7 and all(isinstance(v, float) for v in run.losses)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointing_modes_train_the_same(tmp_path, mode):
    base = FAST + ["--steps", "2"]
    plain = train.main(base + ["--out", str(tmp_path / "none")])
    ck = train.main(base + ["--grad-checkpointing", mode, "--out", str(tmp_path / mode)])
    assert ck.losses == plain.losses
    assert torch.load(ck.checkpoint, weights_only=True)["args"]["grad_checkpointing"] == mode


def test_checkpointing_option_parsing():
    parse = lambda *argv: train.parse_args(list(argv)).grad_checkpointing  # noqa: E731
    assert parse() is None and parse("--grad-checkpointing") == "full" and parse("--no-grad-checkpointing") == "none"
    assert parse("--grad-checkpointing", "selective") == "selective"
    assert train.COMMON["grad_checkpointing"] == "none"  # the default fill_defaults gives
    # a run saved before the modes existed stored a bool
    old = train.merge_args(train.parse_args([]), saved={"grad_checkpointing": True})
    assert old.grad_checkpointing == "full"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_fp8_without_torchao_or_a_gpu_is_a_clear_error(tmp_path, capsys):
    from fastdit.cli import main as cli

    assert cli(["train"] + FAST + ["--precision", "fp8", "--steps", "1", "--out", str(tmp_path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastdit")]
    try:
        import torchao  # noqa: F401

        expected = "compute capability 8.9"
    except ImportError:
        expected = "needs the torchao package, which is not installed"
    assert len(err) == 1 and expected in err[0]
    with pytest.raises(UsageError, match="torchao|compute capability"):
        train.to_float8(tiny(), torch.device("cpu"))
