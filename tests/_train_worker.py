"""Run under torchrun by test_train_ddp.py: `fastdit train` in every rank, then each rank writes its
per-step losses and a digest of its full model weights to OUT.rank<r>.json.

usage: python -m torch.distributed.run ... tests/_train_worker.py OUT CRASH_AT -- TRAIN_ARGS...
CRASH_AT > 0 makes every rank die (exit code 3) when it is about to run step CRASH_AT + 1.
"""
import hashlib
import json
import sys

import torch

from fastdit import train


def digest(state_dict):
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def main():
    out, crash_at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[4:]
    fit, train_step = train.Trainer.fit, train.Trainer.train_step

    def crashing_step(self, x, y):
        if self.step == crash_at:
            sys.exit(3)  # like a kill: no checkpoint, no clean-up beyond the process dying
        return train_step(self, x, y)

    def reporting_fit(self):
        result = fit(self)
        model_sd, ema_sd, _ = self._state_dicts()
        with open(f"{out}.rank{self.dist.rank}.json", "w") as f:
            json.dump(dict(losses=result.losses, model=digest(model_sd), ema=digest(ema_sd),
                           world=self.dist.world_size), f)
        return result

    if crash_at:
        train.Trainer.train_step = crashing_step
    train.Trainer.fit = reporting_fit
    torch.set_num_threads(1)
    train.main(argv)


if __name__ == "__main__":
    main()
