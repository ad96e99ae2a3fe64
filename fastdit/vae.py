"""Autoencoders for latent diffusion: a small convolutional VAE trained here, or diffusers' AutoencoderKL.

Both are used through the same codec interface (`load_vae(name)`): encode(images in [-1, 1],
sample) -> latents multiplied by the scale factor (unit-variance-ish, what the DiT trains on),
decode(scaled latents) -> images. A codec describes itself as a plain record (kind, name,
revision, a fingerprint of its weights, scale factor, shapes) that travels with every latents
folder and checkpoint, so that sampling decodes with the VAE the latents were encoded with.
"""

import functools
import hashlib
import re
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _args
from ._signals import StopSignals, interruption, reworded
from ._util import (
    PRECISION_DTYPES,
    UsageError,
    atomic_save,
    exclusive_output,
    load_plain,
    remove_stale_temporaries,
    rng_state,
    save_grid,
    set_rng_state,
)
from .data import build_dataset

VAE_FORMAT = "fastdit-vae"
# DiT's --vae ema|mse: the Stable Diffusion VAEs on the Hugging Face hub
SD_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class SmallVAE(nn.Module):
    """A small convolutional VAE: each of `downsample` stages halves the resolution.

    encode(x) -> (mean, logvar) of q(z|x), each (N, latent_channels, H / 2**downsample, W / 2**downsample);
    decode(z) -> reconstruction (N, in_channels, H, W). Loss: MSE + beta * KL(q(z|x) || N(0, I)).
    """

    def __init__(self, in_channels=1, latent_channels=4, base_channels=32, downsample=2):
        super().__init__()
        self.config = dict(
            in_channels=in_channels, latent_channels=latent_channels, base_channels=base_channels, downsample=downsample
        )
        c = base_channels
        enc = [nn.Conv2d(in_channels, c, 3, padding=1), nn.SiLU()]
        for _ in range(downsample):
            enc += [nn.Conv2d(c, c, 4, stride=2, padding=1), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1), nn.SiLU()]
        enc += [nn.Conv2d(c, 2 * latent_channels, 1)]
        dec = [nn.Conv2d(latent_channels, c, 3, padding=1), nn.SiLU()]
        for _ in range(downsample):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1), nn.SiLU()]
        dec += [nn.Conv2d(c, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, in_channels, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def encode(self, x):
        mean, logvar = self.encoder(x).chunk(2, dim=1)  # (N, Cz, h, w) each
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        return self.decoder(z)  # (N, C, H, W)

    def loss(self, x, beta):
        """dict(loss, mse, kl): MSE per pixel + beta * KL per pixel (the KL summed over latent dims, averaged over the batch)."""
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)  # reparameterisation
        mse = F.mse_loss(self.decode(z), x)
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum() / x.numel()
        return dict(loss=mse + beta * kl, mse=mse, kl=kl)


def fingerprint(module):
    """16 hex digits of SHA-256 over a module's state_dict (names, dtypes, shapes, values): the same weights give
    the same fingerprint whatever file format or folder they were read from."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class LatentCodec:
    """What training and sampling use: scaled latents in, images in [-1, 1] out.

    precision (fp32 | bf16 | fp16) is the autocast dtype of the VAE on the GPU; latents and
    images come out in float32.
    """

    kind = None
    trained_on = None  # description of the data a fastdit VAE was trained on

    def __init__(self, name, revision, net, scale_factor, latent_channels, factor, image_channels, device, precision):
        if precision not in PRECISION_DTYPES:
            raise UsageError(f"--precision must be one of {', '.join(PRECISION_DTYPES)}, got {precision!r}")
        self.name, self.revision, self.scale_factor = str(name), revision, float(scale_factor)
        self.latent_channels, self.factor, self.image_channels = latent_channels, factor, image_channels
        self.device, self.precision = torch.device(device), precision
        self.fingerprint = fingerprint(net)

    def describe(self):
        """Plain-typed record of this VAE (stored in latents manifests and checkpoints)."""
        return dict(
            kind=self.kind,
            name=self.name,
            revision=self.revision,
            fingerprint=self.fingerprint,
            scale_factor=self.scale_factor,
            latent_channels=self.latent_channels,
            factor=self.factor,
            image_channels=self.image_channels,
        )

    def _autocast(self):
        dtype = PRECISION_DTYPES[self.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    @torch.no_grad()
    def encode(self, x, sample=True):
        """Images (N, C, H, W) in [-1, 1] -> scaled latents (N, Cz, H / factor, W / factor); sample=False: the mean."""
        with self._autocast():
            mean, std = self._posterior(x.to(self.device))
        mean, std = mean.float(), std.float()
        z = mean + std * torch.randn_like(mean) if sample else mean
        return z * self.scale_factor

    @torch.no_grad()
    def decode(self, z):
        """Scaled latents -> images (N, C, H, W) in [-1, 1]."""
        with self._autocast():
            x = self._decode(z.to(self.device) / self.scale_factor)
        return x.float().clamp(-1, 1)


class SmallVAECodec(LatentCodec):
    kind = "small"

    def __init__(self, path, device="cpu", precision="fp32"):
        ckpt = load_plain(path, "VAE checkpoint")
        if isinstance(ckpt, dict) and ckpt.get("format") == STATE_FORMAT:
            raise UsageError(
                f"{path} is the state of an interrupted `fastdit vae` run, not a VAE: run that command again to "
                f"finish it (it writes vae.pt)"
            )
        if not isinstance(ckpt, dict) or ckpt.get("format") != VAE_FORMAT:
            raise UsageError(f"{path} is not a fastdit VAE checkpoint (written by `fastdit vae`)")
        self.vae = SmallVAE(**ckpt["config"]).to(device).eval()
        self.vae.load_state_dict(ckpt["vae"])
        cfg = ckpt["config"]
        self.trained_on = ckpt.get("data")
        super().__init__(
            Path(path).resolve(),
            None,
            self.vae,
            ckpt["scale_factor"],
            cfg["latent_channels"],
            2 ** cfg["downsample"],
            cfg["in_channels"],
            device,
            precision,
        )

    def _posterior(self, x):
        mean, logvar = self.vae.encode(x)
        return mean, torch.exp(0.5 * logvar)

    def _decode(self, z):
        return self.vae.decode(z)


def hub_snapshot(repo_id, revision=None):
    """(local folder, commit hash) of a Hugging Face hub model: downloaded when online, else from the local cache."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=["config.json", "*.safetensors"])
    except Exception as e:  # offline, unknown repo or revision, HTTP errors: the hub raises many types
        raise UsageError(
            f"--vae {repo_id}{'@' + revision if revision else ''}: cannot get it from the Hugging Face hub nor its local "
            f"cache ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Run once on a machine with internet "
            f"(the cache is reused offline), or give a local folder with the AutoencoderKL weights"
        ) from e
    return Path(folder), Path(folder).name


class DiffusersVAE(LatentCodec):
    """diffusers' AutoencoderKL: a local folder (config.json + weights), or a hub model such as stabilityai/sd-vae-ft-ema."""

    kind = "diffusers"

    def __init__(self, name, device="cpu", precision="fp32", revision=None):
        try:
            from diffusers.models import AutoencoderKL
        except ImportError as e:
            raise UsageError(
                f"--vae {name}: diffusers' AutoencoderKL is needed but diffusers is not installed "
                f"(pip install 'fastdit[diffusers]')"
            ) from e
        folder = Path(name)
        if folder.is_dir():
            name, revision = folder.resolve(), None
        else:
            folder, revision = hub_snapshot(name, revision)
        try:
            self.vae = (
                AutoencoderKL.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
                .to(device)
                .eval()
            )
        except (OSError, ValueError, TypeError) as e:
            raise UsageError(f"--vae {name}: not a diffusers AutoencoderKL folder ({_first_line(e)})") from e
        cfg = self.vae.config
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        super().__init__(
            name,
            revision,
            self.vae,
            cfg.scaling_factor,
            cfg.latent_channels,
            factor,
            cfg.in_channels,
            device,
            precision,
        )

    def _posterior(self, x):
        dist = self.vae.encode(x).latent_dist
        return dist.mean, dist.std

    def _decode(self, z):
        return self.vae.decode(z).sample


def _first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def load_vae(name, device="cpu", precision="fp32", revision=None):
    """A VAE by name -> codec: a fastdit VAE checkpoint file (`fastdit vae`), a local diffusers AutoencoderKL
    folder, a Hugging Face hub model id (owner/name, at `revision`), or DiT's shorthands ema | mse."""
    p = Path(name)
    if revision is not None and p.exists():
        raise UsageError(f"--vae-revision {revision} names a hub revision, but --vae {name} is a local file or folder")
    if p.is_dir():
        return DiffusersVAE(p, device, precision)
    if p.is_file():
        return SmallVAECodec(p, device, precision)
    name = SD_VAES.get(str(name), str(name))
    if HUB_ID.fullmatch(name) and not p.suffix == ".pt":
        return DiffusersVAE(name, device, precision, revision)
    raise UsageError(
        f"--vae {str(p)!r} does not exist. Give a checkpoint written by `fastdit vae`, a local folder holding diffusers "
        f"AutoencoderKL weights (config.json + weights), or a Hugging Face hub model id (ema, mse, "
        f"stabilityai/sd-vae-ft-ema, ...)"
    )


def load_vae_record(record, device="cpu", name=None, precision="fp32"):
    """The codec a record (from a latents manifest or a checkpoint) describes: loaded by its name and revision,
    or from `name` (e.g. a local copy); its weights must be the recorded ones."""
    recorded = Path(record["name"])
    if name is None and recorded.is_absolute() and not recorded.exists():  # local VAEs are recorded by absolute path
        raise UsageError(
            f"the VAE recorded with these latents (or the model trained on them), {recorded}, is not there any "
            f"more: give --vae with its new path (a copy with the same weights)"
        )
    codec = load_vae(name or record["name"], device, precision, revision=None if name else record.get("revision"))
    check_same_vae(record, codec)
    return codec


def same_vae(a, b):
    """Whether two VAE records (None: pixel space, no VAE) make the same latents: same weights and scale factor."""
    key = [None if r is None else (r["fingerprint"], float(r["scale_factor"])) for r in (a, b)]
    return key[0] == key[1]


def vae_label(record):
    """A VAE record in words, for errors."""
    if record is None:
        return "no VAE (pixel space)"
    return f"{record['name']} (weights {record['fingerprint']}, scale factor {record['scale_factor']})"


def check_same_vae(record, codec):
    """UsageError unless `codec` is the VAE of `record` (same weights fingerprint and scale factor)."""
    if not same_vae(record, codec.describe()):
        raise UsageError(
            f"VAE mismatch: the latents were encoded with {vae_label(record)}, but --vae is "
            f"{vae_label(codec.describe())}: decode with the VAE the latents were encoded with"
        )


#################################################################################
#                         fastdit vae: train the small VAE                      #
#################################################################################


DESCRIPTION = """\
Train fastdit's small convolutional VAE on the embedded digits (upsampled to 16x16) or an image folder.
Writes <out>/vae.pt (weights, config, latent scale factor) and <out>/reconstructions.png; then
`fastdit latents --vae <out>/vae.pt` encodes a dataset with it for `fastdit train --latents`.
Until then <out>/training-state.pt keeps the run (every --ckpt-every steps, and after the step in flight
on Ctrl-C, SIGTERM or SIGUSR1): the same command with the same --out continues it, ending with the
weights of an uninterrupted run (bit for bit on a CPU); vae.pt replaces it once training is done."""
# The resumable state of a run in progress: never a VAE (load_vae refuses it), removed once vae.pt is written.
STATE_FILE = "training-state.pt"
STATE_FORMAT = "fastdit-vae-state"


def add_arguments(parser):
    parser.add_argument(
        "--data", help="image folder (class per sub-folder), mnist:DIR or cifar10:DIR; default: the embedded digits"
    )
    parser.add_argument(
        "--image-size",
        type=_args.positive,
        default=16,
        help="image size, divisible by 2**--downsample; default 16 (the 8x8 digits upsampled)",
    )
    parser.add_argument(
        "--channels", type=int, choices=[1, 3], help="image channels; default 1 for the digits, 3 for a folder"
    )
    parser.add_argument("--latent-channels", type=_args.positive, default=4, help="channels of the latents; default 4")
    parser.add_argument(
        "--downsample",
        type=_args.integer(0, 8),
        default=2,
        help="stride-2 stages: latents are image_size / 2**downsample; default 2",
    )
    parser.add_argument(
        "--base-channels", type=_args.positive, default=32, help="channels of the convolutions; default 32"
    )
    parser.add_argument("--beta", type=_args.number(0), default=1e-3, help="KL weight (per pixel); default 0.001")
    parser.add_argument(
        "--steps",
        type=_args.positive,
        default=1000,
        help="training steps (a continued run may have more); default 1000",
    )
    parser.add_argument("--batch-size", type=_args.positive, default=128, help="images per step; default 128")
    parser.add_argument(
        "--lr", type=_args.number(0, low_open=True), default=2e-3, help="Adam learning rate; default 0.002"
    )
    parser.add_argument("--seed", type=_args.seed, default=0, help="seed of the weights and batches; default 0")
    _args.add_device(parser, per_rank=False)
    parser.add_argument(
        "--out",
        type=_args.output_folder,
        help="output folder (the same command with it continues an interrupted run); default runs/vae-<data>-<time>",
    )
    parser.add_argument(
        "--log-every", type=_args.positive, default=100, help="show the losses every N steps; default 100"
    )
    parser.add_argument(
        "--ckpt-every",
        type=_args.non_negative,
        default=100,
        help=f"save the run's state (<out>/{STATE_FILE}) every N steps, to continue it after a crash (0: only when "
        "stopped and after the last step); default 100",
    )


def run_settings(args, dataset):
    """What decides the trained weights, by flag: a continued run must have the same ones (--steps may grow)."""
    data = dataset.describe()
    return {
        "--data": {k: v for k, v in data.items() if k not in ("image_size", "channels")},  # their own flags
        "--image-size": args.image_size,
        "--channels": data["channels"],
        "--latent-channels": args.latent_channels,
        "--downsample": args.downsample,
        "--base-channels": args.base_channels,
        "--beta": args.beta,
        "--batch-size": args.batch_size,
        "--lr": args.lr,
        "--seed": args.seed,
    }


def _setting_text(flag, value):
    return f"{value.get('path', value['kind'])} ({value['size']} images)" if flag == "--data" else str(value)


def unfinished_run(out, settings, steps):
    """The state of the interrupted run in `out` that this one continues (None: there is none). Refused
    (UsageError): an `out` holding a finished VAE, or a run of other settings, or one past --steps."""
    if (out / "vae.pt").exists():  # latents encoded and runs trained with that VAE need it unchanged
        raise UsageError(f"--out {out} holds another VAE ({out / 'vae.pt'}): give a new --out")
    path = out / STATE_FILE
    if not path.exists():
        return None
    state = load_plain(path, f"--out {out}: the interrupted run's state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UsageError(f"{path} is not the state of a `fastdit vae` run: give another --out, or delete it")
    for flag, value in settings.items():
        kept = state["settings"].get(flag)
        if kept != value:
            raise UsageError(
                f"{flag} {_setting_text(flag, value)} differs from the interrupted run's {_setting_text(flag, kept)} "
                f"(its state: {path}): continue it with the same settings, or give another --out"
            )
    done = len(state["losses"])
    if steps < done:
        raise UsageError(
            f"--steps {steps}: the interrupted run in {out} is at step {done} already; give --steps {done} or more"
        )
    return state


def save_state(path, settings, vae, opt, losses, device):
    """The run so far, to continue it: its step is the number of losses (one a step)."""
    state = dict(
        format=STATE_FORMAT,
        settings=settings,
        vae=vae.state_dict(),
        opt=opt.state_dict(),
        losses=losses,
        rng=rng_state(device),  # the batches and the posterior samples
    )
    atomic_save(state, path)


def train_vae(args):
    """Train SmallVAE; write <out>/vae.pt (weights, config, latent scale factor) and a reconstruction grid.
    With the state of an interrupted run in <out>, continue it.

    Returns dict(path, losses (per step, the whole run's), scale_factor, out).
    """
    from ._dist import Dist, pick_device

    if args.image_size % 2**args.downsample:
        raise UsageError(f"--image-size {args.image_size} must be divisible by 2**--downsample = {2**args.downsample}")
    device = pick_device(args.device, 0)
    dataset = build_dataset(args.data, args.image_size, channels=args.channels, flip=False)
    images = dataset.all_images()  # (N, C, S, S) in [-1, 1]
    out = Path(args.out or f"runs/vae-{dataset.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    settings = run_settings(args, dataset)
    unfinished_run(out, settings, args.steps)  # bad input first: a refused --out is left untouched
    if args.out is None:
        print(f"fastdit vae: into {out} (if interrupted, the same command with --out {out} continues it)")
    # A second command in the same folder would write over this one's state; a plain run is a world of one.
    with exclusive_output(out, str(out), Dist(0, 1, 0, device, owns_group=False)):
        state = unfinished_run(out, settings, args.steps)  # again: the folder may have changed before the lock
        remove_stale_temporaries(out)  # a process killed while writing the state left its temporary
        torch.manual_seed(args.seed)
        vae = SmallVAE(images.shape[1], args.latent_channels, args.base_channels, args.downsample).to(device)
        opt = torch.optim.Adam(vae.parameters(), lr=args.lr)
        losses = []
        if state is not None:
            vae.load_state_dict(state["vae"])
            opt.load_state_dict(state["opt"])
            losses = state["losses"]
            set_rng_state(state["rng"], device)
            print(f"fastdit vae: continuing the run in {out} from step {len(losses)}")
        try:
            # Ctrl-C too ends the step in flight: the state is whole only between steps.
            with StopSignals(ctrl_c=True) as stop:
                save = functools.partial(save_state, out / STATE_FILE, settings, vae, opt, losses, device)
                _train_steps(vae, opt, images, args, losses, stop, save)
                stop.raising = True  # the last step's state is written: from here a signal stops at once,
                if stop.received:  # and one that came while it was written stops now
                    raise interruption(stop.received)
                scale = _scale_and_grid(vae, images, out, device)
                stop.raising = False  # vae.pt written and the state removed, or neither: a signal now comes too late
                return _write_vae(vae, scale, dataset, args, losses, out)
        except KeyboardInterrupt as e:  # said on the command's one `interrupted` (or `stopped by`) line
            raise reworded(
                e,
                f"after step {len(losses)} of {args.steps}, kept in {out / STATE_FILE}: the same command with "
                f"--out {out} goes on from there",
            ) from None


def _train_steps(vae, opt, images, args, losses, stop, save):
    """The steps up to --steps, each appending its loss; save() every --ckpt-every steps, after the last, and
    after the step in flight when `stop` has noted a signal, which is then raised (as its interruption)."""
    from tqdm import tqdm

    with tqdm(total=args.steps, initial=len(losses), desc="vae", dynamic_ncols=True) as bar:
        while len(losses) < args.steps:
            x = images[torch.randint(0, len(images), (args.batch_size,))].to(next(vae.parameters()).device)
            parts = vae.loss(x, args.beta)
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            opt.step()
            losses.append(parts["loss"].item())
            bar.update(1)
            step = len(losses)
            if step % args.log_every == 0 or step == args.steps:
                bar.set_postfix(
                    loss=f"{losses[-1]:.4f}", mse=f"{parts['mse'].item():.4f}", kl=f"{parts['kl'].item():.3f}"
                )
            stopping = stop.received  # read once: one that comes while the state is written stops after the next step
            if stopping or step == args.steps or (args.ckpt_every and step % args.ckpt_every == 0):
                save()
            if stopping:
                raise interruption(stopping)


def _scale_and_grid(vae, images, out, device):
    """The latent scale factor; writes the reconstruction grid."""
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(b.to(device))[0] for b in images.split(512)])
        scale = 1.0 / means.std().item()  # makes the latents roughly unit variance, like SD's 0.18215
        shown = images[:32].to(device)
        recon = vae.decode(vae.encode(shown)[0])
    save_grid(torch.cat([shown, recon]).cpu(), out / "reconstructions.png", nrow=16)
    return scale


def _write_vae(vae, scale, dataset, args, losses, out):
    """vae.pt, which replaces the run's state: the run is done."""
    path = out / "vae.pt"
    atomic_save(
        dict(
            format=VAE_FORMAT,
            vae=vae.state_dict(),
            config=vae.config,
            scale_factor=scale,
            data=dataset.describe(),
            steps=args.steps,
            beta=args.beta,
            final_loss=losses[-1],
        ),
        path,
    )
    (out / STATE_FILE).unlink()  # nothing left to continue: a folder holding vae.pt is refused
    print(
        f"VAE: final loss {losses[-1]:.4f}, latent scale factor {scale:.4f}, latents "
        f"{args.latent_channels}x{args.image_size // 2**args.downsample}x{args.image_size // 2**args.downsample}"
    )
    print(f"wrote {path} and {out / 'reconstructions.png'} (top: images, bottom: reconstructions)")
    return dict(path=str(path), losses=losses, scale_factor=scale, out=str(out))
