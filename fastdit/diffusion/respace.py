"""Respacing: a diffusion process that keeps a subset of a base process's timesteps (DiT / IDDPM semantics).

The spaced process has its own betas, chosen so that its alpha_bar at each kept step equals the base
process's; the model keeps seeing the base process's timesteps.
"""

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion, checked_betas


def _parse_section_counts(num_timesteps, section_counts):
    """section_counts as a list of ints, or the set of kept steps for "ddimN"."""
    if isinstance(section_counts, int) and not isinstance(section_counts, bool):
        return [section_counts]
    if not isinstance(section_counts, str):
        return list(section_counts)
    if section_counts.startswith("ddim"):
        desired_count = _parse_count(section_counts[len("ddim") :], section_counts)
        # The DDIM paper's striding: one integer stride from step 0.
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired_count:
                return set(range(0, num_timesteps, stride))
        raise ValueError(
            f"timestep_respacing (section_counts) {section_counts!r}: no integer stride takes exactly "
            f"{desired_count} of {num_timesteps} steps"
        )
    return [_parse_count(part, section_counts) for part in section_counts.split(",")]


def _parse_count(text, whole):
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"timestep_respacing (section_counts) must be 'ddimN' or comma-separated step counts such as "
            f"'250' or '10,15,20', got {whole!r}"
        ) from None


def space_timesteps(num_timesteps, section_counts):
    """The set of base-process steps to keep.

    section_counts: step counts per equal-size section of the base process, as a list or a string
    "10,15,20" (with 300 steps: 10 steps evenly strided over the first 100, 15 over the next 100, 20
    over the last 100), or "ddimN" for DDIM's fixed integer striding (one section, N steps).
    """
    counts = _parse_section_counts(num_timesteps, section_counts)
    if isinstance(counts, set):
        return counts
    if not counts:
        raise ValueError("timestep_respacing (section_counts) must name at least one section")
    size_per, extra = divmod(num_timesteps, len(counts))
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 0 <= section_count <= size:
            raise ValueError(
                f"timestep_respacing (section_counts) {section_counts!r}: cannot take {section_count} steps from "
                f"a section of {size} steps"
            )
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # Accumulate the fractional index and round it (round half to even), as DiT does.
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    if not all_steps:
        raise ValueError(f"timestep_respacing (section_counts) {section_counts!r} keeps no step")
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion process that skips steps of a base process.

    use_timesteps: the base process's steps to keep (any collection). kwargs: GaussianDiffusion's
    arguments for the base process. Models are called with base-process timesteps.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        base_betas = checked_betas(kwargs["betas"])  # the base process must be valid too, kept steps or not
        self.original_num_steps = len(base_betas)
        valid = set(range(len(base_betas)))
        unknown = sorted(self.use_timesteps - valid, key=str)
        if unknown:
            raise ValueError(f"use_timesteps must be steps in [0, {len(base_betas)}), got {unknown[:5]}")
        self.timestep_map = []
        new_betas = []
        last_alpha_cumprod = 1.0
        # beta'_k = 1 - abar_{s_k} / abar_{s_(k-1)}: the spaced chain's alpha_bar equals the base one at kept steps.
        for i, alpha_cumprod in enumerate(np.cumprod(1.0 - base_betas, axis=0)):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        super().__init__(**{**kwargs, "betas": np.array(new_betas)})
        self._identity_map = self.timestep_map == list(range(self.original_num_steps))
        self._map_tensors = {}

    def _wrap_model(self, model):
        if self._identity_map or isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self._original_timesteps)

    def _original_timesteps(self, ts):
        """Base-process timesteps of spaced-process timesteps ts (same dtype and device)."""
        key = (ts.device, ts.dtype)
        table = self._map_tensors.get(key)
        if table is None:
            table = self._map_tensors[key] = torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        return table[ts]


class _WrappedModel:
    """A model (or cond_fn) called with base-process timesteps."""

    def __init__(self, model, map_timesteps):
        self.model = model
        self.map_timesteps = map_timesteps

    def __call__(self, x, ts, **kwargs):
        return self.model(x, self.map_timesteps(ts), **kwargs)
