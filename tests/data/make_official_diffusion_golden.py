"""Generate tests/data/official_diffusion_golden.pt from the official DiT diffusion code.

    python tests/data/make_official_diffusion_golden.py /path/to/DiT  [--out tests/data/official_diffusion_golden.pt]

/path/to/DiT is a directory holding the official `diffusion/` package (facebookresearch/DiT:
diffusion/__init__.py, gaussian_diffusion.py, respace.py, diffusion_utils.py; they need only numpy
and torch). It is imported from there and never committed here. The committed fixture was made
from facebookresearch/DiT at commit OFFICIAL_COMMIT (below; its diffusion/ is unchanged since the
initial commit), on CPU, with the torch version recorded in
the fixture's metadata. On that machine fastdit reproduced every number bit for bit.

The cases below are also what tests/test_diffusion.py runs against fastdit: each case takes a
`create_diffusion` function and returns named tensors, so the official and fastdit results come
from the same inputs, model and random seed. Sampling cases pass noise=None and device=None so the
order of torch.randn draws (initial noise, then one draw per step) is part of what is compared.
"""

import argparse
import contextlib
import importlib
import math
import sys

import torch

OFFICIAL_COMMIT = "ed81ce2229091fd4ecc9a223645f95cf379d582b"
C, H, W, NUM_CLASSES = 3, 8, 8, 4


class ToyModel(torch.nn.Module):
    """A tiny deterministic stand-in for DiT: a 1x1 conv of x plus a timestep and class embedding.

    Returns C channels, or 2C with learn_sigma (mean part unbounded, variance part in (-1, 1)).
    Depends on t through sin(t / 100 * freq), so a wrong timestep mapping changes the output.
    Computes in x's dtype (float32 or float64); returns the output in `output_format` (a
    torch.memory_format) when given, as a channels-last network would.
    """

    def __init__(self, learn_sigma=True, output_format=None):
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        out = 2 * C if learn_sigma else C
        self.learn_sigma, self.output_format = learn_sigma, output_format
        self.weight = torch.nn.Parameter(torch.randn(out, C, generator=g) / math.sqrt(C))
        self.freq = torch.nn.Parameter(torch.randn(out, generator=g))
        self.class_emb = torch.nn.Parameter(0.3 * torch.randn(NUM_CLASSES, out, generator=g))

    def forward(self, x, t, y):
        w, freq, emb = (p.to(x.dtype) for p in (self.weight, self.freq, self.class_emb))
        h = (w[None, :, :, None, None] * x[:, None]).sum(2)  # (B, out, H, W)
        h = h + torch.sin(t.to(x.dtype)[:, None] / 100 * freq)[..., None, None] + emb[y][..., None, None]
        if self.learn_sigma:
            h = torch.cat([h[:, :C], torch.tanh(h[:, C:])], dim=1)
        return h if self.output_format is None else h.contiguous(memory_format=self.output_format)


def cond_fn(x, t, y):
    """A stand-in classifier gradient: depends on x, the (mapped) timestep and the class."""
    return -0.05 * x + 0.01 * torch.cos(t.to(x.dtype))[:, None, None, None] * (y.to(x.dtype) + 1)[:, None, None, None]


def denoised_fn(x0):
    return 0.9 * x0


def _inputs(batch, num_steps, dtype=torch.float32):
    """x_start on the 256-level grid of [-1, 1] (edge bins included), timesteps spanning [0, num_steps), noise, y."""
    g = torch.Generator().manual_seed(99)
    x_start = (torch.randint(0, 256, (batch, C, H, W), generator=g).to(dtype) / 127.5 - 1).to(dtype)
    t = torch.linspace(0, num_steps - 1, batch).round().long()
    noise = torch.randn(batch, C, H, W, generator=g).to(dtype)
    y = torch.arange(batch) % NUM_CLASSES
    return x_start, t, noise, y


def _training_case(create_kwargs, dtype=torch.float32, draw_noise=False):
    def run(create_diffusion):
        diffusion = create_diffusion(**create_kwargs)
        model = ToyModel(learn_sigma=create_kwargs.get("learn_sigma", True))
        x_start, t, noise, y = _inputs(5, diffusion.num_timesteps, dtype)
        torch.manual_seed(7)
        terms = diffusion.training_losses(model, x_start, t, dict(y=y), noise=None if draw_noise else noise)
        terms["loss"].sum().backward()
        out = {k: v.detach() for k, v in terms.items()}
        out.update({f"grad_{name}": p.grad for name, p in model.named_parameters()})
        return out

    return run


def _sampling_case(
    create_kwargs, loop="p_sample_loop", dtype=torch.float32, noise_format=None, output_format=None, **loop_kwargs
):
    """noise_format, output_format: memory formats of the given noise and of the model's output. A tensor's
    layout decides the layout of what is computed from it, and torch.randn_like draws in the layout of
    its argument (the previous step's sample), so layouts are part of "the same samples"."""

    def run(create_diffusion):
        diffusion = create_diffusion(**create_kwargs)
        model = ToyModel(learn_sigma=create_kwargs.get("learn_sigma", True), output_format=output_format)
        y = torch.tensor([1, 3])
        torch.manual_seed(2024)
        noise = None
        if dtype != torch.get_default_dtype() or noise_format is not None:
            noise = torch.randn(2, C, H, W, dtype=dtype).contiguous(
                memory_format=noise_format or torch.contiguous_format
            )
        sample = getattr(diffusion, loop)(model, (2, C, H, W), noise=noise, model_kwargs=dict(y=y), **loop_kwargs)
        # What the generator draws next proves the sampler drew exactly as many numbers.
        return {"sample": sample, "next_draw": torch.randn(4)}

    return run


@contextlib.contextmanager
def default_dtype(dtype):
    """torch.set_default_dtype(dtype) inside the block, restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _under_default_float64(case):
    """`case` run under torch.set_default_dtype(torch.float64). DiT's coefficient tensors are the float32
    values plus torch.zeros of the default dtype: float64 there, so float32 inputs give float64 results."""

    def run(create_diffusion):
        with default_dtype(torch.float64):
            return case(create_diffusion)

    return run


def _ddim_reverse_case(run_create):
    diffusion = run_create(timestep_respacing="ddim10")
    model = ToyModel()
    x, t, _, y = _inputs(4, diffusion.num_timesteps)
    out = diffusion.ddim_reverse_sample(model, x, t, clip_denoised=False, model_kwargs=dict(y=y))
    return {"sample": out["sample"], "pred_xstart": out["pred_xstart"]}


def _bpd_case(run_create):
    diffusion = run_create(timestep_respacing="", diffusion_steps=40)
    x_start, _, _, y = _inputs(2, 40)
    torch.manual_seed(11)
    return diffusion.calc_bpd_loop(ToyModel(), x_start, model_kwargs=dict(y=y))


def _schedules_case(run_create):
    """Float64 schedules (every 7th step, to keep the fixture small) and kept steps of a few processes."""
    out = {}
    for name, kwargs in {
        "linear": dict(timestep_respacing=""),
        "cosine": dict(timestep_respacing="", noise_schedule="squaredcos_cap_v2"),
        "linear_50": dict(timestep_respacing="", diffusion_steps=50),
        "respaced_250": dict(timestep_respacing="250"),
        "respaced_27": dict(timestep_respacing="27"),
        "sections": dict(timestep_respacing="7,0,13,4"),
        "ddim50": dict(timestep_respacing="ddim50"),
        "ddim7": dict(timestep_respacing="ddim7", diffusion_steps=100),
    }.items():
        diffusion = run_create(**kwargs)
        for attr in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped"):
            out[f"{name}_{attr}"] = torch.from_numpy(getattr(diffusion, attr)[::7].copy())
        out[f"{name}_timestep_map"] = torch.tensor(diffusion.timestep_map, dtype=torch.int32)
    return out


_ALL = dict(timestep_respacing="")
CASES = {
    # training_losses: loss types x mean types x variance types, spaced training, float64, drawn noise
    "train_hybrid": _training_case(_ALL),
    "train_hybrid_drawn_noise": _training_case(_ALL, draw_noise=True),
    "train_rescaled_mse": _training_case(dict(_ALL, rescale_learned_sigmas=True)),
    "train_xstart": _training_case(dict(_ALL, predict_xstart=True)),
    "train_fixed_large": _training_case(dict(_ALL, learn_sigma=False)),
    "train_kl_learned": _training_case(dict(_ALL, use_kl=True)),
    "train_kl_fixed_small": _training_case(dict(_ALL, use_kl=True, learn_sigma=False, sigma_small=True)),
    "train_kl_fixed_large": _training_case(dict(_ALL, use_kl=True, learn_sigma=False)),
    "train_cosine": _training_case(dict(_ALL, noise_schedule="squaredcos_cap_v2")),
    "train_spaced": _training_case(dict(timestep_respacing="10")),
    # the loss rescalings by num_timesteps: the spaced count, not 1000 (where they would be no-ops)
    "train_rescaled_mse_spaced": _training_case(dict(timestep_respacing="25", rescale_learned_sigmas=True)),
    "train_kl_ddim_spaced": _training_case(dict(timestep_respacing="ddim25", use_kl=True, diffusion_steps=500)),
    "train_float64": _training_case(_ALL, dtype=torch.float64),
    # sampling from torch.manual_seed with noise=None: DDPM, DDIM, respacing, guidance hooks
    "ddpm_50": _sampling_case(dict(_ALL, diffusion_steps=50)),
    "ddpm_respaced_10": _sampling_case(dict(timestep_respacing="10")),
    "ddpm_sections": _sampling_case(dict(timestep_respacing="3,5,2", diffusion_steps=100)),
    "ddpm_fixed_large": _sampling_case(dict(_ALL, diffusion_steps=50, learn_sigma=False)),
    "ddpm_fixed_small_xstart": _sampling_case(
        dict(_ALL, diffusion_steps=50, learn_sigma=False, sigma_small=True, predict_xstart=True)
    ),
    "ddpm_cosine": _sampling_case(dict(timestep_respacing="10", noise_schedule="squaredcos_cap_v2")),
    "ddpm_cond_denoised": _sampling_case(dict(timestep_respacing="10"), cond_fn=cond_fn, denoised_fn=denoised_fn),
    "ddpm_float64_noise": _sampling_case(dict(timestep_respacing="10"), dtype=torch.float64),
    "ddim_10_eta0": _sampling_case(dict(timestep_respacing="ddim10"), loop="ddim_sample_loop"),
    "ddim_10_eta05": _sampling_case(dict(timestep_respacing="ddim10"), loop="ddim_sample_loop", eta=0.5),
    # DiT's sample.py samples with clip_denoised=False (the toy model's x_0 guesses then reach ~1e3).
    "ddim_noclip": _sampling_case(dict(timestep_respacing="ddim10"), loop="ddim_sample_loop", clip_denoised=False),
    "ddim_cond": _sampling_case(dict(timestep_respacing="ddim10"), loop="ddim_sample_loop", eta=0.5, cond_fn=cond_fn),
    # channels-last noise (DiT's sample.py otherwise), and a channels-last network predicting x_0
    "ddpm_noise_channels_last": _sampling_case(
        dict(timestep_respacing="10"), noise_format=torch.channels_last, clip_denoised=False
    ),
    "ddpm_xstart_output_channels_last": _sampling_case(
        dict(timestep_respacing="10", predict_xstart=True), output_format=torch.channels_last
    ),
    # under torch.set_default_dtype(torch.float64), with float32 data
    "train_hybrid_default_float64": _under_default_float64(_training_case(_ALL)),
    "ddim_eta05_default_float64": _under_default_float64(
        _sampling_case(dict(timestep_respacing="ddim10"), loop="ddim_sample_loop", eta=0.5, dtype=torch.float32)
    ),
    "ddim_reverse": _ddim_reverse_case,
    "calc_bpd_loop": _bpd_case,
    "schedules": _schedules_case,
}


def run_cases(create_diffusion, names=None):
    """{case: {key: tensor}} for the named cases (all by default), on CPU."""
    return {name: {k: v.detach().cpu() for k, v in CASES[name](create_diffusion).items()} for name in (names or CASES)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("official_root", help="directory holding the official DiT `diffusion` package")
    parser.add_argument("--out", default="tests/data/official_diffusion_golden.pt")
    parser.add_argument("--commit", default=OFFICIAL_COMMIT, help="the official commit the files come from")
    args = parser.parse_args()
    sys.path.insert(0, args.official_root)
    official = importlib.import_module("diffusion")
    results = run_cases(official.create_diffusion)
    meta = {"official_commit": args.commit, "torch": str(torch.__version__), "module": official.__file__}
    torch.save({"meta": meta, "cases": results}, args.out)
    print(f"wrote {len(results)} cases to {args.out}: {meta}")


if __name__ == "__main__":
    main()
