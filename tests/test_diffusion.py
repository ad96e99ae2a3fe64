"""fastdit.diffusion: equal to the official DiT diffusion code, and right by its closed forms.

The golden numbers in tests/data/official_diffusion_golden.pt come from running the official code on
the cases of tests/data/make_official_diffusion_golden.py (see that script); here fastdit runs the
same cases. The closed-form tests check the math independently of any implementation.
"""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import fastdit
from fastdit.diffusion import SpacedDiffusion, create_diffusion, gd, space_timesteps
from fastdit.diffusion.diffusion_utils import (
    approx_standard_normal_cdf,
    continuous_gaussian_log_likelihood,
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from fastdit.diffusion.timestep_sampler import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)

DATA = Path(__file__).parent / "data"


def _load_cases_module():
    spec = importlib.util.spec_from_file_location("official_golden_cases", DATA / "make_official_diffusion_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CASES = _load_cases_module()
GOLDEN = torch.load(DATA / "official_diffusion_golden.pt")


# --------------------------------------------------------------------------------------------------
# Same numbers as the official implementation


@pytest.mark.parametrize("case", sorted(GOLDEN["cases"]))
def test_matches_official(case):
    expected = GOLDEN["cases"][case]
    got = CASES.run_cases(create_diffusion, [case])[case]
    assert sorted(got) == sorted(expected), f"{case}: keys {sorted(got)}, official {sorted(expected)}"
    for key, exp in expected.items():
        out = got[key]
        name = f"{case}[{key}]"
        assert (out.dtype, out.shape) == (exp.dtype, exp.shape), (
            f"{name}: {out.dtype} {tuple(out.shape)}, official {exp.dtype} {tuple(exp.shape)}"
        )
        if key == "next_draw" or not exp.is_floating_point():
            # The random stream after sampling, and integer timesteps, must be exact.
            assert torch.equal(out, exp), f"{name}: {out.tolist()} != official {exp.tolist()}"
            continue
        # Bitwise equal on the machine that made the fixture; 1e-6 relative leaves room for another CPU's libm.
        scale = exp.double().abs().max().clamp_min(1e-30)
        err = (out.double() - exp.double()).abs().max()
        assert not torch.isnan(out).any(), f"{name}: NaN"
        assert err <= 1e-6 * scale, f"{name}: max |error| {err:.3g} vs official (max |value| {scale:.3g})"


# --------------------------------------------------------------------------------------------------
# Closed forms


def _abar(betas):
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), straight from the definition."""
    return np.array([np.prod(1.0 - betas[: t + 1]) for t in range(len(betas))])


def test_named_schedules():
    betas = gd.get_named_beta_schedule("linear", 1000)
    assert betas[0] == 1e-4 and abs(betas[-1] - 0.02) < 1e-15 and np.allclose(np.diff(betas), (0.02 - 1e-4) / 999)
    assert np.allclose(gd.get_named_beta_schedule("linear", 250), np.linspace(4e-4, 0.08, 250))
    cos = gd.get_named_beta_schedule("squaredcos_cap_v2", 1000)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert np.allclose(_abar(cos)[:-1], [f((t + 1) / 1000) / f(0) for t in range(999)], rtol=1e-9)
    assert cos.max() == 0.999


def test_q_mean_variance_and_sample_closed_form():
    diffusion = create_diffusion("")
    abar = _abar(gd.get_named_beta_schedule("linear", 1000))
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    x0 = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    a = torch.from_numpy(abar[t.numpy()])[:, None, None, None]
    mean, var, log_var = diffusion.q_mean_variance(x0, t)
    torch.testing.assert_close(mean, a.sqrt() * x0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(var.double(), (1 - a).expand_as(x0), rtol=1e-6, atol=0)
    torch.testing.assert_close(log_var.double(), (1 - a).log().expand_as(x0), rtol=1e-6, atol=0)
    x_t = diffusion.q_sample(x0, t, noise)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise, rtol=1e-6, atol=1e-6)


def test_posterior_is_bayes_of_the_forward_process():
    """q(x_{t-1} | x_t, x_0) ∝ q(x_{t-1} | x_0) q(x_t | x_{t-1}): combine the two Gaussians' precisions."""
    diffusion = gd.GaussianDiffusion(
        betas=gd.get_named_beta_schedule("linear", 1000),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_SMALL,
        loss_type=gd.LossType.MSE,
    )
    betas = diffusion.betas
    abar = _abar(betas)
    t = np.arange(1, 1000)
    prior_var, prior_mean_coef = 1 - abar[t - 1], np.sqrt(abar[t - 1])  # x_{t-1} | x_0
    lik_var, lik_coef = betas[t], np.sqrt(1 - betas[t])  # x_t | x_{t-1}
    post_var = 1 / (1 / prior_var + lik_coef**2 / lik_var)
    np.testing.assert_allclose(diffusion.posterior_variance[t], post_var, rtol=1e-9)
    np.testing.assert_allclose(diffusion.posterior_mean_coef1[t], post_var * prior_mean_coef / prior_var, rtol=1e-9)
    np.testing.assert_allclose(diffusion.posterior_mean_coef2[t], post_var * lik_coef / lik_var, rtol=1e-9)
    assert diffusion.posterior_variance[0] == 0 and abs(diffusion.posterior_mean_coef1[0] - 1) < 1e-12
    clipped = diffusion.posterior_log_variance_clipped
    np.testing.assert_array_equal(clipped[:2], np.log(diffusion.posterior_variance[[1, 1]]))

    # The same numerically, on a grid, for one scalar x_0 and x_t, through the public tensor method.
    x0, xt = 0.3, -0.7
    grid = np.linspace(-6, 6, 200001)
    for step in (1, 40, 700):
        log_p = -((grid - prior_mean_coef[step - 1] * x0) ** 2) / (2 * prior_var[step - 1])
        log_p += -((xt - lik_coef[step - 1] * grid) ** 2) / (2 * lik_var[step - 1])
        p = np.exp(log_p - log_p.max())
        p /= p.sum()
        num_mean = (p * grid).sum()
        num_var = (p * (grid - num_mean) ** 2).sum()
        mean, var, _ = diffusion.q_posterior_mean_variance(
            torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[xt]], dtype=torch.float64), torch.tensor([step])
        )
        assert abs(mean.item() - num_mean) < 1e-5 and abs(var.item() / num_var - 1) < 1e-4


def test_normal_kl_matches_torch_distributions():
    m1, m2 = torch.randn(2, 50, dtype=torch.float64)
    lv1, lv2 = torch.randn(2, 50, dtype=torch.float64)
    normal = torch.distributions.Normal
    ref = torch.distributions.kl_divergence(normal(m1, (0.5 * lv1).exp()), normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-12, atol=1e-12)
    ref_std = torch.distributions.kl_divergence(normal(m1, (0.5 * lv1).exp()), normal(0.0, 1.0))
    torch.testing.assert_close(normal_kl(m1, lv1, 0.0, 0.0), ref_std, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="mean1"):
        normal_kl(0.0, 0.0, 0.0, 0.0)


def test_gaussian_likelihoods():
    x = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    assert (approx_standard_normal_cdf(x) - torch.special.ndtr(x)).abs().max() < 2e-4
    means, log_scales = torch.randn(2, 1001, dtype=torch.float64)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob((x - means) * torch.exp(-log_scales))
    torch.testing.assert_close(continuous_gaussian_log_likelihood(x, means=means, log_scales=log_scales), ref)


@pytest.mark.parametrize("mean, log_scale", [(0.0, -3.0), (0.37, -1.0), (-0.9, -5.0), (1.4, 0.5), (0.0, -8.0)])
def test_discretized_likelihood_sums_to_one_over_the_256_bins(mean, log_scale):
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    full = lambda v: torch.full_like(bins, v)  # noqa: E731
    log_probs = discretized_gaussian_log_likelihood(bins, means=full(mean), log_scales=full(log_scale))
    assert abs(log_probs.exp().sum().item() - 1) < 1e-8
    # Each bin's mass is close to the exact normal CDF difference (the tanh CDF is within 2e-4).
    edges = torch.cat([torch.tensor([-math.inf]), bins[1:] - 1 / 255, torch.tensor([math.inf])])
    exact = torch.diff(torch.special.ndtr((edges - mean) / math.exp(log_scale)))
    assert (log_probs.exp() - exact).abs().max() < 4e-4
    with pytest.raises(ValueError, match="share one shape"):
        discretized_gaussian_log_likelihood(bins, means=bins[:3], log_scales=bins)


# --------------------------------------------------------------------------------------------------
# Respacing


@pytest.mark.parametrize(
    "respacing, expected",
    [
        ("10", [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]),
        ("ddim10", list(range(0, 1000, 100))),
        ("ddim50", list(range(0, 1000, 20))),
        ("2,3", [0, 499, 500, 750, 999]),
        ([1000], list(range(1000))),
    ],
)
def test_space_timesteps(respacing, expected):
    assert sorted(space_timesteps(1000, respacing)) == expected


@pytest.mark.parametrize("respacing", ["250", "ddim25", "10,20,30", "3"])
def test_respacing_keeps_alpha_bar_and_maps_timesteps(respacing):
    base = create_diffusion("")
    spaced = create_diffusion(respacing)
    kept = sorted(space_timesteps(1000, respacing))
    assert spaced.timestep_map == kept and spaced.num_timesteps == len(kept) and spaced.original_num_steps == 1000
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    prev = np.append(1.0, base.alphas_cumprod[kept][:-1])
    np.testing.assert_allclose(spaced.betas, 1 - base.alphas_cumprod[kept] / prev, rtol=1e-12)

    seen = []

    def model(x, t, y):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    spaced.p_sample_loop(model, (2, 1, 2, 2), model_kwargs=dict(y=None), device="cpu")
    assert [s.tolist() for s in seen] == [[k, k] for k in reversed(kept)]


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="noise_schedule"):
        create_diffusion("", noise_schedule="cosine")
    for bad in ("abc", "10,x", "ddimx", "ddim1", "2000", "600,600", "-1"):
        with pytest.raises(ValueError, match="timestep_respacing"):
            create_diffusion(bad)
    with pytest.raises(ValueError, match="diffusion_steps"):
        create_diffusion("", diffusion_steps=0)
    # 15 linear steps have betas up to 20 / 15 > 1: refused (as DiT does) even where the respacing drops them
    for respacing in ("", "1", "ddim5"):
        with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\], got values in \[0.00666667, 1.33333\]"):
            create_diffusion(respacing, diffusion_steps=15)
    with pytest.raises(ValueError, match="beta_schedule"):
        gd.get_beta_schedule("nope", beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=10)
    kinds = dict(
        model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.FIXED_SMALL, loss_type=gd.LossType.MSE
    )
    with pytest.raises(ValueError, match="betas"):
        gd.GaussianDiffusion(betas=[0.1, 0.0], **kinds)
    with pytest.raises(ValueError, match="use_timesteps"):
        SpacedDiffusion(use_timesteps=[0, 5], betas=[0.1] * 5, **kinds)


# --------------------------------------------------------------------------------------------------
# API behaviour


def test_public_api():
    assert fastdit.create_diffusion is create_diffusion
    diffusion = create_diffusion("")
    assert diffusion.model_var_type == gd.ModelVarType.LEARNED_RANGE
    assert diffusion.model_mean_type == gd.ModelMeanType.EPSILON and diffusion.loss_type == gd.LossType.MSE
    assert create_diffusion("", use_kl=True).loss_type == gd.LossType.RESCALED_KL
    assert create_diffusion("", rescale_learned_sigmas=True).loss_type == gd.LossType.RESCALED_MSE
    assert create_diffusion("", learn_sigma=False).model_var_type == gd.ModelVarType.FIXED_LARGE
    assert create_diffusion("", learn_sigma=False, sigma_small=True).model_var_type == gd.ModelVarType.FIXED_SMALL
    assert create_diffusion(None, predict_xstart=True).model_mean_type == gd.ModelMeanType.START_X
    # numpy's integers are integers (DiT takes them)
    numpy_steps, int_steps = (
        create_diffusion("10", diffusion_steps=np.int64(100)),
        create_diffusion("10", diffusion_steps=100),
    )
    assert numpy_steps.timestep_map == int_steps.timestep_map and np.array_equal(numpy_steps.betas, int_steps.betas)
    # DiT's private helper, which code built on DiT imports
    t = torch.tensor([3, 0, 7])
    got = gd._extract_into_tensor(diffusion.sqrt_alphas_cumprod, t, (3, 2, 4, 4))
    want = torch.tensor(diffusion.sqrt_alphas_cumprod[[3, 0, 7]], dtype=torch.float32)
    assert got.shape == (3, 2, 4, 4) and got.is_contiguous()
    assert torch.equal(got, want.view(3, 1, 1, 1).expand(3, 2, 4, 4))
    with CASES.default_dtype(torch.float64):  # DiT adds torch.zeros of the default dtype: float64 values
        got = gd._extract_into_tensor(diffusion.sqrt_alphas_cumprod, t, (3, 2, 4, 4))
    assert got.dtype == torch.float64 and torch.equal(got, want.double().view(3, 1, 1, 1).expand(3, 2, 4, 4))


def test_vb_term_trains_only_the_variance():
    diffusion = create_diffusion("")
    x0 = torch.rand(3, 2, 4, 4) * 2 - 1
    output = torch.randn(3, 4, 4, 4, requires_grad=True)
    terms = diffusion.training_losses(lambda x, t: output, x0, torch.tensor([0, 10, 900]))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    (grad,) = torch.autograd.grad(terms["vb"].sum(), output)
    assert grad[:, :2].abs().max() == 0 and grad[:, 2:].abs().max() > 0


def test_model_output_shape_errors():
    diffusion = create_diffusion("10")
    x = torch.randn(2, 3, 4, 4)
    wrong = lambda x, t: torch.zeros(2, 3, 4, 4)  # noqa: E731  C channels, learned sigma needs 2C
    with pytest.raises(ValueError, match="2C channels"):
        diffusion.training_losses(wrong, x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="t must have shape"):
        diffusion.p_mean_variance(wrong, x, torch.tensor([1]))
    for t, error, match in [
        ([1, 2], ValueError, r"t must have shape \(B,\) = \(2,\), got \(\)"),  # a list, not a tensor
        (torch.tensor([1]), ValueError, r"t must have shape \(B,\) = \(2,\), got \(1,\)"),  # would broadcast
        (torch.tensor([0.5, 2.0]), TypeError, r"t must hold integer timesteps \(torch.int64 or .*got torch.float32"),
        (torch.tensor([1, 2], dtype=torch.uint8), TypeError, "got torch.uint8"),  # would index as a mask
        (torch.tensor([-1, 2]), ValueError, r"t must be in \[0, 10\), got values in \[-1, 2\]"),  # would wrap
        (torch.tensor([3, 10]), ValueError, r"t must be in \[0, 10\)"),
    ]:
        with pytest.raises(error, match=match):
            diffusion.training_losses(wrong, x, t)
    with pytest.raises(TypeError, match="shape"):
        diffusion.p_sample_loop(wrong, "2,3,4,4", device="cpu")
    with pytest.raises(ValueError, match=r"noise must have the shape asked for, \(2, 3, 4, 4\), got \(3, 3, 4, 4\)"):
        diffusion.ddim_sample_loop(wrong, (2, 3, 4, 4), torch.randn(3, 3, 4, 4))  # not silently its own shape


def test_sampling_device_progress_and_progressive(capsys):
    diffusion = create_diffusion("5")
    model = CASES.ToyModel()
    y = dict(y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="device"):
        diffusion.p_sample_loop(model.forward, (2, 3, 8, 8), model_kwargs=y)  # no parameters, no noise
    noise = torch.randn(2, 3, 8, 8)
    steps = list(diffusion.ddim_sample_loop_progressive(model.forward, noise.shape, noise=noise, model_kwargs=y))
    assert len(steps) == 5 and all(set(s) == {"sample", "pred_xstart"} for s in steps)
    torch.manual_seed(3)
    final = diffusion.ddim_sample_loop(model, (2, 3, 8, 8), model_kwargs=y, progress=True)
    assert "5/5" in capsys.readouterr().err  # the tqdm bar
    torch.manual_seed(3)
    torch.testing.assert_close(final, diffusion.ddim_sample_loop(model, (2, 3, 8, 8), model_kwargs=y), rtol=0, atol=0)


def test_an_empty_batch():
    """N = 0: training_losses as in DiT (empty losses, zero gradients); the sampling loops and calc_bpd_loop, which
    fail in DiT (its timesteps torch.tensor([i] * 0) are float32, which no table lookup takes), return empty."""
    torch.manual_seed(0)
    model = fastdit.DiT(input_size=4, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    diffusion = create_diffusion("3")
    x, y = torch.randn(0, 4, 4, 4), torch.zeros(0, dtype=torch.int64)
    terms = diffusion.training_losses(model, x, y.clone(), dict(y=y))
    assert sorted(terms) == ["loss", "mse", "vb"] and all(v.shape == (0,) for v in terms.values())
    terms["loss"].mean().backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters() if p.requires_grad)
    for loop in (diffusion.p_sample_loop, diffusion.ddim_sample_loop):
        out = loop(model.forward_with_cfg, (0, 4, 4, 4), model_kwargs=dict(y=y, cfg_scale=4.0), device="cpu")
        assert out.shape == (0, 4, 4, 4)
    bpd = diffusion.calc_bpd_loop(model, x, model_kwargs=dict(y=y))
    assert bpd["total_bpd"].shape == (0,) and bpd["vb"].shape == (0, 3)


def test_timestep_samplers():
    diffusion = create_diffusion("")
    np.random.seed(0)
    t, w = create_named_schedule_sampler("uniform", diffusion).sample(64, "cpu")
    assert t.dtype == torch.int64 and 0 <= t.min() and t.max() < 1000 and torch.equal(w, torch.ones(64))
    assert isinstance(create_named_schedule_sampler("uniform", diffusion), UniformSampler)
    sampler = create_named_schedule_sampler("loss-second-moment", diffusion)
    assert isinstance(sampler, LossSecondMomentResampler) and np.all(sampler.weights() == 1)
    losses = np.arange(1, 1001, dtype=np.float64)
    for _ in range(10):
        sampler.update_with_all_losses(list(range(1000)), list(losses))
    w = sampler.weights()
    np.testing.assert_allclose(w, 0.999 * losses / losses.sum() + 0.001 / 1000)
    with pytest.raises(ValueError, match="name"):
        create_named_schedule_sampler("nope", diffusion)


def test_one_step_respacing_constructs():
    # DiT constructs a 1-step process too (its tables that need two steps stay empty).
    assert create_diffusion("1").num_timesteps == 1
