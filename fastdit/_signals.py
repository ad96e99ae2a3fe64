"""Stop signals: what a cluster sends a job before it kills it (SIGTERM: SLURM, Kubernetes, torchrun passing
on its own; SIGUSR1: SLURM's --signal=USR1@N, ahead of time). A command that keeps its work stops as after
Ctrl-C, keeping it, and `fastdit` exits with 128 + the signal's number (143 for SIGTERM, 138 for SIGUSR1):
the code a shell gives a process that a signal ended."""

import signal
import threading

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Stopped(KeyboardInterrupt):
    """Ctrl-C's twin for a stop signal: code that catches KeyboardInterrupt to say what it kept catches this too
    (reworded keeps the signal); `fastdit` says `stopped by SIGTERM: <message>` and exits with exit_code."""

    def __init__(self, signum, message=""):
        super().__init__(*([message] if message else []))
        self.signum = signum

    @property
    def name(self):
        return signal.Signals(self.signum).name

    @property
    def exit_code(self):
        return 128 + self.signum


def reworded(interrupt, message):
    """The same interruption (Ctrl-C's KeyboardInterrupt or a Stopped) saying `message`."""
    return Stopped(interrupt.signum, message) if isinstance(interrupt, Stopped) else KeyboardInterrupt(message)


def interruption(signum):
    """What a noted signal raises: Ctrl-C's (SIGINT) KeyboardInterrupt, or Stopped."""
    return KeyboardInterrupt() if signum == signal.SIGINT else Stopped(signum)


class StopSignals:
    """While open, SIGTERM and SIGUSR1 (with ctrl_c=True SIGINT too: a program whose state is whole only
    between steps) no longer end the process: the handler only notes the first one's number in `received`
    (0: none), for the program to act on where it is safe; with raising=True (settable while open) it also
    raises `interruption` where the main thread is, as Ctrl-C raises KeyboardInterrupt. Later signals change
    nothing (a second SIGTERM while a checkpoint is written does not break off the write). close() puts
    back the handlers it found. Outside the main thread, where Python cannot set handlers, it does nothing."""

    # Set by the `fastdit` command, whose process ends when its command returns: once a signal stopped it,
    # close() leaves SIGTERM and SIGUSR1 ignored, so that another one (torchrun passes each on, a cluster may
    # send several) cannot kill it between its line and its exit code. Library callers get their handlers back.
    ignore_after_stop = False

    def __init__(self, raising=False, ctrl_c=False):
        self.received, self.raising, self._previous = 0, raising, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, *STOP_SIGNALS) if ctrl_c else STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)

    def _note(self, signum, frame):
        if self.received:
            return
        self.received = signum
        if self.raising:
            raise interruption(signum)

    def close(self):
        stopped = self.received and StopSignals.ignore_after_stop
        for sig, handler in self._previous.items():  # None: a handler set outside Python, not restorable
            if stopped and sig in STOP_SIGNALS:
                handler = signal.SIG_IGN
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AgreedStop:
    """The stop signal that every rank of a run acts on after the same step, found without waiting for the
    device at each step.

    after_step(), called once after each training step on every rank, returns the number of a stop signal
    that some rank received (the largest, if several), or 0 to go on. A world of one answers at once (its
    own signal). Several ranks: each call enqueues an all-reduce (MAX) of this rank's signal number without
    waiting for it and answers with the previous call's result, waiting only for that (one step old: done,
    or about to be, unless the host runs more than a step ahead of the device). Collectives meet in the
    order they were issued, so every rank gets the same answer from the same call: the ranks stop after
    the same step and the checkpoint's collectives then meet. A signal stops the run after the step in
    flight and at most one more. On CUDA the result comes back through pinned memory, copied
    asynchronously behind the all-reduce; the host reads it one step later, after that copy's event."""

    def __init__(self, signals, dist_info):
        self.signals, self.device = signals, dist_info.device
        self.collective = dist_info.active
        self._pending = None  # the last call's (work, flag tensor)
        if self.collective and self.device.type == "cuda":
            self._host = torch.zeros(1, dtype=torch.int32, pin_memory=True)
            self._copied = torch.cuda.Event()

    def after_step(self):
        if not self.collective:
            return self.signals.received
        agreed = self.drain()
        flag = torch.full((1,), self.signals.received, dtype=torch.int32, device=self.device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if self.device.type == "cuda":  # NCCL: wait() orders the stream after the all-reduce; the host goes on
            work.wait()
            self._host.copy_(flag, non_blocking=True)
            self._copied.record()
        self._pending = work, flag
        return agreed

    def drain(self):
        """Wait for the last all-reduce (if any) and return its result."""
        if self._pending is None:
            return 0
        work, flag = self._pending
        self._pending = None
        if self.device.type == "cuda":
            self._copied.synchronize()
            agreed = int(self._host[0])
        else:
            work.wait()
            agreed = int(flag[0])
        self.signals.received = self.signals.received or agreed  # another rank's: this process stops on it too
        return agreed
