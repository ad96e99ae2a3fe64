"""The finished batches of a `fastdit sample-ddp` run, kept so that a crash loses at most one batch.

Every rank writes each batch it finishes, with the random state after it, to its own file in a folder
beside the output (`.<out>.parts/`). A run that stops (a crash, a kill, a lost node) leaves them; the
same command continues each rank after its last finished batch, from the random state saved with it,
so it writes the file an uninterrupted run writes. A different command (another checkpoint, seed,
sampler, batch size, world size...) starts afresh. A larger --num-samples reuses the batches already
sampled: a rank's batches are a prefix of its random stream. The folder is removed once the output is
written. While a run writes it, each rank holds its lock file there (_util.exclusive_output): a second run
of the same output is refused instead of mixing its batches in or removing them.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from ._util import LOCK_PREFIX, atomic_write, exclusive_output

FORMAT = 1


class Parts:
    """The parts folder of `out` for this rank (dist: fastdit._dist.Dist), keyed by `settings`: a
    JSON-able dict of everything that decides the samples."""

    def __init__(self, out, settings, dist):
        self.out = Path(out)
        self.root = self.out.parent / f".{self.out.name}.parts"
        self.settings, self.dist = dict(settings, format=FORMAT), dist

    def exclusive(self):
        """A context in which this run is the only one writing the folder (every rank agrees, or all raise
        UsageError); open() and everything after it run inside it."""
        return exclusive_output(self.root, str(self.out), self.dist)

    def path(self, rank, batch):
        return self.root / f"rank{rank:05d}-batch{batch:07d}.npz"

    def open(self):
        """Keep the folder if a run of the same settings made it, else empty it (rank 0 decides, every rank
        waits); -> how many batches this rank has finished."""
        record = self.root / "settings.json"
        if self.dist.is_main:
            try:
                same = json.loads(record.read_text()) == self.settings
            except (OSError, ValueError):
                same = False
            if not same:
                for f in self.root.iterdir():  # the ranks' lock files stay: removed, they would lock nothing
                    if not f.name.startswith(LOCK_PREFIX):
                        f.unlink()
                atomic_write(record, lambda f: f.write(json.dumps(self.settings, indent=1).encode()))
        self.dist.barrier()
        done = 0
        while self.path(self.dist.rank, done).is_file():
            done += 1
        return done

    def restore(self, done):
        """Set the random state to the one after this rank's batch done - 1 (done > 0)."""
        with np.load(self.path(self.dist.rank, done - 1)) as f:
            torch.set_rng_state(torch.from_numpy(f["cpu_rng"]))
            if self.dist.device.type == "cuda":
                torch.cuda.set_rng_state(torch.from_numpy(f["device_rng"]), self.dist.device)

    def save(self, batch, images):
        """This rank's batch (uint8 (n, H, W, C)) and the random state after it, in one atomic write."""
        states = dict(cpu_rng=torch.get_rng_state().numpy())
        if self.dist.device.type == "cuda":
            states["device_rng"] = torch.cuda.get_rng_state(self.dist.device).numpy()
        atomic_write(self.path(self.dist.rank, batch), lambda f: np.savez(f, images=images, **states))

    def dit_index(self, batch, n, rank=None):
        """The sample numbers of a rank's batch of n images (default: this rank's), as DiT's sample_ddp.py
        numbers them: image i of rank r's batch k is k * n * world_size + i * world_size + r."""
        world, rank = self.dist.world_size, self.dist.rank if rank is None else rank
        return batch * n * world + np.arange(n) * world + rank

    def gather(self, batches, num_samples):
        """The first num_samples images of every rank's first `batches` batches, in DiT sample_ddp.py's order
        (dit_index)."""
        out = None
        for rank in range(self.dist.world_size):
            for k in range(batches):
                with np.load(self.path(rank, k)) as f:
                    images = f["images"]  # (n, H, W, C)
                index = self.dit_index(k, len(images), rank)
                keep = index < num_samples
                if out is None:
                    out = np.empty((num_samples, *images.shape[1:]), np.uint8)
                out[index[keep]] = images[keep]
        return out

    def finished(self):
        """Whether any rank has finished a batch."""
        return any(self.root.glob("rank*-batch*.npz"))

    def remove(self):
        shutil.rmtree(self.root, ignore_errors=True)
