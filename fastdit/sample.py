"""`fastdit sample` (an image grid, its classes labelled) and `fastdit sample-ddp` (an ADM-format .npz
for FID tools), as DiT's scripts.

Both rebuild the model from the config stored in a fastdit checkpoint (its EMA weights), or take
an official DiT checkpoint with --model and --image-size. Latent models are decoded with the VAE
recorded in the checkpoint (or --vae). The random draws follow DiT's sample.py / sample_ddp.py:
seed, then the model is built, then z ~ N(0, I) (doubled with the null class under CFG).
"""

import argparse
import functools
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import _args, pretrained
from ._dist import init_distributed
from ._parts import Parts
from ._registry import check_input_fits, model_from_checkpoint, model_name
from ._signals import StopSignals, reworded
from ._util import (
    IMAGE_FORMATS,
    MAX_GRID_SIDE,
    PRECISION_DTYPES,
    UsageError,
    amp_forward,
    as_rgb,
    atomic_write,
    find_checkpoint,
    grid_limits,
    load_plain,
    save_grid,
    tf32,
    to_uint8,
)
from .checkpoint import CheckpointError
from .vae import SD_VAES, VAE_FORMAT, load_vae, load_vae_record

DIT_SAMPLE_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT sample.py's ImageNet classes


def sampling_diffusion(sampler, steps, learn_sigma=True, diffusion_steps=1000):
    """DDPM respaced to `steps` steps, or DDIM with `steps` steps (DiT's timestep_respacing strings)."""
    from .diffusion import create_diffusion

    if sampler not in ("ddpm", "ddim"):
        raise UsageError(f"--sampler must be ddpm or ddim, got {sampler!r}")
    if not 2 <= steps <= diffusion_steps:  # one respaced step has no posterior variance to sample with
        raise UsageError(f"--steps must be in [2, {diffusion_steps}] (the model's diffusion steps), got {steps}")
    spacing = f"ddim{steps}" if sampler == "ddim" else str(steps)
    try:
        return create_diffusion(timestep_respacing=spacing, learn_sigma=learn_sigma, diffusion_steps=diffusion_steps)
    except ValueError as e:  # DDIM: only step counts that an integer stride makes (DiT's respacing)
        raise UsageError(f"--steps {steps}: {e}") from e


def grid_labels(num_classes, input_size, per_class=None, classes=None):
    """Labels of a sample grid and its row length: a row per class of `classes` (default: at most 10; DiT's 8
    ImageNet classes for 1000-class models), per_class images each (default 10 for small images, else 4;
    DiT's default grid: one each).

    An unconditional model (num_classes 0) gets the number of images instead: 10 rows of per_class
    images, or 2 rows for large images."""
    small = input_size <= 32
    if num_classes == 1000 and per_class is None and classes is None:
        return DIT_SAMPLE_LABELS, 4
    per_class = per_class or (10 if small else 4)
    if num_classes == 0:
        return (10 if small else 2) * per_class, per_class
    if classes is None:
        classes = DIT_SAMPLE_LABELS if num_classes == 1000 else range(min(num_classes, 10))
    return [c for c in classes for _ in range(per_class)], per_class


def check_grid_fits(loaded, per_class, classes):
    """Refuse (UsageError), before any sampling, a grid of --per-class images a row (or of --classes rows)
    that cannot be written: larger than MAX_GRID_SIDE pixels a side."""
    model, names = loaded.model, loaded.classes
    rows, _ = grid_labels(model.num_classes, model.x_embedder.img_size[0], 1, classes)  # one image a row
    captions = [names[c] if names else c for c in rows] if model.num_classes else ()
    h, w = decoded_size(loaded)
    max_rows, max_per_row = grid_limits(h, w, captions)
    limit = f"a grid image is at most {MAX_GRID_SIDE:,} pixels a side (libjpeg's limit)"
    if per_class is not None and per_class > max_per_row:
        raise UsageError(f"--per-class {per_class}: at most {max_per_row} for {h}x{w} images: {limit}")
    if classes is not None and len(classes) > max_rows:
        raise UsageError(f"--classes: at most {max_rows} rows of {h}x{w} images, got {len(classes)}: {limit}")


def has_null_class(model):
    """Whether the model was built for classifier-free guidance (label dropout trains its null class)."""
    return model.y_embedder is not None and model.y_embedder.dropout_prob > 0


@torch.no_grad()
def generate(
    model,
    labels,
    *,
    cfg_scale,
    cfg_channels="paper",
    sampler="ddpm",
    steps=250,
    seed=None,
    device="cpu",
    z=None,
    use_cfg=None,
    codec=None,
    precision="fp32",
    diffusion_steps=1000,
    compile=False,
    cuda_graphs=False,
    progress=False,
):
    """Images (N, C, H, W) in [-1, 1], one per label, sampled from `model` (in eval mode).

    labels: class labels, or for an unconditional model (num_classes 0) the number of images.
    seed None continues the current torch RNG (DiT's scripts seed before building the model);
    z: the initial noise (default: drawn here). use_cfg (default: cfg_scale > 1, as DiT's
    sample_ddp.py; DiT's sample.py always uses it) doubles the batch with the null class and
    guides cfg_channels ('paper': the first 3 channels, DiT's; 'all'). Pixel-space samples are
    clipped to [-1, 1] at every step; latents are not (DiT's clip_denoised=False) and are
    decoded with `codec`. To sample many batches, build one Sampler and call it per batch.
    """
    run = Sampler(
        model,
        cfg_scale=cfg_scale,
        cfg_channels=cfg_channels,
        sampler=sampler,
        steps=steps,
        use_cfg=use_cfg,
        clip_denoised=codec is None,
        precision=precision,
        diffusion_steps=diffusion_steps,
        compile=compile,
        cuda_graphs=cuda_graphs,
        device=device,
    )
    if seed is not None:
        torch.manual_seed(seed)
    return to_images(run(labels, z=z, progress=progress), codec)


def to_images(samples, codec):
    """Sampled latents decoded by `codec`, or sampled pixels clamped to [-1, 1]."""
    return codec.decode(samples) if codec is not None else samples.clamp(-1, 1)


class Sampler:
    """DiT's sampling loop (sample.py / sample_ddp.py) for one model and setting, built once and called
    per batch: sampler(labels, z=None) -> samples (N, C, H, W), before decoding or clamping.

    Each call runs the denoising step -- the model (with CFG: both halves in one batch, then the
    guidance combine) and the DDPM or DDIM update, noise included -- once per timestep on static
    buffers: x and the timesteps t are updated in place. The draws and arithmetic are those of
    p_sample_loop / ddim_sample_loop, so a seed gives the same samples.

    device (default: the model's). cuda_graphs (default: on CUDA): the step is captured once per batch shape into a CUDA graph and
    replayed for every step and every later batch of that shape: the host launches one graph per
    step instead of every kernel of the forward and the update (hundreds for DiT-XL/2's 28 blocks),
    so the GPU never waits on Python between kernels. compile: torch.compile of the model, once; with graphs
    its kernels are captured too. Both are kept for the Sampler's lifetime: the batches of
    `fastdit sample-ddp` reuse one capture and one compilation.
    """

    def __init__(
        self,
        model,
        *,
        cfg_scale,
        cfg_channels="paper",
        sampler="ddpm",
        steps=250,
        use_cfg=None,
        clip_denoised=True,
        precision="fp32",
        diffusion_steps=1000,
        compile=False,
        cuda_graphs=None,
        device=None,
    ):
        # device None: the model's (a Sampler of a CUDA model samples on CUDA, with graphs by default)
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if cuda_graphs and self.device.type != "cuda":
            raise UsageError("--cuda-graphs needs a CUDA device (this run is on the CPU)")
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.diffusion = sampling_diffusion(sampler, steps, model.learn_sigma, diffusion_steps)
        self.guided = (cfg_scale > 1 and model.y_embedder is not None) if use_cfg is None else use_cfg
        if self.guided and not has_null_class(model):
            raise UsageError(
                "classifier-free guidance needs a model trained with label dropout (it has no null "
                "class): use --cfg-scale 1"
            )
        if self.guided:
            fn, self.kwargs = model.forward_with_cfg, dict(cfg_scale=cfg_scale, cfg_channels=cfg_channels)
        else:
            fn, self.kwargs = model.forward, {}
        self.model_fn = amp_forward(torch.compile(fn) if compile else fn, self.device.type, PRECISION_DTYPES[precision])
        self.update = self.diffusion.ddim_sample if sampler == "ddim" else self.diffusion.p_sample
        self.clip_denoised = clip_denoised
        self.loops = {}  # batch shape -> _Loop: static buffers and, with graphs, the captured step

    @torch.no_grad()
    def __call__(self, labels, z=None, progress=False):
        """labels: class labels, one image each; for an unconditional model (num_classes 0) the number of images."""
        model = self.model
        conditional = model.y_embedder is not None
        if conditional == isinstance(labels, int):
            raise UsageError(
                "an unconditional model samples a number of images, not class labels"
                if not conditional
                else f"the model is class-conditional ({model.num_classes} classes): give labels"
            )
        y = torch.as_tensor(labels, device=self.device) if conditional else None
        if z is None:
            z = torch.randn(
                len(y) if conditional else labels, model.in_channels, *model.x_embedder.img_size, device=self.device
            )
        if self.guided:  # the unconditional twins: the same noise, the null class
            z = torch.cat([z, z], 0)
            y = torch.cat([y, torch.full_like(y, model.y_embedder.num_classes)], 0)
        was_training = model.training
        model.eval()
        try:
            key = (tuple(z.shape), z.dtype, y.dtype if conditional else None)
            if key not in self.loops:
                self.loops[key] = _Loop(self, z, y)
            samples = self.loops[key].run(z, y, progress)
        finally:
            model.train(was_training)
        return samples.chunk(2, dim=0)[0] if self.guided else samples  # drop the null-class half

    def denoise(self, x, t, y):
        """One denoising step x_t -> x_{t-1} (x, t: the respaced process's), as the sampling loops take it."""
        out = self.update(self.model_fn, x, t, clip_denoised=self.clip_denoised, model_kwargs=dict(y=y, **self.kwargs))
        return out["sample"]


class _Loop:
    """The sampling loop of one batch shape on static buffers (x, t, y), optionally as a replayed CUDA graph."""

    def __init__(self, sampler, z, y):
        self.sampler = sampler
        self.x, self.y = z.clone(), (y.clone() if y is not None else None)  # y None: an unconditional model
        self.t = torch.zeros(len(z), dtype=torch.long, device=z.device)
        self.graph = self._capture() if sampler.cuda_graphs else None

    def step(self):
        self.x.copy_(self.sampler.denoise(self.x, self.t, self.y))

    def _capture(self):
        """Warm up (lazy initialisation, Triton autotuning, attention's backend choice) on a side stream,
        with the RNG state restored so the warm-up's noise draws leave the random stream as it was;
        then capture one step. Replays draw their noise from the generator's current state, as eager
        steps would, so graphs change no sample.

        The capture restricts only this thread's CUDA calls (thread_local, as torch.compile's graphs do):
        FID in training samples while the data loader's pin-memory thread may call cudaHostAlloc, which
        under the default (global) mode fails the capture and that thread's next batch."""
        device = self.x.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.random.fork_rng(devices=[device]), torch.cuda.stream(side):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.step()
        return graph

    def run(self, z, y, progress):
        self.x.copy_(z)
        if y is not None:
            self.y.copy_(y)
        indices = range(self.sampler.diffusion.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        for i in indices:
            self.t.fill_(i)
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
        return self.x.clone()


def cast_gemm_weights(model, dtype):
    """Store the weights of every GEMM (linear layers, the patch embedding) in `dtype`, for sampling under
    autocast to `dtype`: the same values autocast would feed the GEMMs (one rounding of the same fp32
    weights), so the same samples, without re-casting every weight at every step (DiT-XL/2: 675M
    parameters, 4 GB of reads and writes per step) and with half their memory. Embeddings, the
    position embedding and the timestep frequencies keep their precision. Returns the model."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) or module is model.x_embedder.proj:
            module.to(dtype)
    return model


#################################################################################
#                       Loading a model for sampling                            #
#################################################################################


@dataclass
class Loaded:
    """What sampling needs from a checkpoint."""

    model: torch.nn.Module  # in eval mode
    codec: object  # the VAE decoding latents, or None (pixel space)
    classes: list  # class names, or None: their numbers
    diffusion_steps: int  # of the training diffusion (DiT: 1000)
    name: str  # the model's config name, e.g. DiT-XL/2 (None: not recorded)


def load_sampler_model(ckpt, model=None, image_size=None, num_classes=None, vae=None, weights="ema", device="cpu"):
    """A Loaded model (eval mode), its VAE and classes, from a fastdit checkpoint (or run folder), or an
    official one with --model/--image-size.

    Call after seeding: building the model draws its initial weights (as DiT's sample.py does).
    """
    if Path(ckpt).is_dir():
        ckpt = find_checkpoint(ckpt, "--ckpt")
    obj = load_plain(ckpt, "--ckpt")
    ours = isinstance(obj, dict) and "model_config" in obj
    if isinstance(obj, dict) and obj.get("format") == VAE_FORMAT:
        raise UsageError(
            f"--ckpt {ckpt} is a VAE (from fastdit vae), not a DiT: give it as --vae, a DiT checkpoint as --ckpt"
        )
    if ours:
        _check_agrees_with_checkpoint(obj, ckpt, model=model, image_size=image_size, num_classes=num_classes)
        if vae is not None and obj.get("vae") is None:  # a VAE would "decode" its images into noise
            raise UsageError(
                f"--vae {vae}: {ckpt} is a pixel-space model (trained without a VAE; its samples are images): "
                f"leave --vae out"
            )
    else:
        if model is None or image_size is None:
            raise UsageError(
                f"{ckpt} holds no model config (an official DiT checkpoint?): give --model and --image-size"
            )
        if image_size % 8:
            raise UsageError(
                f"--image-size {image_size} must be divisible by 8 (official DiT models sample SD-VAE latents)"
            )
        check_input_fits(model, image_size, image_size // 8)
        if vae is None:
            raise UsageError(
                "official DiT checkpoints generate SD-VAE latents: give --vae ema (or mse, as DiT's "
                "sample.py), or a local folder with those diffusers AutoencoderKL weights"
            )
    # A fastdit checkpoint builds the model it records (the flags agree, checked above); an official one --model's.
    official = {} if ours else dict(input_size=image_size // 8, num_classes=num_classes or 1000)
    try:
        net = model_from_checkpoint(obj, str(ckpt), None if ours else model, weights, **official)
    except CheckpointError as e:
        raise UsageError(f"--ckpt: {e}") from e
    record = obj.get("vae") if ours else None
    codec = None
    if record is not None:  # the VAE the model was trained with (or `vae`, a copy with the same weights)
        codec = load_vae_record(record, device, name=vae)
    elif vae is not None:
        codec = load_vae(vae, device)
        if codec.latent_channels != net.in_channels:
            raise UsageError(
                f"--vae {vae} makes {codec.latent_channels}-channel latents, but the model takes "
                f"{net.in_channels} channels"
            )
    return Loaded(
        net.to(device),
        codec,
        obj.get("classes") if ours else None,
        obj["args"].get("diffusion_steps", 1000) if ours else 1000,
        obj.get("model_name") if ours else model,
    )


def decoded_size(loaded):
    """(H, W) of the images a Loaded model samples (its latents decoded)."""
    factor = loaded.codec.factor if loaded.codec else 1
    return tuple(s * factor for s in loaded.model.x_embedder.img_size)


def _check_agrees_with_checkpoint(obj, ckpt, **given):
    """A fastdit checkpoint records its model: --model, --image-size or --num-classes given as well must agree."""
    recorded = dict(
        model=obj.get("model_name"),
        image_size=obj.get("args", {}).get("image_size"),
        num_classes=obj["model_config"].get("num_classes"),
    )
    for key, value in given.items():
        if value is not None and recorded[key] is not None and value != recorded[key]:
            raise UsageError(
                f"--{key.replace('_', '-')} {value} contradicts {ckpt}, a fastdit checkpoint of {recorded[key]}: "
                f"leave the flag out (it is for official checkpoints)"
            )


def add_common_arguments(p):
    names = " or ".join(pretrained.PRETRAINED)
    p.add_argument(
        "--ckpt",
        help="fastdit checkpoint or run folder (its latest checkpoint), or an official DiT checkpoint "
        f"with --model and --image-size, or {names} (DiT's pretrained models: read from "
        f"{pretrained.FOLDER}/, downloaded there first if absent); default: the pretrained DiT-XL/2 "
        "of --image-size, as DiT's scripts",
    )
    p.add_argument(
        "--model",
        type=model_name,
        help="for official checkpoints: the DiT config name, e.g. DiT-XL/2; default: the checkpoint's "
        "(without --ckpt: DiT-XL/2)",
    )
    p.add_argument(
        "--image-size",
        type=_args.positive,
        help="for official checkpoints: 256 or 512; default: the checkpoint's (without --ckpt: 256)",
    )
    p.add_argument("--num-classes", type=_args.positive, help="for official checkpoints; default 1000")
    p.add_argument(
        "--vae",
        help="VAE for latent models: ema | mse | a hub id | a local diffusers AutoencoderKL folder | "
        "a fastdit VAE checkpoint; default: the one recorded in the checkpoint (another must "
        "have the same weights); for DiT's pretrained models mse (sample-ddp: ema), as DiT's scripts",
    )
    p.add_argument(
        "--weights", choices=["ema", "model"], default="ema", help="which weights of a fastdit checkpoint; default ema"
    )
    p.add_argument(
        "--cfg-scale",
        type=_args.number(),
        help="classifier-free guidance (1: none); default 4.0 (sample-ddp: 1.5, as DiT), 1 for a model without a null class",
    )
    p.add_argument(
        "--cfg-channels",
        choices=["paper", "all"],
        help="paper: guide the first 3 channels (DiT's); all; default paper with >= 3 channels, else all",
    )
    p.add_argument(
        "--sampler",
        choices=["ddpm", "ddim"],
        default="ddpm",
        help="ddpm (ancestral, DiT's) or ddim (deterministic); default ddpm",
    )
    p.add_argument(
        "--steps",
        "--num-sampling-steps",  # DiT's name
        type=_args.integer(2),
        default=250,
        help="sampling steps, at least 2, at most the model's diffusion steps; default 250",
    )
    p.add_argument(
        "--seed",
        "--global-seed",  # sample_ddp.py's name
        type=_args.seed,
        default=0,
        help="seed of the initial noise; default 0 (sample-ddp: rank r uses seed * world_size + r, as DiT)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="autocast dtype of the model; default fp32",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model for the sampling loop; default off")
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        help="capture the whole denoising step (model, guidance, update) once per batch shape in a CUDA "
        "graph and replay it for every step; default on with CUDA",
    )
    _args.add_tf32(p, default=True, when="on")
    _args.add_device(p)


def add_arguments(p):
    add_common_arguments(p)
    p.add_argument(
        "--classes",
        type=_args.int_list(0),
        help="comma-separated class labels, one grid row each; "
        "default: 0-9, or DiT's 8 ImageNet classes for "
        "1000-class models",
    )
    p.add_argument(
        "--per-class",
        type=_args.positive,
        help="samples per class (unconditional models: per row), at most what keeps the grid within 65,500 "
        "pixels a side (libjpeg's limit; 818 for the 8x8 digits); default 10 for small images, else 4",
    )
    p.add_argument(
        "--out",
        type=_args.output_file(tuple(IMAGE_FORMATS), "the grid"),
        help=f"image file to write, its format from its suffix ({', '.join(IMAGE_FORMATS)}); default "
        f"runs/samples/<checkpoint>-<sampler><steps>-cfg<scale>-seed<seed>.png",
    )


def add_ddp_arguments(p):
    add_common_arguments(p)
    p.add_argument(
        "--num-samples",
        "--num-fid-samples",  # DiT's name
        type=_args.positive,
        default=50_000,
        help="total samples; default 50000 (FID-50K)",
    )
    p.add_argument(
        "--per-proc-batch-size", type=_args.positive, default=32, help="images per process and batch; default 32"
    )
    p.add_argument(
        "--rgb",
        action="store_true",
        help="store grayscale samples as 3 identical channels (FID tools want RGB), in the .npz and in "
        "--sample-dir's PNGs alike; default off",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--sample-dir",  # DiT sample_ddp.py's
        type=_args.output_folder,
        help="DiT sample_ddp.py's layout instead of --out: every image as DIR/<name>/NNNNNN.png and the .npz as "
        "DIR/<name>.npz, <name> as DiT's: <model>-<checkpoint or pretrained>-size-<image size>-vae-<vae>-"
        "cfg-<scale>-seed-<seed>; default none (--out)",
    )
    where.add_argument(
        "--out",
        type=_args.output_file((".npz",), "the samples file"),
        help="the .npz to write (arr_0: uint8 (N, H, W, C), in DiT's order); until it is written, finished "
        "batches are kept in .<out>.parts/ beside it, and the same command continues from them after a crash; "
        "default runs/samples/<checkpoint>-<sampler><steps>-cfg<scale>-seed<seed>-n<num-samples>.npz",
    )


def default_out(args, cfg_scale, suffix):
    """runs/samples/<what was sampled and how>.<suffix>: the same command writes the same file."""
    ckpt = Path(args.ckpt).resolve()
    if ckpt.is_dir():
        ckpt = find_checkpoint(ckpt, "--ckpt")
    name = f"{ckpt.parent.parent.name}-{ckpt.stem}" if ckpt.parent.name == "checkpoints" else ckpt.stem
    return str(Path("runs") / "samples" / f"{name}-{args.sampler}{args.steps}-cfg{cfg_scale:g}-seed{args.seed}{suffix}")


def use_pretrained(args, dist, default_vae):
    """Where --ckpt is absent or names one of DiT's pretrained checkpoints (fastdit.pretrained): set
    args.ckpt to its local file (each node's local rank 0 downloads it, the others wait) and fill in
    --model, --image-size and --vae (default_vae: the default of the DiT script this command mirrors)."""
    if args.ckpt is None:
        name = pretrained.name_for(args.model or "DiT-XL/2", args.image_size or 256)
    else:
        name = pretrained.named(args.ckpt)
    if name is None:
        return
    model, image_size = pretrained.PRETRAINED[name]
    for flag, given, wanted in (("--model", args.model, model), ("--image-size", args.image_size, image_size)):
        if given not in (None, wanted):
            raise UsageError(f"{flag} {given} contradicts {name}, DiT's pretrained {model} at {image_size}")
    args.model, args.image_size, args.vae = model, image_size, args.vae or default_vae
    if args.ckpt is not None and Path(args.ckpt).is_file():
        return
    if dist.local_rank == 0:  # each node's first process downloads, the others wait
        pretrained.fetch(name)
    dist.barrier()
    args.ckpt = str(pretrained.fetch(name, download=False))


def _prepare(args, dist, seed, default_vae):
    """The Loaded model and the CFG channels; the sampler's settings checked before any sampling."""
    use_pretrained(args, dist, default_vae)
    torch.manual_seed(seed)  # before the model is built, as DiT's scripts
    loaded = load_sampler_model(
        args.ckpt, args.model, args.image_size, args.num_classes, args.vae, args.weights, dist.device
    )
    sampling_diffusion(args.sampler, args.steps, loaded.model.learn_sigma, loaded.diffusion_steps)
    if PRECISION_DTYPES[args.precision] is not None:
        cast_gemm_weights(loaded.model, PRECISION_DTYPES[args.precision])
    if loaded.model.num_classes == 0 and args.cfg_scale not in (None, 1.0):
        raise UsageError(
            f"--cfg-scale {args.cfg_scale}: the model is unconditional (no classes), so there is no "
            f"classifier-free guidance"
        )
    cfg_channels = args.cfg_channels or ("paper" if loaded.model.in_channels >= 3 else "all")
    return loaded, cfg_channels


def _command(work):
    """A sampling command, command(args): work(args, dist) inside its process group (init_distributed)
    with TF32 as --tf32 says, both undone after it."""

    @functools.wraps(work)
    def command(args):
        dist = init_distributed(args.device)
        try:
            with tf32(args.tf32, dist.device):
                return work(args, dist)
        finally:
            dist.close()

    return command


@_command
def sample(args, dist):
    """fastdit sample: one image grid, a row per class, labelled (an unconditional model: 10 rows, or 2 for
    large images)."""
    loaded, cfg_channels = _prepare(args, dist, args.seed, default_vae="mse")  # DiT sample.py's VAE
    model, names = loaded.model, loaded.classes
    num_classes = model.num_classes
    if args.classes and num_classes == 0:
        raise UsageError("--classes: the model is unconditional (trained with --num-classes 0)")
    if args.classes and any(c >= num_classes for c in args.classes):
        raise UsageError(
            f"--classes must be in [0, {num_classes}) for this model, got {','.join(map(str, args.classes))}"
        )
    check_grid_fits(loaded, args.per_class, args.classes)
    labels, per = grid_labels(num_classes, model.x_embedder.img_size[0], args.per_class, args.classes)
    guided = has_null_class(model)  # DiT's sample.py always guides, even at scale 1
    cfg_scale = (4.0 if guided else 1.0) if args.cfg_scale is None else args.cfg_scale
    out = args.out or default_out(args, cfg_scale, ".png")
    t0 = time.time()
    images = generate(
        model,
        labels,
        cfg_scale=cfg_scale,
        use_cfg=guided,
        cfg_channels=cfg_channels,
        sampler=args.sampler,
        steps=args.steps,
        device=dist.device,
        codec=loaded.codec,
        precision=args.precision,
        compile=args.compile,
        cuda_graphs=args.cuda_graphs,
        progress=True,
        diffusion_steps=loaded.diffusion_steps,
    )
    if dist.is_main:
        row_labels = [names[c] if names else c for c in labels] if num_classes else None
        save_grid(images, out, nrow=per, labels=row_labels)
        print(f"sampled {len(images)} images in {time.time() - t0:.1f}s -> {out}")
    return out


@_command
def sample_ddp(args, dist):
    """fastdit sample-ddp: every rank samples its share with seed * world_size + rank; rank 0 writes the .npz."""
    given_ckpt = args.ckpt
    # DiT sample_ddp.py's per-rank seed, set before the model is built
    loaded, cfg_channels = _prepare(args, dist, args.seed * dist.world_size + dist.rank, default_vae="ema")
    model = loaded.model
    if args.cfg_scale is not None:
        cfg_scale = args.cfg_scale
    else:  # DiT's sample_ddp.py default; an unconditional model has nothing to guide
        cfg_scale = 1.5 if model.num_classes else 1.0
    if cfg_scale > 1 and not has_null_class(model):
        raise UsageError(
            f"--cfg-scale {cfg_scale:g} needs a model trained with label dropout (it has no null "
            f"class): use --cfg-scale 1"
        )
    pngs = None
    if args.sample_dir:
        pngs = Path(args.sample_dir) / dits_sample_folder_name(args, given_ckpt, loaded, cfg_scale)
        out = pngs.with_name(f"{pngs.name}.npz")
    else:
        out = Path(args.out or default_out(args, cfg_scale, f"-n{args.num_samples}.npz"))
    global_batch = args.per_proc_batch_size * dist.world_size
    batches = math.ceil(args.num_samples / global_batch)  # DiT: rounded up, trimmed at the end
    # One Sampler for every batch: compiled and captured once (every batch has the same shape).
    run = Sampler(
        model,
        cfg_scale=cfg_scale,
        cfg_channels=cfg_channels,
        sampler=args.sampler,
        steps=args.steps,
        clip_denoised=loaded.codec is None,
        precision=args.precision,
        diffusion_steps=loaded.diffusion_steps,
        compile=args.compile,
        cuda_graphs=args.cuda_graphs,
        device=dist.device,
    )
    parts = Parts(out, _sampling_settings(args, dist, cfg_scale, cfg_channels), dist)
    with parts.exclusive():
        if pngs is not None:
            pngs.mkdir(parents=True, exist_ok=True)
            if dist.is_main:
                print(f"saving .png samples at {pngs}")
        done = parts.open()
        if done and dist.is_main:
            print(
                f"sample-ddp: continuing from {parts.root}: {min(done, batches)} of {batches} batches already sampled"
            )
        # A stop signal (SIGTERM, SIGUSR1) raises where Ctrl-C would: the finished batches are kept all the same.
        with StopSignals(raising=True):
            try:
                _sample_batches(args, dist, run, loaded.codec, range(done, batches), parts, pngs)
            except BaseException as e:
                if dist.is_main and parts.finished():
                    kept = f"the batches it finished are kept in {parts.root}: the same command continues from them"
                    if isinstance(e, KeyboardInterrupt):  # said on the command's `interrupted` (`stopped by`) line
                        raise reworded(e, kept) from None
                    print(f"fastdit: sample-ddp stopped; {kept}", file=sys.stderr, flush=True)
                raise
        dist.barrier()
        if dist.is_main:
            arr = parts.gather(batches, args.num_samples)
            atomic_write(out, lambda f: np.savez(f, arr_0=arr))
            parts.remove()
            print(f"wrote {out}: arr_0 {arr.dtype} {arr.shape}")
        dist.barrier()
    return str(out)


def dits_sample_folder_name(args, given_ckpt, loaded, cfg_scale):
    """The name DiT's sample_ddp.py gives its samples (folder and .npz), for these settings."""
    model = args.model or loaded.name or "DiT"
    ckpt = os.path.basename(given_ckpt).replace(".pt", "") if given_ckpt else "pretrained"
    h, w = decoded_size(loaded)
    size = args.image_size or (h if h == w else f"{h}x{w}")
    if loaded.codec is None:
        vae = "none"
    else:  # DiT's ema | mse, else the VAE's own name (a hub id's model, a file's or folder's name)
        short = {hub: key for key, hub in SD_VAES.items()}
        vae = short.get(loaded.codec.name) or Path(loaded.codec.name).name
    return f"{model.replace('/', '-')}-{ckpt}-size-{size}-vae-{vae}-cfg-{float(cfg_scale)}-seed-{args.seed}"


def _sampling_settings(args, dist, cfg_scale, cfg_channels):
    """Everything that decides sample-ddp's batches (what Parts keys a run by); --num-samples only says how many."""
    ckpt = find_checkpoint(args.ckpt, "--ckpt").resolve()
    stat = ckpt.stat()
    settings = {k: getattr(args, k) for k in ("model", "image_size", "num_classes", "vae", "weights", "sampler")}
    settings.update({k: getattr(args, k) for k in ("steps", "seed", "precision", "compile", "cuda_graphs", "tf32")})
    settings["rgb"] = args.rgb  # the batches (and --sample-dir's PNGs) hold the images as the output does
    return dict(
        settings,
        ckpt=[str(ckpt), stat.st_size, stat.st_mtime_ns],
        cfg_scale=cfg_scale,
        cfg_channels=cfg_channels,
        per_proc_batch_size=args.per_proc_batch_size,
        world_size=dist.world_size,
        device=dist.device.type,
    )


def _sample_batches(args, dist, run, codec, batches, parts, pngs=None):
    """This rank's batches (a range of batch numbers) from the Sampler `run`, as uint8 images (with --rgb, RGB),
    each saved into `parts` when done (and, with `pngs`, as pngs/NNNNNN.png numbered as DiT's); a range not
    starting at 0 continues from the random state saved before it."""
    from PIL import Image
    from tqdm import tqdm

    if batches.start and batches:
        parts.restore(batches.start)
    model, n = run.model, args.per_proc_batch_size
    for k in tqdm(batches, disable=not dist.is_main, desc="sample-ddp", initial=batches.start, total=batches.stop):
        z = torch.randn(n, model.in_channels, *model.x_embedder.img_size, device=dist.device)
        y = torch.randint(0, model.num_classes, (n,), device=dist.device) if model.num_classes else n
        with torch.no_grad():
            images = to_uint8(to_images(run(y, z=z), codec))  # (n, H, W, C)
        if args.rgb:
            images = as_rgb(images)  # (n, H, W, 3)
        if pngs is not None:  # before the batch counts as done: a finished batch has its files
            for index, image in zip(parts.dit_index(k, n), images):
                Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(pngs / f"{index:06d}.png")
        parts.save(k, images)
