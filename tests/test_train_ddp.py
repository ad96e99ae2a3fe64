"""torchrun with 2 CPU processes (gloo). fastdit train: DDP replicas stay identical, a NaN on one rank skips the
step on both, a crash + --resume is bit-exact, FSDP continues a DDP checkpoint to the same weights (to rounding),
a stop signal to one rank stops both (DDP and FSDP) after the same step.
fastdit sample-ddp: each rank samples its shard with its own seed, rank 0 writes one .npz."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _train_helpers import FAST, another_process_holding, one_thread  # noqa: F401 (an autouse fixture)

from fastdit import train
from fastdit._dist import Dist
from fastdit._signals import AgreedStop
from fastdit.cli import main as cli

WORKER = Path(__file__).with_name("_train_worker.py")
ROOT = WORKER.parent.parent
ARGS = ["--global-batch-size", "16", "--steps", "4", "--ckpt-every", "2", "--sample-steps", "2", "--log-every", "1000"]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def run2(argv, timeout=300, **env):
    """`torchrun --nproc_per_node 2 ARGV` -> the finished process; a run that hangs past `timeout` seconds fails the
    test, its processes ended."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        **env,
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv]
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun passes SIGTERM on to its workers (sessions of their own), kills them 30 s later
            out, err = proc.communicate(timeout=120)
            pytest.fail(f"torchrun {' '.join(argv)} still ran after {timeout} s:\n{out}{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun(tmp_path, name, argv, crash_at=0, nan_at="", signal_at="", timeout=300):
    """Run the training worker on 2 processes; returns (exit code, [rank 0 report, rank 1 report] or None, log)."""
    out = tmp_path / name
    worker = [str(WORKER), str(out), str(crash_at), "--", *argv]
    proc = run2(worker, timeout, FASTDIT_TEST_NAN_AT=nan_at, FASTDIT_TEST_SIGNAL_AT=signal_at)
    reports = [out.with_name(f"{name}.rank{r}.json") for r in range(2)]
    if not all(r.exists() for r in reports):
        return proc.returncode, None, proc.stdout + proc.stderr
    return proc.returncode, [json.loads(r.read_text()) for r in reports], proc.stdout + proc.stderr


def test_ddp_two_processes_identical_replicas_nan_skip_and_bit_exact_resume(tmp_path):
    # Step 3's loss is NaN on rank 1 only: both ranks must skip it (one all-reduce decides).
    code, (r0, r1), log = torchrun(tmp_path, "whole", ARGS + ["--out", str(tmp_path / "whole")], nan_at="3")
    assert code == 0, log
    assert r0["world"] == 2 and r0["losses"] == r1["losses"] and r0["losses"][2] is None
    assert not r0["adaln_one_gemm"]  # DDP all-reduces each block's adaLN gradient as the backward goes
    assert r0["model"] == r1["model"] and r0["ema"] == r1["ema"]  # replicas identical

    code, reports, log = torchrun(tmp_path, "split", ARGS + ["--out", str(tmp_path / "split")], crash_at=2, nan_at="3")
    assert code != 0 and reports is None
    assert sorted(os.listdir(tmp_path / "split" / "checkpoints")) == ["0000002.pt"]
    code, (s0, s1), log = torchrun(tmp_path, "resumed", ["--resume", str(tmp_path / "split")], nan_at="3")
    assert code == 0, log
    assert s0["losses"] == r0["losses"][2:] and s1["losses"] == r1["losses"][2:]
    assert s0["model"] == s1["model"] == r0["model"] and s0["ema"] == r0["ema"]

    # FSDP (sharded parameters, gradients and optimizer state) continues the DDP checkpoint to the same
    # weights, up to rounding: both compute each block's adaLN modulation per block, and FSDP's
    # reduce-scatter may sum in another order than DDP's all-reduce (seen: one tensor off by 2e-10).
    ckpt = tmp_path / "split" / "checkpoints" / "0000002.pt"
    code, (f0, f1), log = torchrun(
        tmp_path, "fsdp", ["--resume", str(ckpt), "--fsdp", "--out", str(tmp_path / "fsdp")], nan_at="3"
    )
    assert code == 0, log
    assert f0["losses"] == f1["losses"] and f0["losses"][0] is None
    assert f0["losses"][1] == pytest.approx(r0["losses"][3], rel=1e-6)
    ddp, fsdp = (torch.load(tmp_path / f"{name}.weights.pt", weights_only=True) for name in ("whole", "fsdp"))
    for kind in ("model", "ema"):  # rank 0 holds the gathered full weights
        for key, value in ddp[kind].items():
            torch.testing.assert_close(fsdp[kind][key], value, rtol=1e-5, atol=1e-7, msg=f"{kind} {key}")


def test_a_stop_signal_to_one_rank_stops_both_after_the_same_step_with_its_checkpoint(tmp_path):
    """SIGTERM reaches rank 1 alone, as it is about to run step 3: the ranks agree to stop after step 4 (the
    all-reduce of step 3's flags, read after step 4), write that step's checkpoint together and exit."""
    argv = ARGS + ["--steps", "8", "--ckpt-every", "0", "--out", str(tmp_path / "run")]
    code, reports, log = torchrun(tmp_path, "run", argv, signal_at="1:2", timeout=120)  # ranks that disagree hang
    assert code != 0 and reports is None, log
    assert [(tmp_path / f"run.rank{r}.stopped").read_text() for r in range(2)] == ["4", "4"], log
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["0000004.pt"]
    said = [line for line in log.splitlines() if line.startswith("fastdit train: stopped")]
    assert sorted(said) == [
        "fastdit train: stopped by SIGTERM",  # rank 1: as after Ctrl-C, rank 0 alone says how the run goes on
        f"fastdit train: stopped by SIGTERM: after step 4; `fastdit train --resume {tmp_path / 'run'}` goes on from "
        f"the last checkpoint, {tmp_path / 'run' / 'checkpoints' / '0000004.pt'}",
    ], log


def test_fsdp_stops_on_a_signal_to_one_rank_and_its_resume_is_bit_exact(tmp_path):
    """The same stop under FSDP, whose checkpoint gathers the sharded weights and optimizer state with
    collectives (ranks that disagreed would hang there): the run resumed from the stop's checkpoint ends
    with the weights, EMA and losses of a run never stopped."""
    argv = ARGS + ["--steps", "6", "--ckpt-every", "0", "--fsdp"]
    code, reports, log = torchrun(
        tmp_path, "run", argv + ["--out", str(tmp_path / "run")], signal_at="1:2", timeout=120
    )
    assert code != 0 and reports is None, log
    assert [(tmp_path / f"run.rank{r}.stopped").read_text() for r in range(2)] == ["4", "4"], log
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["0000004.pt"]
    code, resumed, log = torchrun(tmp_path, "resumed", ["--resume", str(tmp_path / "run")], timeout=120)
    assert code == 0, log
    code, whole, log = torchrun(tmp_path, "whole", argv + ["--out", str(tmp_path / "whole")], timeout=120)
    assert code == 0, log
    for rank in range(2):
        assert resumed[rank]["losses"] == whole[rank]["losses"][4:]
        assert (resumed[rank]["model"], resumed[rank]["ema"]) == (whole[rank]["model"], whole[rank]["ema"])


class Noted:
    """A StopSignals stand-in: the signal number a handler noted (0: none)."""

    received = 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_agreed_stop_answers_one_step_late(device):
    """AgreedStop in a process group of one (gloo; on CUDA NCCL, its answer read back through pinned memory
    behind an event): each step's answer is the all-reduce the step before enqueued, and drain() waits for
    the last one (a signal in the last step)."""
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        signals = Noted()
        agreed = AgreedStop(signals, Dist(0, 1, 0, torch.device(device), owns_group=False))
        assert [agreed.after_step(), agreed.after_step()] == [0, 0]
        signals.received = signal.SIGUSR1
        assert agreed.after_step() == 0, "this step's flag is still in flight"
        signals.received = signal.SIGTERM
        assert [agreed.after_step(), agreed.drain(), agreed.drain()] == [signal.SIGUSR1, signal.SIGTERM, 0]
    finally:
        dist.destroy_process_group()


def test_sample_ddp_two_processes(tmp_path):
    ckpt = train.main(FAST + ["--steps", "1", "--out", str(tmp_path / "run")]).checkpoint
    args = ["--ckpt", ckpt, "--num-samples", "5", "--per-proc-batch-size", "2", "--steps", "2", "--seed", "0"]
    lock = tmp_path / ".two.npz.parts" / ".lock-rank00001"
    with another_process_holding(lock):  # rank 1 of an earlier run (its torchrun killed), still sampling
        proc = run2(["-m", "fastdit.cli", "sample-ddp", *args, "--out", str(tmp_path / "two.npz")])
    # Both ranks refuse (torchrun may stop the second before it prints): rank 0 wrote nothing, not even settings.json.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fastdit sample-ddp: error:")]
    assert proc.returncode != 0 and errors, proc.stdout + proc.stderr
    assert all(f"another fastdit process is writing it (it holds {lock})" in line for line in errors)
    assert set(os.listdir(lock.parent)) <= {".lock-rank00000", ".lock-rank00001"}
    proc = run2(["-m", "fastdit.cli", "sample-ddp", *args, "--out", str(tmp_path / "two.npz")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    two = np.load(tmp_path / "two.npz")["arr_0"]
    assert two.dtype == np.uint8 and two.shape == (5, 8, 8, 1)  # 8 sampled (2 ranks x 2 batches x 2), trimmed
    assert cli(["sample-ddp", *args, "--out", str(tmp_path / "one.npz")]) == 0
    one = np.load(tmp_path / "one.npz")["arr_0"]
    # Rank r seeds with seed * world_size + r: rank 0 of 2 draws what a single process draws. DiT's order:
    # image i of rank r's batch k is sample k * 2 * 2 + i * 2 + r, so rank 0's are samples 0, 2, 4 (6: trimmed).
    assert np.array_equal(two[0::2], one[:3])
    assert not any(np.array_equal(two[r], one[s]) for r in (1, 3) for s in range(5))  # rank 1's own draws
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npz", "run", "two.npz"]  # shards removed
