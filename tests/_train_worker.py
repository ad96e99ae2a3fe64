"""Run under torchrun by test_train_ddp.py: `fastdit train` in every rank, then each rank writes its
per-step losses and a digest of its full model weights to OUT.rank<r>.json, and rank 0 the full
model and EMA weights to OUT.weights.pt; a run stopped by a signal writes the step each rank stopped
after to OUT.rank<r>.stopped instead. The exit code is the command's.

usage: python -m torch.distributed.run ... tests/_train_worker.py OUT CRASH_AT -- TRAIN_ARGS...
CRASH_AT > 0 makes every rank die (exit code 3) when it is about to run step CRASH_AT + 1.
FASTDIT_TEST_NAN_AT="3,5" makes rank 1's loss NaN on those (1-based) steps.
FASTDIT_TEST_SIGNAL_AT="1:2" makes rank 1 send itself SIGTERM when it is about to run step 2 + 1.
"""

import hashlib
import json
import os
import signal
import sys

import torch

from fastdit import train
from fastdit.cli import main as cli
from fastdit.diffusion import create_diffusion


def digest(state_dict):
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def main():
    out, crash_at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[4:]
    nan_at = {int(s) for s in os.environ.get("FASTDIT_TEST_NAN_AT", "").split(",") if s}
    signal_at = tuple(int(s) for s in os.environ.get("FASTDIT_TEST_SIGNAL_AT", "").split(":") if s)
    fit, train_step = train.Trainer.fit, train.Trainer.train_step
    current = {}

    def patched_step(self, x, y):
        if crash_at and self.step == crash_at:
            sys.exit(3)  # like a kill: no checkpoint, no clean-up beyond the process dying
        if signal_at == (self.dist.rank, self.step):
            os.kill(os.getpid(), signal.SIGTERM)  # to this rank only, as a signal may reach the ranks one by one
        current["step"], current["rank"] = self.step + 1, self.dist.rank
        return train_step(self, x, y)

    def nan_diffusion(**kwargs):
        diffusion = create_diffusion(**kwargs)
        losses = diffusion.training_losses

        def training_losses(*args, **kw):
            out = losses(*args, **kw)
            if current["rank"] == 1 and current["step"] in nan_at:
                out["loss"] = out["loss"] * float("nan")
            return out

        diffusion.training_losses = training_losses
        return diffusion

    def reporting_fit(self):
        try:
            result = fit(self)
        except KeyboardInterrupt:  # a stop signal: the checkpoint of the step the ranks stopped after is written
            with open(f"{out}.rank{self.dist.rank}.stopped", "w") as f:
                f.write(str(self.step))
            raise
        model_sd, ema_sd, _ = self._state_dicts()
        with open(f"{out}.rank{self.dist.rank}.json", "w") as f:
            json.dump(
                dict(
                    losses=result.losses,
                    model=digest(model_sd),
                    ema=digest(ema_sd),
                    world=self.dist.world_size,
                    adaln_one_gemm=self.raw.adaln_one_gemm,
                ),
                f,
            )
        if self.dist.is_main:
            torch.save(dict(model=model_sd, ema=ema_sd), f"{out}.weights.pt")
        return result

    train.Trainer.train_step = patched_step
    train.Trainer.fit = reporting_fit
    train.create_diffusion = nan_diffusion
    torch.set_num_threads(1)
    sys.exit(cli(["train", *argv]))


if __name__ == "__main__":
    main()
