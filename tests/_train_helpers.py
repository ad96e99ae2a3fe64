"""Shared by the training-stack tests (test_train*.py, test_vae.py, test_sample.py, test_cli.py)."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastdit.cli import main as cli

# A tiny, fast run of the digits job: small batches, 2-step sample grids, no intermediate grids.
FAST = ["--global-batch-size", "16", "--sample-steps", "2", "--sample-every", "0", "--log-every", "1000"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run many tiny ops: one intra-op thread is as fast on an idle 2-core machine and
    avoids the large slow-downs of spinning OpenMP threads when the cores are shared (measured:
    a 40-step VAE run took 3.4 s on 1 thread, 28 s on 2 while another process used a core)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sample_one_per_class(ckpt, png):
    """`fastdit sample` of a checkpoint in 2 steps, one image per class, into png: the exit code."""
    return cli(["sample", "--ckpt", str(ckpt), "--steps", "2", "--per-class", "1", "--out", str(png)])


@contextlib.contextmanager
def another_process_holding(lock):
    """A process holding the advisory lock on file `lock`, as a running fastdit command holds its output's, until
    the block ends; then it is killed (SIGKILL, as a crash would end it), leaving the file behind."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    hold = (
        "import fcntl, sys; f = open(sys.argv[1], 'ab'); fcntl.flock(f, fcntl.LOCK_EX); print(1, flush=True); input()"
    )
    with subprocess.Popen([sys.executable, "-c", hold, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as p:
        try:
            assert p.stdout.readline() == b"1\n"
            yield
        finally:
            p.kill()  # leaving the with: the pipes closed, the process waited for


class Unhandled(Exception):
    """A stop signal that reached the test's own handler: the code under test did not take it."""


@contextlib.contextmanager
def stop_signals_guarded():
    """While the block runs, a SIGTERM or SIGUSR1 that the code under test leaves alone raises Unhandled instead
    of ending pytest; after the block, the test's handlers must be back (the code put back what it found)."""

    def unhandled(signum, frame):
        raise Unhandled(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, unhandled) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
        assert all(signal.getsignal(sig) is unhandled for sig in previous), "the handlers found were not put back"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def send_stop_signal(signum):
    """This process sends itself `signum`, as a cluster would; a handler that raises does so in the sleep."""
    os.kill(os.getpid(), signum)
    time.sleep(60)  # cut short at once by the handler's exception (PEP 475)
