"""Parameters and FLOPs of a DiT, counted the way the DiT paper counts them.

The paper's "Gflops" (its Table 4; the official README's 119 for DiT-XL/2 at 256x256 and 525 at
512x512) are multiply-accumulates: one multiply-add is one FLOP, as fvcore counts. Only matrix
products count: linear layers, the patch embedding and attention's q k^T and weights x v.
Elementwise work (LayerNorm, modulation, softmax, GELU) is left out; it is under 0.1 % here.

Hardware FLOPs count a multiply-add as two, and a training step costs a forward and a backward
(twice the forward), so:

    forward FLOPs          = 2 x paper Gflops
    training FLOPs / image = 3 x forward FLOPs = 6 x paper Gflops     (what MFU divides by)

DiT-XL/2 at 256x256: 118.6 paper Gflops, 237.2 GFLOP forward, 711.7 GFLOP per training image
(the benchmarks' ~712, whose benchmarks/workloads.py uses this counter).

    fastdit.flops("DiT-XL/2", 256)                     # SD-VAE latents: 4 x 32 x 32
    fastdit.flops("DiT-Tiny/2", 28, vae_factor=1, in_channels=1)    # pixel space
    fastdit.flops(model)                               # a built model at its own input size
"""

from dataclasses import dataclass

import torch

from . import _args
from ._util import UsageError
from .models import ADAPTIVE, BLOCKS

FREQUENCY_EMBEDDING_SIZE = 256  # the timestep embedder's sinusoid width (models.TimestepEmbedder)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def forward_macs(config):
    """Multiply-accumulates of one image's forward through DiT(**config) (the paper's "flops").

    config: the model's constructor arguments (fastdit._registry.model_config); `block`
    (default adaLN-Zero) picks the block design, `num_classes` 0 an unconditional model.
    """
    h, w = _pair(config["input_size"])
    p, D, C = config["patch_size"], config["hidden_size"], config["in_channels"]
    M = int(D * config.get("mlp_ratio", 4.0))
    out = C * (2 if config.get("learn_sigma", True) else 1)
    block = config.get("block", "adaLN-Zero")
    T = (h // p) * (w // p)  # image tokens
    L = 2 if config.get("num_classes", 1000) > 0 else 1  # conditioning vectors: t (and y)
    S = T + L if block == "in-context" else T  # tokens the blocks attend over
    per_block = (
        4 * S * D * D  # qkv and output projection
        + 2 * S * S * D  # q k^T and weights x v, all heads
        + 2 * S * D * M  # MLP
        + {
            "adaLN-Zero": 6 * D * D,  # shift, scale, gate for attention and MLP, once per image
            "adaLN": 4 * D * D,  # shift, scale
            "cross-attention": 2 * T * D * D + 2 * L * D * D + 2 * T * L * D,  # q, out; k, v; attention
            "in-context": 0,
        }[block]
    )
    embed = T * C * p * p * D + FREQUENCY_EMBEDDING_SIZE * D + D * D  # patches; timestep MLP
    final = T * D * p * p * out + (2 * D * D if block in ADAPTIVE else 0)
    return embed + config["depth"] * per_block + final


@dataclass(frozen=True)
class Complexity:
    """A model's size and cost at one input size; FLOP figures are per image."""

    model: str
    block: str
    input_shape: tuple  # (C, H, W) the model sees: latents, or pixels in pixel space
    tokens: int
    params: int
    gflops: float  # the paper's convention: 1e9 multiply-accumulates per forward

    @property
    def forward_gflop(self):
        """Hardware FLOPs of one forward (a multiply-add is two)."""
        return 2 * self.gflops

    @property
    def train_gflop(self):
        """FLOPs of one training image: forward + backward (twice the forward); MFU's numerator."""
        return 3 * self.forward_gflop

    def as_dict(self):
        return dict(
            model=self.model,
            block=self.block,
            input_shape=list(self.input_shape),
            tokens=self.tokens,
            params=self.params,
            gflops=self.gflops,
            forward_gflop=self.forward_gflop,
            train_gflop=self.train_gflop,
        )


def flops(model_or_name, image_size=None, *, vae_factor=8, in_channels=4, **model_kwargs):
    """Complexity of a model: a name of fastdit's registry (the twelve DiT configs, DiT-Tiny/N) or a built DiT.

    A name is measured at `image_size` pixels, seen as latents `vae_factor` times smaller with
    `in_channels` channels (DiT's SD-VAE: 8 and 4; pixel space: 1 and the image channels);
    model_kwargs go to the constructor (block=..., num_classes=0, learn_sigma=False, ...).
    A built model is measured at its own input size (image_size, if given, in its input's units).
    """
    from ._registry import MODELS, model_config

    if isinstance(model_or_name, str):
        if model_or_name not in MODELS:
            raise UsageError(f"unknown model {model_or_name!r}; valid names: {', '.join(MODELS)}")
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
            raise UsageError(f"image_size must be a positive int (pixels), got {image_size!r}")
        if vae_factor < 1 or image_size % vae_factor:
            raise UsageError(f"image_size {image_size} must be divisible by vae_factor {vae_factor}")
        name = model_or_name
        try:
            with torch.device("meta"):  # shapes only: no memory, no initialisation cost
                model = MODELS[name](input_size=image_size // vae_factor, in_channels=in_channels, **model_kwargs)
        except (TypeError, ValueError) as e:
            raise UsageError(f"{name} at image size {image_size}: {e}") from e
    elif isinstance(model_or_name, torch.nn.Module) and hasattr(model_or_name, "x_embedder"):
        model, name = model_or_name, type(model_or_name).__name__
    else:
        raise TypeError(f"model_or_name must be a model name or a DiT, got {type(model_or_name).__name__}")
    config = model_config(model)
    if isinstance(model_or_name, torch.nn.Module) and image_size is not None:
        config["input_size"] = _pair(image_size)
    h, w = _pair(config["input_size"])
    p = config["patch_size"]
    if h % p or w % p:
        raise UsageError(f"input size {(h, w)} must be divisible by the patch size {p}")
    return Complexity(
        model=name,
        block=config.get("block", "adaLN-Zero"),
        input_shape=(config["in_channels"], h, w),
        tokens=(h // p) * (w // p),
        params=sum(t.numel() for t in model.parameters()),
        gflops=forward_macs(config) / 1e9,
    )


#################################################################################
#                       fastdit info: the numbers on the command line           #
#################################################################################

OFFICIAL = tuple(f"DiT-{size}/{p}" for size in ("S", "B", "L", "XL") for p in (8, 4, 2))  # the paper's Table 4 order


def add_arguments(p):
    p.add_argument(
        "--model",
        default="all",
        help="a model name (see `fastdit train --help`), or all: the twelve DiT configs (default)",
    )
    p.add_argument("--image-size", type=_args.positive, default=256, help="image size in pixels (default 256)")
    p.add_argument(
        "--block", default="adaLN-Zero", help=f"block design: {', '.join(BLOCKS)}, or all (default adaLN-Zero)"
    )
    p.add_argument(
        "--vae-factor",
        type=_args.positive,
        default=8,
        help="pixels per latent (default 8: DiT's SD-VAE; 1: pixel space)",
    )
    p.add_argument(
        "--in-channels", type=_args.positive, default=4, help="channels the model sees (default 4: SD-VAE latents)"
    )
    p.add_argument(
        "--num-classes", type=_args.non_negative, default=1000, help="class labels; 0: unconditional (default 1000)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per model instead of a table; default off (a markdown table)",
    )


def info(args):
    """fastdit info: parameters, Gflops per forward in the DiT paper's convention (multiply-accumulates) and the
    training FLOPs per image that MFU uses (6 x the paper's Gflops: 2 FLOPs per multiply-add, backward = 2 forwards)."""
    import json

    from ._registry import MODELS, check_input_fits

    if args.model != "all" and args.model not in MODELS:
        raise UsageError(f"unknown --model {args.model!r}; valid names: all, {', '.join(MODELS)}")
    if args.block != "all" and args.block not in BLOCKS:
        raise UsageError(f"--block must be one of {', '.join(BLOCKS)} or all, got {args.block!r}")
    models = OFFICIAL if args.model == "all" else (args.model,)
    blocks = BLOCKS if args.block == "all" else (args.block,)
    if args.image_size % args.vae_factor:
        raise UsageError(
            f"--image-size {args.image_size} must be divisible by --vae-factor {args.vae_factor} (pixels per latent)"
        )
    for m in models:  # in the flags' words, before flops() says it in its arguments'
        check_input_fits(m, args.image_size, args.image_size // args.vae_factor)
    rows = [
        flops(
            m,
            args.image_size,
            vae_factor=args.vae_factor,
            in_channels=args.in_channels,
            num_classes=args.num_classes,
            block=b,
        )
        for m in models
        for b in blocks
    ]
    if args.json:
        print("\n".join(json.dumps(r.as_dict()) for r in rows))
    else:
        print(format_table(rows, args.image_size))
    return rows


def gflop_text(v):
    """Two decimals as the paper prints them; three significant digits below 10 (the tiny models' 0.0577)."""
    return f"{v:.2f}" if v >= 10 else f"{v:#.3g}"


def format_table(rows, image_size):
    """A markdown table of Complexity rows, with the conventions spelled out under it."""
    lines = [
        "| model | block | input | tokens | params (M) | Gflops (paper) | forward GFLOP | train GFLOP/image |",
        "|---|---|---|---|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.block} | {'x'.join(map(str, r.input_shape))} | {r.tokens} | {r.params / 1e6:.2f} "
            f"| {gflop_text(r.gflops)} | {gflop_text(r.forward_gflop)} | {gflop_text(r.train_gflop)} |"
        )
    lines.append(
        f"\n{image_size}x{image_size} images. Gflops (paper): multiply-accumulates per forward, the DiT "
        f"paper's convention.\nforward GFLOP: 2 per multiply-add. train GFLOP/image: forward + backward = "
        f"3 x forward, the FLOPs MFU divides by."
    )
    return "\n".join(lines)
