"""Gaussian KL and likelihoods used by the variational bound (IDDPM / DiT semantics).

The arithmetic order follows DiT's diffusion_utils so that losses match it bit for bit.
"""

import math

import torch

# sqrt(2 / pi): the constant of the tanh approximation of the normal CDF.
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# Half-width of one of the 256 bins of uint8 data rescaled to [-1, 1].
_HALF_BIN = 1.0 / 255.0
# Below this probability a bin's log is clamped (log(1e-12) ~ -27.6 nats) instead of -inf.
_MIN_PROB = 1e-12


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise with broadcasting.

    Arguments may be Python numbers as long as one of them is a tensor.
    """
    like = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if like is None:
        raise TypeError("normal_kl: at least one of mean1, logvar1, mean2, logvar2 must be a torch.Tensor")
    # torch.exp needs tensors: lift scalar log-variances to the first tensor's dtype and device.
    logvar1, logvar2 = (v if isinstance(v, torch.Tensor) else torch.tensor(v).to(like) for v in (logvar1, logvar2))
    # Summed left to right in DiT's order, so that losses match it bit for bit.
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """Phi(x) ~ 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): the tanh approximation IDDPM uses."""
    return 0.5 * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3))))


def continuous_gaussian_log_likelihood(x, *, means, log_scales):
    """log N(x; means, exp(log_scales)^2) of the standardised value (nats), as DiT computes it.

    Like DiT, this is the standard normal log-density of (x - means) / scale, without the -log(scale)
    Jacobian term.
    """
    normalized_x = (x - means) * torch.exp(-log_scales)
    # torch.distributions.Normal(0, 1).log_prob(z), spelled out: -(z - 0)^2 / (2 * 1) - log(1) - log(sqrt(2 pi)).
    return -(normalized_x**2) / 2 - math.log(math.sqrt(2 * math.pi))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-probability (nats) of the 8-bit bin holding x under N(means, exp(log_scales)^2).

    x: images that were uint8 values rescaled to [-1, 1]; the two edge bins extend to +-infinity.
    x, means and log_scales share one shape.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(
            f"x, means and log_scales must share one shape, got {tuple(x.shape)}, {tuple(means.shape)}, "
            f"{tuple(log_scales.shape)}"
        )
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + _HALF_BIN))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - _HALF_BIN))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=_MIN_PROB))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=_MIN_PROB))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=_MIN_PROB))
    # Thresholds at +-0.999 pick the edge bins (the outermost centres are exactly +-1).
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
