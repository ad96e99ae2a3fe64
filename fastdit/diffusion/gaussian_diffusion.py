"""Gaussian diffusion with DiT's (IDDPM's) semantics: training losses, DDPM and DDIM sampling, bits/dim.

Public names, arguments and results follow facebookresearch/DiT `diffusion/gaussian_diffusion.py`
(itself adapted from openai/improved-diffusion and openai/guided-diffusion). Schedules are float64
numpy arrays; a coefficient is gathered at the batch's timesteps, rounded to float32 and made a
full-size tensor exactly as DiT does, random numbers are drawn in the same places and order, and the
arithmetic keeps DiT's order (and so its tensors' layouts), so that from one torch seed the samples
and losses equal the official ones, whatever the memory layout of the noise or the model's output.

Notation: T steps, t in [0, T); alpha_bar_t = prod_{s<=t} (1 - beta_s);
q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).
"""

import enum
import math

import numpy as np
import torch

from .. import _validate
from .diffusion_utils import discretized_gaussian_log_likelihood, normal_kl

_LN2 = math.log(2.0)  # nats -> bits


def mean_flat(tensor):
    """Mean over every dimension but the batch one."""
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


def _coefficient_dtype():
    """The dtype of a gathered coefficient: DiT adds its float32 values to torch.zeros(shape), of the default
    dtype, so under torch.set_default_dtype(torch.float64) the (float32-rounded) values are float64 and
    the arithmetic on them too."""
    return torch.promote_types(torch.float32, torch.get_default_dtype())


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """DiT's module-level helper, for code that imports it: the numpy array arr (float64) at `timesteps`,
    rounded to float32 and broadcast to broadcast_shape as a new tensor (see _coefficient_dtype) on
    timesteps' device."""
    values = torch.from_numpy(arr).to(timesteps.device)[timesteps].float().to(_coefficient_dtype())  # (B,)
    values = values.reshape(*values.shape, *[1] * (len(broadcast_shape) - values.dim()))  # (B, 1, ...)
    return values.expand(torch.broadcast_shapes(values.shape, broadcast_shape)).contiguous()


class ModelMeanType(enum.Enum):
    """What the model's (first C) output channels predict."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """The reverse-process variance. LEARNED_RANGE: the model outputs v in [-1, 1] interpolating the
    log-variance between FIXED_SMALL (posterior variance) and FIXED_LARGE (beta_t)."""

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE on the mean, plus the VLB term when learning variances
    RESCALED_MSE = enum.auto()  # MSE, plus the VLB term rescaled by T / 1000 when learning variances
    KL = enum.auto()  # the variational lower bound
    RESCALED_KL = enum.auto()  # the VLB times T: an estimate of the full bound

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


def _warmup_beta(beta_start, beta_end, num_diffusion_timesteps, warmup_frac):
    betas = beta_end * np.ones(num_diffusion_timesteps, dtype=np.float64)
    warmup_time = int(num_diffusion_timesteps * warmup_frac)
    betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
    return betas


def get_beta_schedule(beta_schedule, *, beta_start, beta_end, num_diffusion_timesteps):
    """The older schedule API (quad, linear, warmup10, warmup50, const, jsd); see get_named_beta_schedule."""
    n = num_diffusion_timesteps
    schedules = {
        "quad": lambda: np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2,
        "linear": lambda: np.linspace(beta_start, beta_end, n, dtype=np.float64),
        "warmup10": lambda: _warmup_beta(beta_start, beta_end, n, 0.1),
        "warmup50": lambda: _warmup_beta(beta_start, beta_end, n, 0.5),
        "const": lambda: beta_end * np.ones(n, dtype=np.float64),
        "jsd": lambda: 1.0 / np.linspace(n, 1, n, dtype=np.float64),  # 1/T, 1/(T-1), ..., 1
    }
    if beta_schedule not in schedules:
        raise ValueError(f"beta_schedule must be one of {sorted(schedules)}, got {beta_schedule!r}")
    return schedules[beta_schedule]()


def _cosine_alpha_bar(t):
    # Nichol & Dhariwal's cosine schedule, s = 0.008.
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """Betas (float64, length num_diffusion_timesteps) of a named schedule: "linear" (Ho et al.'s
    1e-4..0.02 over 1000 steps, rescaled to keep its shape for any step count) or "squaredcos_cap_v2"."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return get_beta_schedule(
            "linear", beta_start=scale * 0.0001, beta_end=scale * 0.02, num_diffusion_timesteps=num_diffusion_timesteps
        )
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_diffusion_timesteps, _cosine_alpha_bar)
    raise ValueError(f"noise_schedule must be 'linear' or 'squaredcos_cap_v2', got {schedule_name!r}")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Betas discretising alpha_bar: [0, 1] -> (0, 1], beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T),
    capped at max_beta to avoid the singularity at the end."""
    n = num_diffusion_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def checked_betas(betas):
    """betas as a float64 array (for accuracy; rounded to float32 per use), checked: 1-D, non-empty, in (0, 1]."""
    betas = np.array(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not ((betas > 0).all() and (betas <= 1).all()):
        raise ValueError(f"betas must lie in (0, 1], got values in [{betas.min():.6g}, {betas.max():.6g}]")
    return betas


class GaussianDiffusion:
    """Training and sampling utilities for one beta schedule.

    betas: 1-D float64 array, one beta per step, in (0, 1]. model_mean_type, model_var_type,
    loss_type: the ModelMeanType, ModelVarType and LossType members.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        self.betas = betas = checked_betas(betas)
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0) and the inversions x_0 <-> eps.
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_t (1 - abar_{t-1}) / (1 - abar_t)).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0: its log is clipped to the value at t = 1.
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if self.num_timesteps > 1
            else np.array([])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        # Derived tables used per step (DiT recomputes them on every call; the values are the same).
        self._one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self._log_betas = np.log(self.betas)
        # FIXED_LARGE uses beta_t, except at t = 0 where the posterior variance of t = 1 gives a
        # better decoder likelihood. Like the clipped log-variance, undefined for a 1-step process.
        self._fixed_large_variance = (
            np.append(self.posterior_variance[1], self.betas[1:]) if self.num_timesteps > 1 else np.array([])
        )
        self._fixed_large_log_variance = np.log(self._fixed_large_variance)
        self._device_tables = {}

    # ----------------------------------------------------------------------------------------------
    # Schedule lookup

    def _extract(self, name, t, shape):
        """The table `name` rounded to float32 at timesteps t, broadcast to `shape` (B, ...) as a contiguous
        tensor of _coefficient_dtype() (float32 unless the default dtype is float64).

        Equals DiT's _extract_into_tensor (float64 gather, .float(), broadcast to a new tensor); the
        rounded copy of each table is made once per device and dtype. Not a broadcast view: an operand's
        layout decides its result's layout, a sample's layout the order of the next step's
        torch.randn_like draws, and a reduction's layout its rounding; with DiT's layouts, DiT's samples.
        """
        dtype = _coefficient_dtype()
        key = (name, t.device, dtype)
        table = self._device_tables.get(key)
        if table is None:
            table = torch.from_numpy(getattr(self, name)).to(device=t.device, dtype=torch.float32).to(dtype)
            self._device_tables[key] = table
        return table[t].view(-1, *([1] * (len(shape) - 1))).expand(shape).contiguous()

    def _wrap_model(self, model):
        """The callable that sees this process's timesteps; SpacedDiffusion maps them to the original ones."""
        return model

    # ----------------------------------------------------------------------------------------------
    # Forward process and posterior

    def q_mean_variance(self, x_start, t):
        """(mean, variance, log_variance) of q(x_t | x_0), each of x_start's shape."""
        shape = x_start.shape
        mean = self._extract("sqrt_alphas_cumprod", t, shape) * x_start
        variance = self._extract("_one_minus_alphas_cumprod", t, shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """A draw of x_t ~ q(x_t | x_0); noise (standard normal, x_start's shape) is drawn when None."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise must have x_start's shape {tuple(x_start.shape)}, got {tuple(noise.shape)}")
        shape = x_start.shape
        return (
            self._extract("sqrt_alphas_cumprod", t, shape) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """(mean, variance, clipped log-variance) of the posterior q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start and x_t must share one shape, got {tuple(x_start.shape)} and {tuple(x_t.shape)}")
        shape = x_t.shape
        posterior_mean = (
            self._extract("posterior_mean_coef1", t, shape) * x_start
            + self._extract("posterior_mean_coef2", t, shape) * x_t
        )
        posterior_variance = self._extract("posterior_variance", t, shape)
        posterior_log_variance_clipped = self._extract("posterior_log_variance_clipped", t, shape)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    def _predict_xstart_from_eps(self, x_t, t, eps):
        if x_t.shape != eps.shape:
            raise ValueError(f"eps must have x_t's shape {tuple(x_t.shape)}, got {tuple(eps.shape)}")
        shape = x_t.shape
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, shape) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, shape) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        shape = x_t.shape
        return (self._extract("sqrt_recip_alphas_cumprod", t, shape) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, shape
        )

    # ----------------------------------------------------------------------------------------------
    # Reverse process

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Apply the model to get p(x_{t-1} | x_t) and its prediction of x_0.

        model(x, t, **model_kwargs) returns (B, C, ...) or, with a learned variance, (B, 2C, ...)
        channels (or a tuple (output, extra)). denoised_fn is applied to the x_0 prediction before
        clip_denoised clamps it to [-1, 1]. Returns a dict: mean, variance, log_variance,
        pred_xstart (all x's shape) and extra.
        """
        if model_kwargs is None:
            model_kwargs = {}
        self._check_timesteps(t, x)
        model_output = self._wrap_model(model)(x, t, **model_kwargs)
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output
        out = self._p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)
        out["extra"] = extra
        return out

    def _check_timesteps(self, t, x):
        """t: (B,) integer steps in [0, num_timesteps), one per sample of x (its values checked where
        reading them is free: _validate.can_read_values)."""
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(getattr(t, 'shape', ()))}")
        # Index dtypes only: a uint8 t would index as a mask, an int16 one not at all.
        if t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"t must hold integer timesteps (torch.int64 or torch.int32), got {t.dtype}")
        if len(t) and _validate.can_read_values(t) and not 0 <= int(t.min()) <= int(t.max()) < self.num_timesteps:
            raise ValueError(f"t must be in [0, {self.num_timesteps}), got values in [{int(t.min())}, {int(t.max())}]")

    def _split_learned_variance(self, model_output, x):
        """(mean part, variance part) of a learned-variance output with 2C channels."""
        B, C = x.shape[:2]
        expected = (B, 2 * C, *x.shape[2:])
        if tuple(model_output.shape) != expected:
            raise ValueError(
                f"the model output must have shape {expected} (2C channels: mean and variance) with a learned "
                f"variance, got {tuple(model_output.shape)}"
            )
        return torch.split(model_output, C, dim=1)

    def _p_mean_variance_from_output(self, model_output, x, t, clip_denoised, denoised_fn):
        """p_mean_variance given the model's output."""
        shape = x.shape
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            model_output, var_values = self._split_learned_variance(model_output, x)
            # DiT reads LEARNED as LEARNED_RANGE too (IDDPM took it as the log-variance itself).
            min_log = self._extract("posterior_log_variance_clipped", t, shape)
            max_log = self._extract("_log_betas", t, shape)
            frac = (var_values + 1) / 2  # [-1, 1] -> [min, max] in log space
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                names = ("_fixed_large_variance", "_fixed_large_log_variance")
            else:
                names = ("posterior_variance", "posterior_log_variance_clipped")
            model_variance, model_log_variance = (self._extract(name, t, shape) for name in names)

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = model_output
        elif self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output)
        else:
            raise NotImplementedError(
                f"p_mean_variance supports START_X and EPSILON models, not {self.model_mean_type}"
            )
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """The mean shifted by variance * grad log p(y | x) (Sohl-Dickstein et al. 2015); cond_fn
        returns that gradient."""
        gradient = self._wrap_model(cond_fn)(x, t, **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """p_mean_variance's output had the model's score been conditioned by cond_fn (Song et al. 2020)."""
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * self._wrap_model(cond_fn)(x, t, **(model_kwargs or {}))
        out = p_mean_var.copy()
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    @staticmethod
    def _nonzero_mask(t, x):
        """1 where t != 0, else 0, shaped to broadcast over x: the last step adds no noise."""
        return (t != 0).float().view(-1, *([1] * (x.dim() - 1)))

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None):
        """One DDPM step: a draw of x_{t-1} ~ p(x_{t-1} | x_t). Returns {"sample", "pred_xstart"}."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        noise = torch.randn_like(x)  # drawn before cond_fn runs, as in DiT, to keep the random stream
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + self._nonzero_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
    ):
        """Samples of `shape` (N, C, ...) by ancestral (DDPM) sampling; see p_sample_loop_progressive."""
        return _last_sample(
            self.p_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress
            )
        )

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
    ):
        """Yield p_sample's dict at every step, from t = T-1 down to 0.

        noise: the starting x_{T-1} (drawn with torch.randn(*shape, device=device) when None).
        device: where samples live (default: the model's parameters' device, else noise's).
        progress: show a tqdm progress bar.
        """
        yield from self._sample_loop_progressive(
            self.p_sample,
            model,
            shape,
            noise,
            device,
            progress,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
        )

    def _ddim_prediction(self, model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs):
        """p_mean_variance, conditioned on the score by cond_fn, and the eps its x_0 prediction implies."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # Re-derive eps from x_0 so that x_0- and eps-predicting models take the same path.
        return out, self._predict_eps_from_xstart(x, t, out["pred_xstart"])

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, eta=0.0):
        """One DDIM step (Song et al. 2020, eq. 12) to the previous timestep; eta = 0 is deterministic,
        eta = 1 matches DDPM's variance. Returns {"sample", "pred_xstart"}."""
        out, eps = self._ddim_prediction(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs)
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = torch.randn_like(x)  # drawn even when eta == 0, as in DiT, to keep the random stream
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        sample = mean_pred + self._nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, eta=0.0
    ):
        """One step of the deterministic DDIM ODE forward in time: x_t -> x_{t+1}."""
        if eta != 0.0:
            raise ValueError(f"eta must be 0.0 for the reverse (deterministic) DDIM ODE, got {eta!r}")
        out, eps = self._ddim_prediction(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs)
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.shape)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
    ):
        """Samples of `shape` by DDIM; arguments as p_sample_loop, plus eta."""
        return _last_sample(
            self.ddim_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress, eta
            )
        )

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
    ):
        """Yield ddim_sample's dict at every step; arguments as p_sample_loop_progressive, plus eta."""
        yield from self._sample_loop_progressive(
            self.ddim_sample,
            model,
            shape,
            noise,
            device,
            progress,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            eta=eta,
        )

    def _sample_loop_progressive(self, step, model, shape, noise, device, progress, **step_kwargs):
        """Run `step` (p_sample or ddim_sample) from t = T-1 down to 0, yielding each step's dict."""
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list (N, C, ...), got {type(shape).__name__}")
        if noise is not None and tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise must have the shape asked for, {tuple(shape)}, got {tuple(noise.shape)}")
        if device is None:
            device = _default_device(model, noise)
        img = noise if noise is not None else torch.randn(*shape, device=device)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm  # imported here: tqdm is only needed for the bar

            indices = tqdm(indices)
        for i in indices:
            t = _timesteps(i, shape[0], device)
            with torch.no_grad():
                out = step(model, img, t, **step_kwargs)
                yield out
                img = out["sample"]

    # ----------------------------------------------------------------------------------------------
    # Losses and the variational bound

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the variational bound in bits per dimension: the decoder NLL at t = 0, else
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)). Returns {"output": (N,), "pred_xstart"}."""
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        return self._vb_terms_from_p(out, x_start, x_t, t)

    def _vb_terms_from_p(self, out, x_start, x_t, t):
        """_vb_terms_bpd given p_mean_variance's dict `out`."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / _LN2
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / _LN2
        return {"output": torch.where((t == 0), decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Training losses, one value per batch element, for timesteps t.

        noise: the Gaussian noise to remove (drawn when None). Returns {"loss"} for the KL losses,
        {"loss", "mse"} for MSE with a fixed variance, {"loss", "mse", "vb"} for MSE with a learned
        variance (loss = mse + vb: the hybrid objective; vb sees the mean prediction detached, so it
        trains only the variance).
        """
        if model_kwargs is None:
            model_kwargs = {}
        self._check_timesteps(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model=model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] *= self.num_timesteps
            return terms

        model_output = self._wrap_model(model)(x_t, t, **model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            model_output, var_values = self._split_learned_variance(model_output, x_t)
            # The bound learns the variance without moving the mean: the mean enters it detached. Joined
            # again as DiT does, so that the halves' layout, and with it the bound's rounding, are DiT's.
            frozen_out = torch.cat([model_output.detach(), var_values], dim=1)
            frozen = self._p_mean_variance_from_output(frozen_out, x_t, t, clip_denoised=False, denoised_fn=None)
            terms["vb"] = self._vb_terms_from_p(frozen, x_start, x_t, t)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # /1000 keeps the scale of the original implementation, where a larger VB term hurt the MSE.
                terms["vb"] *= self.num_timesteps / 1000.0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        if model_output.shape != x_start.shape:
            raise ValueError(
                f"the model's mean output must have x_start's shape {tuple(x_start.shape)}, "
                f"got {tuple(model_output.shape)}"
            )
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start):
        """KL(q(x_{T-1} | x_0) || N(0, I)) in bits per dimension, (N,): the bound's prior term."""
        t = _timesteps(self.num_timesteps - 1, x_start.shape[0], x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / _LN2

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None):
        """The whole variational bound in bits per dimension, one term per timestep.

        Returns total_bpd and prior_bpd, (N,); vb, xstart_mse and mse (of eps), (N, T).
        """
        batch_size = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for t in list(range(self.num_timesteps))[::-1]:
            t_batch = _timesteps(t, batch_size, x_start.device)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(
                    model, x_start=x_start, x_t=x_t, t=t_batch, clip_denoised=clip_denoised, model_kwargs=model_kwargs
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb = torch.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }


def _timesteps(i, n, device):
    """(n,) int64 timesteps, all i: DiT's torch.tensor([i] * n), whose dtype is float32 for n = 0 (an empty
    list), which no timestep lookup takes."""
    return torch.full((n,), i, dtype=torch.int64, device=device)


def _default_device(model, noise):
    """The sampling device when none is given: the model's parameters', else the given noise's."""
    parameters = getattr(model, "parameters", None)
    if parameters is not None:
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    if noise is not None:
        return noise.device
    raise ValueError("device: pass device= (the model has no parameters to take it from, and no noise was given)")


def _last_sample(steps):
    """The final "sample" of a progressive sampling loop."""
    final = None
    for step in steps:
        final = step
    return final["sample"]
