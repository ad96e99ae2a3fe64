"""Timestep samplers for training (DiT's / guided-diffusion's resample module).

A sampler draws a batch of timesteps from a distribution over the diffusion steps and returns
importance weights 1 / (T p(t)) that keep the loss an unbiased estimate of the uniform-t objective.
Draws use numpy's global random state, as DiT's do.
"""

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist


def create_named_schedule_sampler(name, diffusion):
    """A sampler by name: "uniform" or "loss-second-moment"."""
    samplers = {"uniform": UniformSampler, "loss-second-moment": LossSecondMomentResampler}
    if name not in samplers:
        raise ValueError(f"name must be one of {sorted(samplers)}, got {name!r}")
    return samplers[name](diffusion)


class ScheduleSampler(ABC):
    """A distribution over timesteps, sampled with importance weights."""

    @abstractmethod
    def weights(self):
        """Positive numpy weights, one per diffusion step (not necessarily normalised)."""

    def sample(self, batch_size, device):
        """(timesteps: int64 (batch_size,), weights: float32 (batch_size,)) on `device`."""
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = torch.from_numpy(indices_np).long().to(device)
        weights = torch.from_numpy(1 / (len(p) * p[indices_np])).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights follow the losses seen so far."""

    def update_with_local_losses(self, local_ts, local_losses):
        """Gather every rank's (timestep, loss) pairs and update the weights identically on all ranks.

        local_ts: integer tensor of timesteps; local_losses: 1-D tensor of their losses.
        """
        world = dist.get_world_size()
        batch_sizes = [torch.tensor([0], dtype=torch.int32, device=local_ts.device) for _ in range(world)]
        dist.all_gather(batch_sizes, torch.tensor([len(local_ts)], dtype=torch.int32, device=local_ts.device))
        batch_sizes = [int(b.item()) for b in batch_sizes]
        # all_gather needs equal sizes: pad every rank's batch to the largest.
        max_bs = max(batch_sizes)
        timestep_batches = [torch.zeros(max_bs).to(local_ts) for _ in batch_sizes]
        loss_batches = [torch.zeros(max_bs).to(local_losses) for _ in batch_sizes]
        dist.all_gather(timestep_batches, local_ts)
        dist.all_gather(loss_batches, local_losses)
        timesteps = [x.item() for y, bs in zip(timestep_batches, batch_sizes) for x in y[:bs]]
        losses = [x.item() for y, bs in zip(loss_batches, batch_sizes) for x in y[:bs]]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """Update the weights from lists of int timesteps and float losses (the same on every rank,
        so the update must be deterministic)."""


class LossSecondMomentResampler(LossAwareSampler):
    """p(t) proportional to sqrt(E[loss_t^2]) over the last `history_per_term` losses of each step,
    mixed with `uniform_prob` of the uniform distribution; uniform until every step has a full history."""

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                # Full history: shift out the oldest loss.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return (self._loss_counts == self.history_per_term).all()
