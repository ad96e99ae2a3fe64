"""`fastdit train`: DiT training as in facebookresearch/DiT train.py, resumable bit-exactly.

With no data option this is the main job: DiT-Tiny/2 trained in PIXEL space on scikit-learn's
handwritten digits (1797 real 8x8 grayscale images, 10 classes, shipped with scikit-learn), a
few minutes on a laptop CPU. With --data FOLDER it trains on your images (pixel space, or
latent space with --vae encoding on the fly); with --latents DIR on latents precomputed by
`fastdit latents`. Defaults follow the data: under 100,000 items a DiT-Tiny and a short schedule,
above DiT's DiT-XL/2 recipe; every option given wins.

One process per device under torchrun (DistributedDataParallel, or FSDP with --fsdp); a plain
`python`/`fastdit` run is a world of one. Checkpoints hold everything a run depends on (model,
EMA, optimizer, grad scaler, step, every rank's RNG states, the data position, the arguments),
so `--resume` continues with exactly the losses an uninterrupted run would have produced (on
GPUs too with --deterministic). A run whose loss, gradients or weights turn NaN/Inf stops with
its last good checkpoint kept. One command writes a run folder at a time: a second one (a --resume
while the run still goes on) is refused. SIGTERM or SIGUSR1 (a cluster's notice before it kills the
job) stops the run after the step in flight, every rank after the same one, with that step's
checkpoint and one line saying how --resume goes on; the exit code is 128 + the signal's number
(143, 138). Ctrl-C stops at once (exit code 130): --resume goes on from the last checkpoint.
"""

import argparse
import contextlib
import copy
import gc
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import _args, _util, datasets
from ._dist import env_world_size, init_distributed, local_shards
from ._registry import MODELS, build_model, check_input_fits, check_model_name, model_name
from ._signals import AgreedStop, Stopped, StopSignals, reworded
from ._util import (
    PRECISION_DTYPES,
    UsageError,
    absolute_if_local,
    amp_forward,
    atomic_save,
    load_plain,
    plain,
    rng_state,
    set_rng_state,
)
from .data import ShardedBatches, build_dataset, check_data_path, make_loader
from .fid import add_train_arguments as add_fid_arguments
from .fid import fid_monitor
from .latents import LatentsDataset, empty_classes
from .models import BLOCKS
from .vae import load_vae, load_vae_record, same_vae, vae_label

CHECKPOINT_FORMAT = "fastdit-train"
# --precision -> autocast dtype; fp8: the blocks' linear layers in float8 (torchao), the rest in bf16 autocast.
PRECISIONS = {**PRECISION_DTYPES, "fp8": torch.bfloat16}
FP8_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # the token GEMMs: ~all of a block's FLOPs
CHECKPOINTING = ("none", "selective", "full")

# Defaults follow the data. Small data (fewer than SMALL_DATA items: the embedded digits, a small
# folder or its latents) gets a CPU-sized DiT-Tiny and a short schedule; large data DiT's recipe.
SMALL_DATA = 100_000
PRESETS = {
    # EMA 0.995: DiT's 0.9999 would still be ~86% the initial weights after 1500 steps.
    "small": dict(
        global_batch_size=128,
        lr=1e-3,
        steps=1500,
        ema_decay=0.995,
        ckpt_every=500,
        sample_every=500,
        sample_steps=100,
        cfg_scale=2.0,
    ),  # model: DiT-Tiny, its patch size fitted to the input (small_model)
    "large": dict(
        model="DiT-XL/2",
        global_batch_size=256,
        lr=1e-4,
        steps=400_000,
        ema_decay=0.9999,
        ckpt_every=50_000,
        sample_every=10_000,
        sample_steps=250,
        cfg_scale=4.0,
    ),
}
COMMON = dict(
    fid_every=0,
    fid_ref=None,
    fid_samples=10_000,
    precision="fp32",
    weight_decay=0.0,
    grad_clip=0.0,
    grad_checkpointing="none",
    compile=False,
    fsdp=False,
    max_bad_steps=10,
    seed=0,
    log_every=100,
    diffusion_steps=1000,
    class_dropout_prob=0.1,
    flip=None,
    cfg_channels=None,
    device="auto",
    deterministic=False,
    block="adaLN-Zero",
)
FID_CFG_SCALE = 1.5  # DiT's sample_ddp.py default (its FID-50K)
# DiT's linear betas end at 0.02 * 1000 / T, which must stay below 1 (the last step keeping some signal).
MIN_DIFFUSION_STEPS = 21
RECENT = 100  # the final loss is the mean of the run's last RECENT steps' losses
# Not taken from a resumed checkpoint: they describe this machine, not the run.
MACHINE_ARGS = ("resume", "out", "results_dir", "data_path", "device", "num_workers", "compile")
# A resumed run keeps these: other values would not continue the same run (or fit its weights).
KEPT_ON_RESUME = (
    "model",
    "block",
    "num_classes",
    "image_size",
    "global_batch_size",
    "seed",
    "diffusion_steps",
    "class_dropout_prob",
)
# Options that go together: given again on resume, the stored ones of the same group do not apply.
GROUPS = (("data", "latents", "vae"), ("steps", "epochs"))


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed NaN/Inf); the message says why and what to try."""


def add_arguments(p):
    s, g = PRESETS["small"], PRESETS["large"]

    def both(key):
        return f"default {s[key]} for small data (< {SMALL_DATA:,} items, e.g. the digits), {g[key]} (DiT's) for larger"

    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--data",
        help="image folder: one sub-folder per class (center crop, random flips); "
        "mnist:DIR (IDX files) or cifar10:DIR (cifar-10-batches-py); default: the "
        "embedded digits (the main job)",
    )
    src.add_argument(
        "--latents", help="latents folder from `fastdit latents` (latent-space training, streamed); default: none"
    )
    src.add_argument(
        "--data-path",
        metavar="DIR",
        help="DiT's train.py flag, with DiT's defaults: --data DIR and --vae ema unless --vae is given "
        "(latent space, --image-size 256); default: none",
    )
    p.add_argument(
        "--vae",
        help="with --data: encode images on the fly with this VAE (see `fastdit latents --help`) "
        "and train in latent space; with --latents: the VAE that decodes the sample grids; "
        "default: none with --data (pixel space), ema with --data-path (DiT's), the one the latents were encoded with "
        "(another must have the same weights)",
    )
    p.add_argument(
        "--model",
        type=model_name,
        help=f"one of {', '.join(MODELS)}; default for small data: DiT-Tiny "
        f"with the largest patch size (4, 2, 1) that leaves at least 16 "
        f"tokens (the digits: DiT-Tiny/2; MNIST: DiT-Tiny/4; CIFAR-10: "
        f"DiT-S/2), for larger data {g['model']} (DiT's)",
    )
    p.add_argument(
        "--block",
        choices=BLOCKS,
        help="the DiT paper's block design (its Figure 3): adaLN-Zero (DiT's), "
        "adaLN, cross-attention or in-context; default adaLN-Zero",
    )
    p.add_argument(
        "--image-size",
        type=_args.positive,
        help="image size in pixels, divisible by the patch size (and "
        "the VAE's factor); default 8 for the digits, 28 for "
        "MNIST, 32 for CIFAR-10 and --data (pixel space), 256 "
        "for --data with --vae",
    )
    p.add_argument(
        "--global-batch-size",
        type=_args.positive,
        help=f"summed over all processes, a multiple of their "
        f"number; {both('global_batch_size')} (at most "
        f"the dataset's size)",
    )
    p.add_argument("--lr", type=_args.number(0, low_open=True), help=f"AdamW learning rate, constant; {both('lr')}")
    p.add_argument("--weight-decay", type=_args.number(0), help="AdamW weight decay; default 0 (DiT's)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=_args.positive, help=f"total training steps; {both('steps')}")
    steps.add_argument(
        "--epochs", type=_args.positive, help="train this many epochs instead of --steps; default: --steps"
    )
    p.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        help="autocast dtype of the model (loss in fp32; "
        "fp16 uses a GradScaler; fp8: the blocks' linear "
        "layers in float8 through torchao, on Ada/Hopper "
        "GPUs, the rest in bf16); default fp32",
    )
    p.add_argument(
        "--ema-decay",
        type=_args.probability,
        help=f"EMA of the weights, the ones sampled from, in [0, 1); {both('ema_decay')}",
    )
    p.add_argument("--grad-clip", type=_args.number(0), help="clip the global grad norm to this; default 0 (off)")
    p.add_argument(
        "--grad-checkpointing",
        nargs="?",
        const="full",
        choices=CHECKPOINTING,
        help="recompute activations in the backward for less memory: full (alone: whole blocks, about a "
        "third more compute) or selective (only the memory-bound ops between the GEMMs and "
        "attention); default none",
    )
    p.add_argument(
        "--no-grad-checkpointing",
        dest="grad_checkpointing",
        action="store_const",
        const="none",
        help="keep every activation (the default)",
    )
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model; default off")
    p.add_argument(
        "--fsdp",
        action=argparse.BooleanOptionalAction,
        help="shard parameters, gradients and optimizer state over the processes (FSDP2) instead of DDP; default off",
    )
    p.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        help="bitwise reproducible training and resume on GPUs too: deterministic attention backward, "
        "the attention backend pinned (recorded in the checkpoint, reused on resume), "
        "torch.use_deterministic_algorithms and cuBLAS's deterministic workspace; default off",
    )
    p.add_argument(
        "--max-bad-steps",
        type=_args.positive,
        help="abort after this many NaN/Inf losses in a row, each one skipping its step; default 10",
    )
    p.add_argument(
        "--resume",
        help="checkpoint file, or a run folder (its latest checkpoint); options not given "
        "again are the checkpoint's; a finished run gets its missing outputs; default: "
        "a new run",
    )
    p.add_argument(
        "--ckpt-every",
        type=_args.non_negative,
        help=f"checkpoint every N steps (0: only at the end); {both('ckpt_every')}",
    )
    p.add_argument(
        "--sample-every",
        type=_args.non_negative,
        help=f"EMA sample grid every N steps (0: only at the end); {both('sample_every')}",
    )
    p.add_argument(
        "--sample-steps",
        type=_args.integer(2),
        help=f"DDPM steps of the sample grids, at least 2, at most --diffusion-steps; {both('sample_steps')}",
    )
    p.add_argument(
        "--cfg-scale",
        type=_args.number(),
        help=f"classifier-free guidance of the sample grids (1: none); {both('cfg_scale')}",
    )
    p.add_argument(
        "--cfg-channels",
        choices=["paper", "all"],
        help="channels CFG guides: paper = the first 3 (DiT's), all; default paper with >= 3 channels, else all",
    )
    p.add_argument("--log-every", type=_args.positive, help="log every N steps; default 100")
    p.add_argument(
        "--seed",
        "--global-seed",  # DiT's name
        type=_args.seed,
        help="global seed; rank r uses seed * world_size + r as DiT; default 0",
    )
    p.add_argument(
        "--num-workers",
        type=_args.non_negative,
        help="data loader worker processes; default 4 for an image folder on CUDA (DiT's), else 0",
    )
    p.add_argument(
        "--diffusion-steps",
        type=_args.integer(MIN_DIFFUSION_STEPS),
        help=f"diffusion timesteps T, at least {MIN_DIFFUSION_STEPS}; default 1000",
    )
    p.add_argument("--class-dropout-prob", type=_args.probability, help="label dropout for CFG, in [0, 1); default 0.1")
    p.add_argument(
        "--num-classes",
        type=_args.non_negative,
        help="0: unconditional (no labels, no class embedding, no CFG); default: the dataset's classes",
    )
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        help="random horizontal flips; default on for image folders, off for the digits",
    )
    _args.add_tf32(p, default=None, when="on for a new run (DiT's train.py sets it), a resumed run's own")
    _args.add_device(p, default=None)
    out = p.add_mutually_exclusive_group()
    out.add_argument(
        "--out",
        type=_args.output_folder,
        help="run folder; default runs/<data>-<model>-<time>, or the resumed run's folder",
    )
    out.add_argument(
        "--results-dir",
        type=_args.output_folder,
        help="DiT's train.py flag: a new run folder DIR/NNN-<model>, NNN the number of entries DIR "
        "holds (or the next one free), instead of --out; default: none",
    )
    add_fid_arguments(p)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="fastdit train")
    add_arguments(p)
    return p.parse_args(argv)


def main(argv=None):
    """Parse `fastdit train` arguments and train. Returns a TrainResult."""
    return run(parse_args(argv))


#################################################################################
#                          Arguments, checkpoints, RNG                          #
#################################################################################


def flag(key):
    return "--" + key.replace("_", "-")


def merge_args(args, saved=None, model_config=None):
    """The options given, else the resumed run's; a given one that contradicts the run is refused.
    model_config: the run's model, for the values its options left to the data (num_classes None)."""
    a = argparse.Namespace(**vars(args))
    if saved is None:
        return a
    for key in KEPT_ON_RESUME:
        given, kept = getattr(a, key), saved.get(key)
        if kept is None and model_config:
            kept = model_config.get(key)
        if given is not None and given != kept:
            raise UsageError(
                f"{flag(key)} {given} contradicts the resumed run's {kept}: a resumed run "
                f"keeps it (start a new run, with another --out, to change it)"
            )
    regrouped = {k for group in GROUPS if any(getattr(a, k) is not None for k in group) for k in group}
    for key, value in saved.items():
        if key not in MACHINE_ARGS and key not in regrouped and getattr(a, key, None) is None:
            setattr(a, key, value)
    if isinstance(a.grad_checkpointing, bool):  # runs saved before the selective mode existed
        a.grad_checkpointing = "full" if a.grad_checkpointing else "none"
    return a


def absolute_paths(a):
    """The local paths among the options made absolute: stored in the checkpoints, they resume from anywhere."""
    named = a.data is not None and datasets.parse(a.data)
    a.data = f"{named[0]}:{absolute_if_local(named[1])}" if named else absolute_if_local(a.data)
    a.latents, a.vae, a.fid_ref = (absolute_if_local(v) for v in (a.latents, a.vae, a.fid_ref))
    return a


def small_model(input_size):
    """DiT-Tiny with the largest patch size (4, 2, 1) dividing the input that leaves at least 16 tokens."""
    return next(f"DiT-Tiny/{p}" for p in (4, 2, 1) if input_size % p == 0 and input_size // p >= 4 or p == 1)


def fill_defaults(a, num_items, input_size, world):
    """Set every option still unset from the presets: small or large data (see SMALL_DATA)."""
    small = num_items < SMALL_DATA
    preset = dict(PRESETS["small" if small else "large"])
    if small:
        preset["model"] = small_model(input_size)
        preset["global_batch_size"] = max(world, min(preset["global_batch_size"], num_items // world * world))
    named = a.data is not None and datasets.parse(a.data)
    if named:  # mnist:DIR, cifar10:DIR: defaults sized for that dataset
        preset.update(datasets.PRESETS[named[0]])
    if a.num_classes == 0:
        preset["cfg_scale"] = 1.0  # an unconditional model has nothing to guide
    for key, value in {**COMMON, **preset}.items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    return "small" if small else "large"


def default_num_workers(data, device):
    """DiT's 4 data loader processes where decoding images would hold up a GPU (an image folder on
    CUDA); else 0: the digits, MNIST and CIFAR-10 are arrays in memory, latents are read as stored,
    and on the CPU workers would take cores from the training step. Workers change no value: the
    batch sampler draws the order and flips (ShardedBatches)."""
    return 4 if torch.device(device).type == "cuda" and data is not None and not datasets.parse(data) else 0


def check_args(a, world, input_size):
    """What single flags cannot say (their values were checked when parsed): how they fit together."""
    check_model_name(a.model)
    if a.fsdp and world == 1:  # fully_shard needs torchrun's process group, which one process does not join
        raise UsageError("--fsdp shards over torchrun's processes: launch with torchrun --nproc_per_node=N, N >= 2")
    if a.global_batch_size % world:
        raise UsageError(
            f"--global-batch-size {a.global_batch_size} must be a multiple of the world size {world} "
            f"(the number of processes)"
        )
    check_input_fits(a.model, a.image_size, input_size)
    if a.sample_steps > a.diffusion_steps:
        raise UsageError(f"--sample-steps {a.sample_steps} must be at most --diffusion-steps {a.diffusion_steps}")
    if a.cfg_scale > 1 and a.class_dropout_prob == 0 and a.num_classes != 0:
        raise UsageError(
            f"--cfg-scale {a.cfg_scale} guides the sample grids with the null class, which "
            f"--class-dropout-prob 0 does not train: use --cfg-scale 1, or a dropout > 0"
        )


def default_image_size(a):
    """8 for the digits, 28 for MNIST, 32 for CIFAR-10 and pixel-space folders (256x256 pixels would be
    16384 tokens for DiT-XL/2), 256 for a folder with a VAE."""
    if a.data is None:
        return 8
    named = datasets.parse(a.data)
    if named:
        return datasets.PRESETS[named[0]]["image_size"]
    return 32 if a.vae is None else 256


def numbered_run_folder(results_dir, model):
    """DiT's train.py run folder: results_dir/NNN-<model>, NNN the number of entries results_dir holds,
    or the next number no entry starts with (DiT's count alone would reuse one after a deletion)."""
    root = Path(results_dir)
    index = len(list(root.iterdir())) if root.is_dir() else 0
    while any(root.glob(f"{index:03d}-*")):
        index += 1
    return root / f"{index:03d}-{model.replace('/', '-')}"


def check_run_folder(out, resumed_run=None):
    """--out must not be another run's folder: its checkpoints and logs would be overwritten and mixed."""
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and any(ckpts.glob("*.pt")) and (resumed_run is None or out.resolve() != resumed_run):
        raise UsageError(
            f"--out {out} holds another run (checkpoints in {ckpts}): continue it with --resume {out}, "
            f"or give a new --out"
        )


def find_checkpoint(path):
    """A checkpoint file, or a run folder's latest checkpoints/NNNNNNN.pt."""
    return _util.find_checkpoint(path, "--resume")


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@torch.no_grad()
def update_ema(ema_params, params, decay, skip=None):
    """ema <- ema + (1 - decay) * (param - ema), DiT's update_ema as one pass (a lerp: reads ema and the
    parameter once, writes ema once; DiT's mul_ then add_ make two passes over ema).

    skip: a bool tensor on the device; where true the EMA stays as it is (a skipped optimizer step),
    decided on the device (the weight is 0), never read back by the host.
    Under FSDP each rank updates its own shards (the lerp is elementwise; torch 2.11's DTensor has no
    rule for a foreach lerp with tensor weights).
    """
    ema_params, params = local_shards(ema_params), local_shards(params)
    if skip is None:
        torch._foreach_lerp_(ema_params, params, 1 - decay)
        return
    # One weight tensor for every parameter: foreach's fast path wants same-shaped lists, so this is one
    # lerp per tensor (launched from C++), still one pass over memory.
    weight = torch.where(skip, 0.0, 1 - decay).float()  # 0-dim
    torch._foreach_lerp_(ema_params, params, [weight] * len(params))


def to_float8(model, device):
    """Swap the blocks' token GEMMs (FP8_LAYERS) for torchao's float8 training linears (dynamic scaling;
    same parameters and state_dict keys). The adaLN, embedding and output GEMMs have too few rows to gain."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise UsageError(
            "--precision fp8 needs the torchao package, which is not installed (pip install torchao)"
        ) from e
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise UsageError(
            "--precision fp8 needs an NVIDIA GPU with float8 tensor cores (compute capability 8.9 or "
            f"newer: Ada, Hopper, Blackwell); this run is on {device}"
        )
    return convert_to_float8_training(model, module_filter_fn=lambda module, name: name.endswith(FP8_LAYERS))


class TrainStep:
    """One optimizer step of DiT's train.py (random t, MSE + VLB loss, backward, AdamW, EMA), issued
    without a single device-to-host synchronisation: `fastdit train` runs it, the end-to-end benchmark times it.

    model: what the forward calls (`raw`, or its DDP / FSDP / torch.compile wrapper); raw: the DiT whose
    parameters train; ema: its EMA copy (same parameter order). Calling it with a batch (x, y) returns a
    float32 (4,) tensor on the device: [loss (mean over ranks), gradient norm, 1.0 if the step counts as
    bad (a NaN/Inf loss; or NaN/Inf gradients, except under fp16 where GradScaler owns those) else 0.0,
    1.0 if the update made a weight NaN/Inf (finite loss and gradients, a step too large) else 0.0].
    The host reads these back when it chooses (Trainer: once per log interval), and stops on broken
    weights before anything saves them; the EMA never takes them in.

    A NaN/Inf loss or gradient skips the update as GradScaler does, on the device: the backward runs
    (the host cannot know it should not), then the fused AdamW receives the skip flag as `found_inf` and
    leaves the parameters, its moments and its step count untouched, and the EMA stays put (update_ema).
    Under fp16 the GradScaler also lowers its scale on such a step.
    """

    def __init__(
        self,
        model,
        raw,
        ema,
        diffusion,
        dist,
        *,
        precision="fp32",
        lr=1e-4,
        weight_decay=0.0,
        grad_clip=0.0,
        ema_decay=0.9999,
    ):
        self.device, self.dist, self.diffusion = dist.device, dist, diffusion
        self.grad_clip, self.ema_decay = grad_clip, ema_decay
        self.forward = amp_forward(model, self.device.type, PRECISIONS[precision])
        self.params = list(raw.parameters())
        self.ema_params = list(ema.parameters())
        self.conditional = raw.y_embedder is not None  # an unconditional model never sees the labels
        # fused: the AdamW implementation that takes a device-side skip flag (found_inf); it also reads and
        # writes each parameter, gradient and moment once per step: 7 passes over 675M fp32 values for
        # DiT-XL/2, ~19 GB, where foreach's eight kernels make ~18 passes, ~49 GB (~6 ms on an H200, predicted).
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, fused=True)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")

    def __call__(self, x, y):
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=self.device)
        kwargs = dict(y=y) if self.conditional else {}
        loss = self.diffusion.training_losses(self.forward, x, t, kwargs)["loss"].mean()
        # One all-reduce gives every rank the summed loss and how many ranks saw a NaN/Inf: all skip together.
        detached = loss.detach().float()
        stats = self.dist.all_reduce_sum(torch.stack([detached, (~torch.isfinite(detached)).float()]))
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        norm = self._grad_norm()
        bad_loss, bad_grads = stats[1] > 0, ~torch.isfinite(norm)
        skip = bad_loss | bad_grads
        self.opt.found_inf = skip.float()
        self.opt.step()
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        broken = self._weights_nonfinite()
        update_ema(self.ema_params, self.params, self.ema_decay, skip=skip | broken)
        bad = bad_loss if self.scaler.is_enabled() else skip
        return torch.stack([stats[0] / self.dist.world_size, norm.float(), bad.float(), broken.float()])

    def _weights_nonfinite(self):
        """Whether any weight is NaN/Inf on any rank, as a device flag: the largest |w| of each tensor,
        summed (NaN and Inf propagate), one all-reduce for FSDP's shards. One read of the weights per step
        (2.7 GB for DiT-XL/2 in fp32, ~0.6 ms on an H200, predicted): the price of never averaging broken
        weights into the EMA."""
        local = [t.detach() for t in local_shards(self.params)]
        local = [t for t in local if t.numel()]  # an FSDP shard may be empty (the max of nothing is undefined)
        if not local:
            return self.dist.all_reduce_sum(torch.zeros((), device=self.device)) > 0
        largest = torch.stack(torch._foreach_norm(local, math.inf)).sum()
        return self.dist.all_reduce_sum((~torch.isfinite(largest)).float()) > 0

    def _grad_norm(self):
        """The global gradient norm (clipping to grad_clip if set), as a tensor on the device."""
        if self.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        else:  # no clipping: not even a multiplication of every gradient by 1
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor


#################################################################################
#                                  The run                                      #
#################################################################################


@dataclass
class TrainResult:
    out: str
    checkpoint: str
    grid: str
    curve: str
    losses: list = field(default_factory=list)  # this invocation's per-step mean losses (None: skipped step)
    final_loss: float = float("nan")  # mean loss of the run's last (up to) RECENT steps, earlier invocations' too
    skipped: int = 0
    seconds: float = 0.0  # this invocation's
    run_seconds: float = 0.0  # the run's: the invocations' up to the checkpoint this one resumed, and this one's


class Trainer:
    def __init__(self, args):
        self.dist = init_distributed(args.device or "auto")
        self.device = self.dist.device
        self._restore = contextlib.ExitStack()  # process-wide settings of this run, undone by close()
        self._stop_signals = None  # fit's StopSignals: SIGTERM and SIGUSR1 noted, their handlers put back by close()
        try:
            self._setup(args)
        except BaseException:
            self.close()
            raise

    # -- setup -----------------------------------------------------------------

    def _setup(self, args):
        self.ckpt, self.ckpt_path, saved = None, None, None
        if args.resume:
            self.ckpt_path = find_checkpoint(args.resume)
            self.ckpt = load_plain(self.ckpt_path, "--resume")
            if not isinstance(self.ckpt, dict) or self.ckpt.get("format") != CHECKPOINT_FORMAT:
                raise UsageError(
                    f"{self.ckpt_path} is not a fastdit training checkpoint (to fine-tune official "
                    f"weights, start a new run)"
                )
            saved = self.ckpt["args"]
        a = self.args = absolute_paths(merge_args(args, saved, self.ckpt["model_config"] if self.ckpt else None))
        if a.tf32 is None:  # runs saved before --tf32 existed ran without it: resumed, they go on so
            a.tf32 = self.ckpt is None
        if a.vae and not (a.data or a.latents):
            raise UsageError("--vae needs --data (images encoded on the fly) or --latents (the VAE that decodes them)")
        idle = [flag(k) for k in ("fid_ref", "fid_samples") if getattr(args, k) is not None]
        if idle and not a.fid_every:
            raise UsageError(f"{' and '.join(idle)} without --fid-every N would measure nothing: add --fid-every")
        if a.out is not None:
            check_run_folder(Path(a.out), self._resumed_run())
        world = self.dist.world_size
        if a.latents is None and a.image_size is None:
            a.image_size = default_image_size(a)
        self._build_data()
        if self.ckpt is not None:
            self._check_fits_checkpoint()
        self.preset = fill_defaults(a, len(self.dataset), self.input_size, world)
        if a.num_workers is None:
            a.num_workers = default_num_workers(a.data, self.device)
        check_args(a, world, self.input_size)
        flip = self.dataset.flip if a.flip is None else a.flip
        self.batches = ShardedBatches(len(self.dataset), a.global_batch_size, self.dist.rank, world, a.seed, flip)
        if a.epochs is not None:
            a.steps = a.epochs * self.batches.per_epoch
        if self.ckpt is not None and a.steps < self.ckpt["step"]:
            raise UsageError(
                f"--steps {a.steps}: the resumed run is at step {self.ckpt['step']} already; pass a "
                f"larger --steps to train on"
            )
        if a.deterministic:
            self._make_deterministic()  # before the first cuBLAS call
        self._build_model()
        self.attention_backend = self._pin_attention_backend() if a.deterministic else None
        self.fid = fid_monitor(a, self.dist, self.device)  # None unless --fid-every
        self.out = Path(self.dist.broadcast_object(str(self._out_dir())))
        self.metrics_path = self.out / "metrics.jsonl"
        self.step, self.position, self.skipped, self.last_checkpoint = 0, (0, 0), 0, None
        self.prior_seconds, self.t_start = 0.0, time.time()
        self.recent_losses = []  # the run's last (up to) RECENT finite step losses, earlier invocations' too
        self.bad_run = 0  # NaN/Inf steps in a row, as read back so far
        if self.ckpt is not None:
            self._load_state()
        else:
            seed_everything(a.seed * world + self.dist.rank)  # DiT's per-rank seed
        # Two runs in one folder (a --resume while the run still goes on, or default names of the same second)
        # would rewrite each other's metrics log and delete each other's half-written checkpoints.
        self._restore.enter_context(_util.exclusive_output(self.out, str(self.out), self.dist, self.dist.is_main))
        if self.dist.is_main:
            if self.ckpt_path is not None:  # a run killed while writing a file left its temporary copy
                for folder in (self.out, self.out / "checkpoints", self.out / "samples"):
                    _util.remove_stale_temporaries(folder)
            # Steps after the checkpoint will be redone: drop them from the log.
            kept = [r for r in _util.read_jsonl(self.metrics_path) if r.get("step", 0) <= self.step]
            _util.write_jsonl(self.metrics_path, kept)

    def _resumed_run(self):
        """The run folder of the resumed checkpoint (runs/x for runs/x/checkpoints/N.pt), or None (no
        resume, or a checkpoint file outside a run folder: its run goes on in a new folder)."""
        path = self.ckpt_path.resolve() if self.ckpt_path is not None else None
        return path.parent.parent if path is not None and path.parent.name == "checkpoints" else None

    def _build_data(self):
        a = self.args
        self.codec, self.decoder, self.vae_record = None, None, None  # codec: encodes each batch
        if a.latents:
            self.dataset = LatentsDataset(a.latents)
            self.vae_record = self.dataset.meta["vae"]
            if a.image_size not in (None, self.dataset.meta["image_size"]):
                raise UsageError(
                    f"--image-size {a.image_size}: {a.latents} holds latents of "
                    f"{self.dataset.meta['image_size']}x{self.dataset.meta['image_size']} images"
                )
            a.image_size = self.dataset.meta["image_size"]
            if a.flip and not self.dataset.flip:
                raise UsageError(
                    f"--flip: {a.latents} holds no flipped latents (encode with `fastdit latents --flips both`)"
                )
            empty = empty_classes(self.dataset.meta)
            if empty and a.num_classes != 0:
                raise UsageError(
                    f"--latents {a.latents}: class {', '.join(map(repr, empty))} holds no latents (none of its images "
                    f"was readable), so a class-conditional model would never learn it: fix or remove its image "
                    f"folder and encode again into a new --out, or train unconditionally with --num-classes 0"
                )
            self.decoder = load_vae_record(self.vae_record, self.device, name=a.vae)  # fails now, not at the first grid
        else:
            if a.vae:
                check_data_path(a.data)
                self.codec = self.decoder = load_vae(a.vae, self.device)
                self.vae_record = self.codec.describe()
                if a.image_size % self.codec.factor:
                    raise UsageError(
                        f"--image-size {a.image_size} must be divisible by the VAE's factor {self.codec.factor}"
                    )
            self.dataset = build_dataset(a.data, a.image_size, channels=self.codec and self.codec.image_channels)
        self.channels = self.codec.latent_channels if self.codec else self.dataset.channels
        self.input_size = a.image_size // self.codec.factor if self.codec else self.dataset.image_size
        if a.cfg_channels is None:
            a.cfg_channels = "paper" if self.channels >= 3 else "all"

    def _make_deterministic(self):
        """--deterministic: the same bits from the same run on the same machine, GPUs included.

        Attention's backward without atomics (fastdit.ops.use_deterministic); torch's deterministic
        algorithms (cuDNN's deterministic convolutions; an error for an op that has none: the fused
        ops are torch.library custom ops, which it does not flag); cuBLAS's fixed workspace, which
        it needs (read when cuBLAS first runs). Undone by close(), except the environment variable.
        """
        from . import ops

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self._restore.callback(
            torch.use_deterministic_algorithms,
            torch.are_deterministic_algorithms_enabled(),
            warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
        )
        torch.use_deterministic_algorithms(True)
        # Deterministic mode also NaN-fills every torch.empty (one more pass over memory per output);
        # fastdit's kernels write every element of their outputs (tested with NaN-poisoned buffers).
        self._restore.callback(
            setattr,
            torch.utils.deterministic,
            "fill_uninitialized_memory",
            torch.utils.deterministic.fill_uninitialized_memory,
        )
        torch.utils.deterministic.fill_uninitialized_memory = False
        self._restore.enter_context(ops.use_deterministic(True))

    def _pin_attention_backend(self):
        """The attention backend of a --deterministic run: the resumed run's, else the one asked for
        (FASTDIT_ATTENTION), else what `auto` picks for this model's attention in training. Pinned
        for the whole run, as `auto` measures speed and may pick differently from run to run."""
        from . import ops

        recorded = self.ckpt.get("attention_backend") if self.ckpt is not None else None
        heads, batch = self.raw.num_heads, self.args.global_batch_size // self.dist.world_size
        dtype = (PRECISIONS[self.args.precision] if self.device.type == "cuda" else None) or torch.float32
        tokens, head_dim = (self.input_size // self.raw.patch_size) ** 2, self.raw.pos_embed.shape[-1] // heads
        probe = torch.empty(
            batch, tokens, heads, head_dim, device=self.device, dtype=dtype, requires_grad=True
        )  # (B, T, H, Dh): q as the model makes it in training
        try:
            with torch.enable_grad(), ops.use_attention_backend(recorded) if recorded else contextlib.nullcontext():
                name = ops.attention_backend(probe)
        except RuntimeError as e:
            raise UsageError(f"--deterministic: {e}" + (" (the resumed run's backend)" if recorded else "")) from e
        explicit = os.environ.get("FASTDIT_ATTENTION", "auto").strip().lower() or "auto"
        if recorded and explicit not in ("auto", recorded):
            raise UsageError(
                f"FASTDIT_ATTENTION={explicit}: the resumed --deterministic run used attention backend "
                f"{recorded!r}; unset FASTDIT_ATTENTION (or resume with --no-deterministic)"
            )
        if name not in ops.DETERMINISTIC_ATTENTION_BACKENDS:
            usable = ", ".join(ops.DETERMINISTIC_ATTENTION_BACKENDS)
            raise UsageError(
                f"--deterministic: attention backend {name!r} has no deterministic backward; choose one "
                f"of {usable} (FASTDIT_ATTENTION)"
            )
        self._restore.enter_context(ops.use_attention_backend(name))
        return name

    def _check_fits_checkpoint(self):
        """On resume, this data must make the checkpoint's model (else: what differs, not a size mismatch)."""
        stored = self.ckpt["model_config"]
        here = dict(input_size=[self.input_size] * 2, in_channels=self.channels, num_classes=self._num_classes())
        differ = [f"{k} {v} (checkpoint: {stored.get(k)})" for k, v in here.items() if v != stored.get(k)]
        if differ:
            raise UsageError(
                f"resuming {self.ckpt_path}: this data makes a model with {', '.join(differ)}; resume "
                f"with the run's data ({plain(self.ckpt.get('data'))})"
            )
        if not same_vae(self.ckpt.get("vae"), self.vae_record):  # same shapes, another latent space
            raise UsageError(
                f"resuming {self.ckpt_path}: the run's data was encoded with {vae_label(self.ckpt.get('vae'))}, this "
                f"data with {vae_label(self.vae_record)}; resume with data of the run's VAE"
            )

    def _build_model(self):
        a = self.args
        num_classes = self._num_classes()
        torch.manual_seed(a.seed)  # the same initial weights on every rank
        try:
            model, self.model_config = build_model(
                a.model,
                input_size=self.input_size,
                in_channels=self.channels,
                num_classes=num_classes,
                class_dropout_prob=a.class_dropout_prob,
                block=a.block,
            )
        except ValueError as e:
            raise UsageError(f"--model {a.model} at input size {self.input_size}: {e}") from e
        self.raw = model.to(self.device)
        self.raw.set_gradient_checkpointing(a.grad_checkpointing)
        self.ema = copy.deepcopy(self.raw).requires_grad_(False).eval()
        if a.precision == "fp8":  # the EMA (sampled from) stays a plain DiT
            to_float8(self.raw, self.device)
        if a.fsdp:
            self._shard()
        elif self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.raw.adaln_one_gemm = False  # each block's adaLN gradient all-reduced as soon as it is ready
            self.model = DDP(self.raw, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.model = self.raw
        self.model.train()  # label dropout on: it trains the null class used by CFG
        if a.compile:
            self.model = torch.compile(self.model)
        diffusion = create_diffusion(
            timestep_respacing="", learn_sigma=self.raw.learn_sigma, diffusion_steps=a.diffusion_steps
        )
        self.step_fn = TrainStep(
            self.model,
            self.raw,
            self.ema,
            diffusion,
            self.dist,
            precision=a.precision,
            lr=a.lr,
            weight_decay=a.weight_decay,
            grad_clip=a.grad_clip,
            ema_decay=a.ema_decay,
        )

    @property
    def opt(self):
        return self.step_fn.opt

    @property
    def scaler(self):
        return self.step_fn.scaler

    def _num_classes(self):
        """The model's classes: the dataset's, or 0 (unconditional) with --num-classes 0."""
        n, given = self.dataset.num_classes, self.args.num_classes
        if given not in (None, 0, n):
            raise UsageError(f"--num-classes must be 0 (unconditional) or the dataset's {n}, got {given}")
        return n if given is None else given

    def _shard(self):
        """FSDP2: each DiT block is a unit of its own (its parameters gathered around its forward),
        the embedders and final layer the root unit. The EMA copy is sharded the same way."""
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        # A block returns its output with its closing residual still to apply (DiTBlock's defer_residual): the
        # GEMM's (B, T, D) output, a view, and a chunk of the modulation. FSDP2 warns that an in-place op on a
        # view returned by a unit would skip its backward hook; the next block's fused op reads them, never
        # writing them.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w*Block\) returned a view tensor")
        for module in (self.raw, self.ema):
            for block in module.blocks:
                fully_shard(block)
            fully_shard(module)
            register_fsdp_forward_method(module, "forward_with_cfg")  # sampling enters through it
        self.model = self.raw

    def _out_dir(self):
        a = self.args
        if a.out:
            return Path(a.out)
        if a.results_dir:
            return numbered_run_folder(a.results_dir, a.model)
        if self._resumed_run() is not None:
            return self._resumed_run()
        name = "digits" if a.data is None and a.latents is None else self.dataset.name
        return Path("runs") / f"{name}-{a.model.replace('/', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"

    # -- checkpoints -----------------------------------------------------------

    def _state_dicts(self):
        """Full model, EMA and optimizer state dicts (gathered on the CPU under FSDP).

        The optimizer state is keyed by parameter name (torch.distributed.checkpoint's layout),
        the same with and without FSDP, so DDP and FSDP runs resume each other's checkpoints.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=bool(self.args.fsdp))
        return (
            get_model_state_dict(self.raw, options=opts),
            get_model_state_dict(self.ema, options=opts),
            get_optimizer_state_dict(self.raw, self.opt, options=opts),
        )

    def save_checkpoint(self):
        a = self.args
        model_sd, ema_sd, opt_sd = self._state_dicts()
        rngs = self.dist.all_gather_object(rng_state(self.device))
        path = self.out / "checkpoints" / f"{self.step:07d}.pt"
        if self.dist.is_main:
            atomic_save(
                dict(
                    format=CHECKPOINT_FORMAT,
                    model=model_sd,
                    ema=ema_sd,
                    opt=opt_sd,
                    scaler=self.scaler.state_dict(),
                    step=self.step,
                    data_position=list(self.position),
                    rng=rngs,
                    world_size=self.dist.world_size,
                    skipped=self.skipped,
                    train_seconds=self.prior_seconds + time.time() - self.t_start,
                    recent_losses=list(self.recent_losses),
                    args=plain({k: v for k, v in vars(a).items() if k not in MACHINE_ARGS}),
                    model_name=a.model,
                    model_config=self.model_config,
                    vae=self.vae_record,
                    attention_backend=self.attention_backend,
                    classes=list(self.dataset.classes),
                    data=self.dataset.describe() if a.latents is None else dict(kind="latents", path=a.latents),
                ),
                path,
            )
        self.dist.barrier()
        self.last_checkpoint = path
        return path

    def _load_state(self):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        ck, d = self.ckpt, self.dist
        own = self.raw.state_dict()
        if own.keys() != ck["model"].keys() or any(own[k].shape != ck["model"][k].shape for k in own):
            saved = {"block": "adaLN-Zero", **ck["model_config"]}  # checkpoints from before block designs: DiT's
            changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in self.model_config.items() if saved.get(k) != v]
            raise UsageError(
                f"--resume {self.ckpt_path}: the checkpoint's weights do not fit the model these options "
                f"make ({'; '.join(changed)}): a resumed run keeps its model"
            )
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.raw, ck["model"], options=opts)
        set_model_state_dict(self.ema, ck["ema"], options=opts)
        set_optimizer_state_dict(self.raw, self.opt, ck["opt"], options=opts)
        for group in self.opt.param_groups:  # the loaded groups hold the run's; a --lr given on resume wins
            group["lr"], group["weight_decay"] = self.args.lr, self.args.weight_decay
        if ck["scaler"]:  # empty: saved by a run without fp16, whose resume with fp16 starts a fresh scaler
            self.scaler.load_state_dict(ck["scaler"])
        self.step, self.skipped = ck["step"], ck.get("skipped", 0)
        # A checkpoint from before these were recorded: 0 seconds, no losses
        self.prior_seconds, self.recent_losses = ck.get("train_seconds", 0.0), list(ck.get("recent_losses", []))
        self.position = tuple(ck["data_position"])
        self.batches.start = self.position
        if ck["world_size"] == d.world_size:
            set_rng_state(ck["rng"][d.rank], self.device)
        else:  # the random streams cannot continue: derive new ones, deterministic per (seed, step, rank)
            seed_everything((self.args.seed * d.world_size + d.rank) * 1_000_003 + self.step)
            if d.is_main:
                print(
                    f"note: resuming a {ck['world_size']}-process run on {d.world_size} processes: the data order "
                    f"continues, the random streams restart (not bit-exact)"
                )
        self.last_checkpoint = self.ckpt_path
        self.ckpt = None  # free the memory

    # -- training --------------------------------------------------------------

    def train_step(self, x, y):
        """One optimizer step: TrainStep's (4,) device tensor [loss, grad norm, bad, broken], not read back here."""
        return self.step_fn(x, y)

    def sample_grid(self, path):
        """EMA samples, a row per class, from a fixed seed: training's RNG streams are left untouched."""
        from .sample import grid_labels

        labels, per_row = grid_labels(self.raw.num_classes, self.input_size)
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            images = self.generate(labels, self.args.cfg_scale, seed=self.args.seed)
        if self.dist.is_main:
            names = [self.dataset.classes[c] for c in labels] if self.raw.num_classes else None  # labels: a count
            _util.save_grid(images, path, nrow=per_row, labels=names)
        return path

    def generate(self, labels, cfg_scale, seed=None):
        """Decoded EMA samples of `labels` (DDPM, --sample-steps), (N, C, H, W) in [-1, 1]."""
        from .sample import to_images

        if seed is not None:
            torch.manual_seed(seed)
        return to_images(self.sampler(cfg_scale)(labels), self.decoder)

    def sampler(self, cfg_scale, cuda_graphs=False):
        """A Sampler of the EMA model: DDPM with --sample-steps steps."""
        from .sample import Sampler

        a = self.args
        # CPUs lack fast fp16 (and often bf16) matmuls: there the samples are drawn in fp32. Autocast's
        # dtype, not fp8: the EMA model has no float8 layers.
        precision = {"fp8": "bf16"}.get(a.precision, a.precision) if self.device.type == "cuda" else "fp32"
        return Sampler(
            self.ema,
            cfg_scale=cfg_scale,
            cfg_channels=a.cfg_channels,
            sampler="ddpm",
            steps=a.sample_steps,
            clip_denoised=self.decoder is None,
            precision=precision,
            diffusion_steps=a.diffusion_steps,
            cuda_graphs=cuda_graphs,
            device=self.device,
        )

    def measure_fid(self, log):
        """FID of --fid-samples EMA samples (DiT's FID guidance 1.5 where the model has a null class), logged.

        One Sampler for all the batches: on CUDA without FSDP (whose all-gathers a graph would freeze)
        the denoising step is captured once and replayed; the graph goes with the Sampler afterwards."""
        from .sample import has_null_class, to_images

        cfg = FID_CFG_SCALE if has_null_class(self.raw) else 1.0
        run = self.sampler(cfg, cuda_graphs=self.device.type == "cuda" and not self.args.fsdp)
        if self.raw.num_classes:
            value = self.fid(lambda labels: to_images(run(labels), self.decoder), self.raw.num_classes)
        else:  # an unconditional model draws as many images as the monitor has labels (of one dummy class)
            value = self.fid(lambda labels: to_images(run(len(labels)), self.decoder), 1)
        self._record(log, dict(event="fid", step=self.step, fid=value, samples=self.args.fid_samples, cfg_scale=cfg))
        return value

    def fit(self):
        """Train up to --steps, then write the final checkpoint, sample grid and loss curve. A run
        resumed at its last step (killed before its outputs were written, or finished) gets them."""
        from tqdm import tqdm

        a, d = self.args, self.dist
        if d.is_main:
            n_params = sum(p.numel() for p in self.raw.parameters())
            print(
                f"fastdit train: {a.model} ({n_params / 1e6:.2f}M parameters, input {self.channels}x{self.input_size}"
                f"x{self.input_size}, {'latent' if self.vae_record else 'pixel'} space) on {self.dataset.name} "
                f"({len(self.dataset)} items, {self.raw.num_classes or 'unconditional: no'} classes; "
                f"{self.preset}-data defaults), "
                f"{d.world_size} process(es) on {self.device.type}, {a.precision}, global batch "
                f"{a.global_batch_size}; {'resuming at step ' + str(self.step) if self.step else 'from scratch'} "
                f"-> {self.out}"
            )
            if self.step == a.steps:
                print(
                    f"the run is at its last step ({a.steps}): writing its final samples and loss curve; pass a "
                    f"larger --steps to train on"
                )
        losses, self.t_start = [], time.time()
        # From here a stop signal ends the run after a step, with its checkpoint (not killed mid-setup: no step lost).
        self._stop_signals = StopSignals()
        bar = tqdm(total=a.steps, initial=self.step, disable=not d.is_main, desc="train", dynamic_ncols=True)
        try:
            if self.step < a.steps:
                losses, stop = self._loop(bar)
                checkpoint = self._outside_clock(bar, self.save_checkpoint)
                if stop:  # the checkpoint of the step the ranks agreed on is written: the same as a periodic one
                    raise Stopped(stop)
            else:
                checkpoint = self.last_checkpoint
        finally:
            bar.close()  # before the final grid and curve: the bar's last rate is the training's
        grid = self.sample_grid(self.out / "samples.png")
        curve = self.out / "loss.png"
        if d.is_main:
            plot_loss_curve(_util.read_jsonl(self.metrics_path), curve, title=f"{a.model} on {self.dataset.name}")
        seconds = time.time() - self.t_start
        counted = len(self.recent_losses)
        final = sum(self.recent_losses) / counted if counted else float("nan")
        if d.is_main:
            print(
                f"done: step {self.step} in {seconds:.0f}s, final loss {final:.4f} (mean of the last {counted} "
                f"steps), {self.skipped} skipped\n  checkpoint {checkpoint}\n  samples    {grid}\n"
                f"  loss curve {curve}"
            )
        return TrainResult(
            str(self.out),
            str(checkpoint),
            str(grid),
            str(curve),
            losses,
            final,
            self.skipped,
            seconds,
            self.prior_seconds + seconds,
        )

    def _loop(self, bar):
        """The training steps up to --steps, or up to the step after which the ranks agreed to stop on a stop
        signal (the last checkpoint is the caller's); returns their losses and the signal's number (0: none)."""
        a = self.args
        agreed = AgreedStop(self._stop_signals, self.dist)
        loader = make_loader(self.dataset, self.batches, a.num_workers, self.device.type == "cuda", a.seed)
        losses, window, pending = [], [], []  # pending: the steps' device stats not read back yet
        log = open(self.metrics_path, "a") if self.dist.is_main else None
        self._window_start, self._window_step = time.time(), self.step
        try:
            for x, y in loader:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                if self.codec is not None:
                    x = self.codec.encode(x, sample=True)  # DiT: a fresh posterior sample every step
                pending.append(self.train_step(x, y))
                self.step += 1
                self.position = self.batches.advance(self.position)
                bar.update(1)
                stop = agreed.after_step()
                if stop:  # the checkpoint's numbers (and the NaN/Inf guards) first, then the caller saves
                    self._read_back(pending, log, bar, losses, window)
                    return losses, stop
                last = self.step >= a.steps
                logs = self.step % a.log_every == 0 or last
                saves = a.ckpt_every and self.step % a.ckpt_every == 0 and not last
                samples = a.sample_every and self.step % a.sample_every == 0 and not last
                fid = self.fid and (self.step % a.fid_every == 0 or last)
                if logs or saves or samples or fid or last:  # what follows needs the steps' numbers
                    self._read_back(pending, log, bar, losses, window)
                    pending = []
                if logs:
                    self._log(log, bar, window)
                    window = []
                if fid:
                    fid = self._outside_clock(bar, self.measure_fid, log)
                    bar.write(f"step {self.step:7d}  FID {fid:.3f} ({a.fid_samples} EMA samples)")
                if self.step >= a.steps:  # a signal in the last step: its checkpoint, not the grid (--resume writes it)
                    return losses, agreed.drain()
                if a.ckpt_every and self.step % a.ckpt_every == 0:
                    self._outside_clock(bar, self.save_checkpoint)
                if a.sample_every and self.step % a.sample_every == 0:
                    self._outside_clock(bar, self.sample_grid, self.out / "samples" / f"{self.step:07d}.png")
        finally:
            if log:
                log.close()

    def _outside_clock(self, bar, fn, *args):
        """fn(*args) as a pause: the throughput in the logs and the bar's rate and ETA count training time only."""
        t0 = time.time()
        result = fn(*args)
        paused = time.time() - t0
        self._window_start += paused  # set by _loop, which runs first
        if not bar.disable:
            bar.start_t += paused
            bar.last_print_t += paused
        return result

    def _read_back(self, pending, log, bar, losses, window):
        """Read the device stats of the steps since the last read back (the loop's only device-to-host copy,
        once per log interval, checkpoint or sample grid), record them and apply the NaN/Inf guards: stop
        at a step whose update broke the weights, or once --max-bad-steps steps in a row were bad (each
        was skipped on the device already)."""
        if not pending:
            return
        first = self.step - len(pending) + 1
        for step, (loss, norm, bad, broken) in enumerate(torch.stack(pending).tolist(), start=first):
            if broken:  # checked before any later save: the last checkpoint holds good weights
                raise TrainingError(
                    f"the update of step {step} made weights NaN/Inf (its loss {loss:.4g} and grad norm "
                    f"{norm:.4g} were finite: the step was too large); stopping. Last good checkpoint: "
                    f"{self.last_checkpoint or 'none'}. Try a lower --lr, or --grad-clip 1"
                )
            if bad:
                self.skipped, self.bad_run = self.skipped + 1, self.bad_run + 1
                losses.append(None)
                self._record(log, dict(step=step, loss=None, skipped=True))
                if self.bad_run >= self.args.max_bad_steps:
                    raise TrainingError(
                        f"the loss or gradients were NaN/Inf for {self.bad_run} steps in a row (steps "
                        f"{step - self.bad_run + 1}-{step}, {self.skipped} skipped in all); stopping. Last "
                        f"checkpoint: {self.last_checkpoint or 'none'}. Try a lower --lr, --grad-clip 1, or "
                        f"--precision bf16 instead of fp16"
                    )
            else:
                self.bad_run = 0
                losses.append(loss)
                window.append(loss)
                self.recent_losses = [*self.recent_losses[1 - RECENT :], loss]
                self._record(log, dict(step=step, loss=loss, grad_norm=norm))
        if window:  # the bar shows what the next log line will: the mean loss since the last one
            bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", refresh=False)

    def _record(self, log, record):
        if log:
            log.write(_util.json_line(record))
            log.flush()

    def _log(self, log, bar, window):
        now = time.time()
        rate = (self.step - self._window_step) / max(now - self._window_start, 1e-9)  # skipped steps ran too
        self._window_start, self._window_step = now, self.step
        mem = _util.memory_bytes(self.device) / 2**30
        rec = dict(
            event="log",
            step=self.step,
            loss=sum(window) / len(window) if window else None,
            steps_per_s=rate,
            images_per_s=rate * self.args.global_batch_size,
            memory_gb=mem,
            skipped=self.skipped,
        )
        if self.dist.is_main:
            self._record(log, rec)
            loss = f"{rec['loss']:.4f}" if window else "n/a"
            speed = rec["images_per_s"]  # three figures below 100 (a slow CPU run is not "0 img/s")
            bar.write(
                f"step {self.step:7d}  loss {loss}  {f'{speed:.0f}' if speed >= 100 else f'{speed:.3g}'} img/s  "
                f"{'cuda max allocated' if self.device.type == 'cuda' else 'peak RSS'} {mem:.2f} GiB"
                + (f"  skipped {self.skipped}" if self.skipped else "")
            )

    def how_to_go_on(self):
        """After Ctrl-C: how far the run got, its last checkpoint and the command that goes on from it."""
        last = self.last_checkpoint
        if last is None:
            every = self.args.ckpt_every
            when = f"one every {every} steps" if every else "--ckpt-every 0: at the end only"
            return f"after step {self.step}, with no checkpoint yet ({when}): nothing to resume"
        in_run = Path(last).resolve().parent.parent == self.out.resolve()
        return (
            f"after step {self.step}; `fastdit train --resume {self.out if in_run else last}` goes on from the "
            f"last checkpoint, {last}"
        )

    def close(self):
        self._restore.close()
        if self.dist.active:
            self._release_distributed()
        self.dist.close()
        # Last: under torchrun, a rank that stopped and ended brings the launcher's SIGTERM to the others, which
        # note it (instead of dying) until here, close to `fastdit` saying its line.
        if self._stop_signals is not None:
            self._stop_signals.close()
            self._stop_signals = None

    def _release_distributed(self):
        """Free what holds the process group (the DDP or FSDP model, the EMA, the optimizer's sharded state,
        under FSDP its last collectives' work objects) while the interpreter is whole, before the group goes.
        Left to interpreter exit, their teardown aborted a rank now and then ("terminate called without an
        active exception", seen in 1 of 23 two-process FSDP runs on a loaded CPU)."""
        for name in ("step_fn", "model", "raw", "ema"):
            self.__dict__.pop(name, None)
        gc.collect()


def plot_loss_curve(records, path, title):
    """Per-step loss (faint) and its moving average, log scale, from the metrics log (covers resumed runs);
    beside it the FID curve when the run measured FID."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, loss = _util.loss_series(records)
    fids = [(r["step"], r["fid"]) for r in records if r.get("event") == "fid"]
    fig = Figure(figsize=(12 if fids else 7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if fids else 1, 1)
    if len(loss):
        ax.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss per step")
        k = _util.smoothing_window(len(loss))
        ax.plot(
            steps[k - 1 :],
            _util.moving_average(loss, k),
            color="tab:blue",
            linewidth=1.8,
            label=f"moving average ({k} steps)",
        )
        ax.set_yscale("log")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss (MSE + VLB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if fids:
        fx = fig.add_subplot(1, 2, 2)
        fx.plot(*zip(*fids), color="tab:red", marker="o")
        fx.set_xlabel("step")
        fx.set_ylabel("FID (EMA samples)")
        fx.set_title("FID")
        fx.grid(alpha=0.3)
    return _util.save_figure(fig, path)


def dits_data_path(args):
    """DiT's --data-path DIR in fastdit's terms: --data DIR, with DiT's VAE (ema) unless --vae is given."""
    if getattr(args, "data_path", None) is not None:
        args.data, args.vae, args.data_path = args.data_path, args.vae or "ema", None
    return args


def run(args):
    """Train with parsed arguments (unset options resolved from --resume or the presets)."""
    dits_data_path(args)
    if args.model is not None:
        check_model_name(args.model)  # before any process group or data: the cheapest error first
    if args.num_classes == 0 and args.cfg_scale not in (None, 1.0):
        raise UsageError(
            f"--cfg-scale {args.cfg_scale}: an unconditional model (--num-classes 0) has no classifier-free guidance"
        )
    if args.global_batch_size is not None and args.global_batch_size % env_world_size():
        raise UsageError(
            f"--global-batch-size {args.global_batch_size} is not divisible by the world size "
            f"{env_world_size()} (the number of processes)"
        )
    trainer = Trainer(args)
    try:
        with _util.tf32(trainer.args.tf32, trainer.device):
            return trainer.fit()
    except KeyboardInterrupt as e:  # Ctrl-C, or a stop signal (after its checkpoint)
        if not trainer.dist.is_main:
            raise
        raise reworded(e, trainer.how_to_go_on()) from None  # what the line `fastdit train: interrupted` ends with
    finally:
        trainer.close()


def create_diffusion(**kwargs):
    """fastdit.diffusion.create_diffusion (imported on first use; tests wrap it)."""
    from .diffusion import create_diffusion as make

    return make(**kwargs)
