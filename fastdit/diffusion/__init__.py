"""Gaussian diffusion with DiT's semantics (IDDPM): drop-in for facebookresearch/DiT's `diffusion` package.

from fastdit.diffusion import create_diffusion
diffusion = create_diffusion(timestep_respacing="")        # training: 1000 steps
loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
sampler = create_diffusion("250")                           # sampling: 250 respaced steps
samples = sampler.p_sample_loop(model, z.shape, z, clip_denoised=False, model_kwargs=..., device=...)
"""

import numbers

from .._validate import check_positive_int
from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps

__all__ = ["create_diffusion", "SpacedDiffusion", "space_timesteps", "gd"]


def create_diffusion(
    timestep_respacing,
    noise_schedule="linear",
    use_kl=False,
    sigma_small=False,
    predict_xstart=False,
    learn_sigma=True,
    rescale_learned_sigmas=False,
    diffusion_steps=1000,
):
    """A SpacedDiffusion with DiT's defaults: linear betas over `diffusion_steps`, eps prediction, a
    learned-range variance and the hybrid MSE + VLB loss.

    timestep_respacing: None or "" keeps every step; "250", "10,15,20" (steps per equal section) or
    "ddim50" keeps a subset (see space_timesteps). noise_schedule: "linear" or "squaredcos_cap_v2".
    use_kl: train on the (rescaled) VLB alone. rescale_learned_sigmas: scale the VLB term of the hybrid
    loss by diffusion_steps / 1000. sigma_small: with learn_sigma=False, use the posterior variance
    instead of beta_t. predict_xstart: the model predicts x_0 instead of the noise.
    """
    if isinstance(diffusion_steps, numbers.Integral) and not isinstance(diffusion_steps, bool):
        diffusion_steps = int(diffusion_steps)  # numpy's integers too, as DiT takes them
    check_positive_int("diffusion_steps", diffusion_steps)
    betas = gd.get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        model_var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        model_var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=model_var_type,
        loss_type=loss_type,
    )
