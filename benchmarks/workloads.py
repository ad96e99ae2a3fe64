"""The end-to-end workloads: DiT models in four implementations and DiT's CFG sampling loop
(the training step timed is fastdit.train.TrainStep itself, see profile_step.py).

Implementations (same weights per seed, same batch, bf16 autocast):
  eager            fastdit.reference_model.ReferenceDiT: the official architecture, SDPA attention
  compile          torch.compile(ReferenceDiT)
  fastdit          fastdit.models.DiT with the backend in force (FASTDIT_BACKEND, default auto)
  fastdit+compile  torch.compile(fastdit.models.DiT)

Forward FLOPs are counted analytically by fastdit.complexity, 2 per multiply-add (so DiT-XL/2 at
256^2 is ~237 GFLOPs per image: the paper's 118.6 "Gflops" count a multiply-add once; `fastdit info`
prints both); tests cross-check the count against torch.utils.flop_counter.FlopCounterMode.
"""

import contextlib
import functools
import time

import torch

from benchmarks import cases, harness
from fastdit.complexity import forward_macs
from fastdit.diffusion import create_diffusion
from fastdit.models import CONFIGS, DiT
from fastdit.reference_model import ReferenceDiT

IMPLS = ("eager", "compile", "fastdit", "fastdit+compile")
IMPL_LABELS = {
    "eager": "reference eager",
    "compile": "torch.compile(reference)",
    "fastdit": "fastdit",
    "fastdit+compile": "torch.compile(fastdit)",
}
COMPILED = ("compile", "fastdit+compile")

NUM_CLASSES = 1000
IN_CHANNELS = 4  # SD-VAE latents: 8x downsampled, 4 channels
CFG_SCALE = 4.0
EMA_DECAY = 0.9999
SAMPLERS = {cases.SAMPLER: cases.SAMPLER_STEPS, "ddim": 50}  # sampler -> steps of the published setups

# (model, image resolution, training batch per GPU, sampling batch: conditional images, each with
# an unconditional twin, so the model sees twice this batch). One batch for every implementation.
# The headline case first; the device check's quick mode runs it alone.
HEADLINE_CASE = (cases.MODEL, cases.RESOLUTION, cases.TRAIN_BATCH, cases.SAMPLE_BATCH)
CASES_FULL = [HEADLINE_CASE, ("DiT-B/2", 256, 64, 64), ("DiT-XL/2", 512, 16, 16)]
CASES_QUICK = [HEADLINE_CASE]
# Smoke mode keeps the names (so every report path runs) on a tiny stand-in of each model; its
# rows say so (`stand_in`), and the report labels them as stand-ins wherever it names the model.
SMOKE_CONFIG = {"depth": 2, "hidden_size": 64, "num_heads": 4, "latent": 8, "train_batch": 4, "sample_batch": 2}
SMOKE_TIMED_STEPS = 2  # sampling steps actually run in smoke mode (then extrapolated)
QUICK_TIMED_STEPS = 10  # in quick mode


def cases():
    """[(model, resolution, train batch, sample batch)] this mode runs (smoke: stand-in batches)."""
    if harness.SMOKE:
        return [(m, r, SMOKE_CONFIG["train_batch"], SMOKE_CONFIG["sample_batch"]) for m, r, _, _ in CASES_QUICK]
    return CASES_QUICK if harness.QUICK else CASES_FULL


def config(model, resolution):
    """The architecture run for `model` at `resolution`: dict(depth, hidden_size, num_heads,
    patch_size, latent); in smoke mode the tiny stand-in with the model's patch size."""
    size, patch = model.removeprefix("DiT-").split("/")
    if harness.SMOKE:
        return {
            **{k: SMOKE_CONFIG[k] for k in ("depth", "hidden_size", "num_heads", "latent")},
            "patch_size": int(patch),
        }
    depth, hidden, heads = CONFIGS[size]
    return {
        "depth": depth,
        "hidden_size": hidden,
        "num_heads": heads,
        "patch_size": int(patch),
        "latent": resolution // 8,
    }


def describe(cfg):
    stand_in = "smoke stand-in: " if harness.SMOKE else ""
    return (
        f"{stand_in}depth {cfg['depth']}, D {cfg['hidden_size']}, {cfg['num_heads']} heads, "
        f"patch {cfg['patch_size']}, latent {cfg['latent']}x{cfg['latent']}"
    )


def forward_flops(depth, hidden_size, num_heads, patch_size, latent, mlp_ratio=4.0, learn_sigma=True):
    """FLOPs (2 per multiply-add) of one image's DiT forward: every GEMM and attention product
    (twice fastdit.complexity's count, which is the paper's Gflops)."""
    config = dict(
        input_size=latent,
        patch_size=patch_size,
        in_channels=IN_CHANNELS,
        hidden_size=hidden_size,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        learn_sigma=learn_sigma,
        num_classes=NUM_CLASSES,
    )
    return 2 * forward_macs(config)


def _randomise_zero_init(model, seed):
    """adaLN-Zero starts gates and the output layer at zero; benchmarks never time zeros."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build(impl, cfg, device=None):
    """The model of implementation `impl` (uncompiled), on `device`, same weights for every impl."""
    device = device or harness.DEVICE
    cls = ReferenceDiT if impl in ("eager", "compile") else DiT
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(
            input_size=cfg["latent"],
            patch_size=cfg["patch_size"],
            in_channels=IN_CHANNELS,
            hidden_size=cfg["hidden_size"],
            depth=cfg["depth"],
            num_heads=cfg["num_heads"],
            num_classes=NUM_CLASSES,
        )
    _randomise_zero_init(model, seed=1)
    return model


def maybe_compile(fn, impl):
    return torch.compile(fn) if impl in COMPILED else fn


def autocast():
    return torch.autocast(device_type=harness.DEVICE, dtype=torch.bfloat16)


@functools.cache
def _respaced(steps):
    """create_diffusion(str(steps)), made once: its tables reach the GPU on first use, not every run."""
    return create_diffusion(str(steps))


class Sampler:
    """DiT's sample.py loop: n latents with class labels plus their unconditional twins (label
    NUM_CLASSES), model.forward_with_cfg at scale 4, in bf16 autocast."""

    def __init__(self, model, impl, cfg, n):
        device = harness.DEVICE
        model.eval()
        self.forward = maybe_compile(model.forward_with_cfg, impl)
        z = torch.randn(n, IN_CHANNELS, cfg["latent"], cfg["latent"], device=device)
        self.z = torch.cat([z, z])  # (2n, C, h, w)
        y = torch.randint(0, NUM_CLASSES, (n,), device=device)
        self.y = torch.cat([y, torch.full_like(y, NUM_CLASSES)])  # (2n,)

    def __call__(self, sampler, steps):
        diffusion = _respaced(steps)
        loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
        with autocast():
            return loop(
                self.forward, self.z.shape, self.z, clip_denoised=False,
                model_kwargs=dict(y=self.y, cfg_scale=CFG_SCALE), progress=False, device=self.z.device,
            )  # fmt: skip


def sync():
    if harness.DEVICE == "cuda":
        torch.cuda.synchronize()


def timed_first_call(fn):
    """Seconds of fn's first call (for the compiled implementations: mostly compilation)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


@contextlib.contextmanager
def peak_memory():
    """Yields a dict that holds, after the block, the peak and the resident GiB allocated in it."""
    stats = {"peak_mem_gib": None, "static_mem_gib": None}
    if harness.DEVICE == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        stats["static_mem_gib"] = torch.cuda.memory_allocated() / 2**30
    yield stats
    if harness.DEVICE == "cuda":
        sync()
        stats["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30


@contextlib.contextmanager
def cpu_threads_for_smoke():
    """One intra-op thread on CPU: smoke shapes gain nothing from threads, and on a shared runner
    the threads' contention made a tiny training step 10-50x slower (measured)."""
    if harness.DEVICE != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def is_oom(exc):
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def release():
    """Free what the last workload left: compiled graphs, cached blocks."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if harness.DEVICE == "cuda":
        torch.cuda.empty_cache()
