"""`fastdit latents`: encode a dataset once into a folder of latent chunks; stream them back for training.

    DIR/manifest.json              what the latents are: the VAE (name, revision, weights fingerprint,
                                   scale factor), DiT's preprocessing (ADM center crop to image_size,
                                   [-1, 1]), flips, mean|sample, dtype, classes, count, chunks, skipped files
    DIR/chunk-NNNNNN.safetensors   latents (n, C, h, w), flipped (n, C, h, w) with flips, labels (n,),
                                   index (n,): the items' positions in the source data

Chunk c holds source items [c * chunk_size, (c + 1) * chunk_size); under torchrun rank r encodes
the chunks c = r mod world_size. A chunk file is written atomically, so after a crash the same
command removes the half-written temporaries, skips the chunks already written and finishes the
rest; rank 0 then marks the manifest complete. While a run writes DIR, a second one is refused
(each rank holds a lock file there, DIR/.lock-rankNNNNN). Training reads only complete folders.
Unreadable images are skipped with a warning naming each, and listed in the manifest.
"""

import bisect
import json
import sys
import time
from pathlib import Path

import torch

from . import _args, datasets
from ._dist import init_distributed
from ._signals import StopSignals, reworded
from ._util import (
    LOCK_PREFIX,
    PRECISION_DTYPES,
    UsageError,
    atomic_write,
    exclusive_output,
    remove_stale_temporaries,
)
from .data import UnreadableImage, build_dataset, check_data_path, warn_unreadable
from .vae import SmallVAECodec, load_vae

FORMAT = "fastdit-latents"
VERSION = 1
MANIFEST = "manifest.json"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What a folder's description (in training checkpoints) keeps of its manifest.
DESCRIBED = ("vae", "scale_factor", "crop", "image_size", "flips", "latent", "latent_shape", "count", "classes")
# Recorded for the manifest's readers: the preprocessing every latents folder uses (DiT's train.py).
CROP = "adm-center-crop"


def add_arguments(parser):
    parser.add_argument(
        "--vae",
        required=True,
        help="the VAE: ema | mse (DiT's stabilityai/sd-vae-ft-ema | -mse from the Hugging Face hub, "
        "cached for offline use), another hub id, a local diffusers AutoencoderKL folder, or a "
        "fastdit VAE checkpoint (`fastdit vae`); required",
    )
    parser.add_argument("--vae-revision", help="hub revision (branch, tag or commit) of --vae; default main")
    parser.add_argument(
        "--data", help="image folder (class per sub-folder), mnist:DIR or cifar10:DIR; default: the embedded digits"
    )
    parser.add_argument(
        "--image-size",
        type=_args.positive,
        help="image size to encode, a multiple of the VAE's factor; default: the VAE's training size "
        "for the digits, MNIST and CIFAR-10, else 256",
    )
    parser.add_argument(
        "--latent",
        choices=["mean", "sample"],
        help="store the posterior mean, or one sample per image; default: sample for a diffusers VAE "
        "(what DiT's train.py feeds the model), mean for fastdit's small VAE",
    )
    parser.add_argument(
        "--flips",
        choices=["auto", "both", "none"],
        default="auto",
        help="both: also encode every image mirrored, training then picks one at random; "
        "none: no flips; default auto: both for folders, none for the digits",
    )
    parser.add_argument("--batch-size", type=_args.positive, default=64, help="images per VAE call; default 64")
    parser.add_argument("--chunk-size", type=_args.positive, default=4096, help="images per chunk file; default 4096")
    parser.add_argument(
        "--precision",
        choices=list(PRECISION_DTYPES),
        default="fp32",
        help="autocast dtype of the VAE (bf16 / fp16 on a GPU); default fp32",
    )
    parser.add_argument(
        "--dtype",
        choices=list(STORAGE_DTYPES),
        default="float32",
        help="dtype of the stored latents (float16 halves the disk); default float32",
    )
    parser.add_argument("--num-workers", type=_args.non_negative, default=0, help="image decoding processes; default 0")
    parser.add_argument("--seed", type=_args.seed, default=0, help="seed of --latent sample; default 0")
    _args.add_device(parser)
    parser.add_argument(
        "--out",
        required=True,
        type=_args.output_folder,
        help="output folder (created; rerun the same command to resume); required",
    )


class _Readable(torch.utils.data.Dataset):
    """(image, label, index) of a dataset item, or (None, error message, index) for an unreadable image."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            x, y = self.dataset.load(i)
        except UnreadableImage as e:
            return None, str(e), i
        return x, y, i


def _collate(items):
    good = [(x, y, i) for x, y, i in items if x is not None]
    bad = [msg for x, msg, _ in items if x is None]
    if not good:
        return None, None, [], bad
    return (
        torch.stack([x for x, _, _ in good]),
        torch.tensor([y for _, y, _ in good], dtype=torch.long),
        [i for _, _, i in good],
        bad,
    )


def chunk_path(out, c):
    return Path(out) / f"chunk-{c:06d}.safetensors"


def plan(dataset, codec, args, flips):
    """The manifest's settings: what a resumed run must share with the run it continues."""
    size = dataset.image_size // codec.factor
    return dict(
        format=FORMAT,
        version=VERSION,
        vae=codec.describe(),
        scale_factor=codec.scale_factor,
        crop=CROP,
        image_size=dataset.image_size,
        image_channels=dataset.channels,
        flips=flips == "both",
        latent=args.latent or ("mean" if isinstance(codec, SmallVAECodec) else "sample"),
        seed=args.seed,
        precision=args.precision,
        dtype=args.dtype,
        chunk_size=args.chunk_size,
        latent_shape=[codec.latent_channels, size, size],
        source_items=len(dataset),
        num_classes=dataset.num_classes,
        classes=list(dataset.classes),
        data=dataset.describe(),
    )


FINISHED_KEYS = ("complete", "count", "chunks", "skipped", "class_counts")  # what finish() adds to the settings


def _check_out(out, settings):
    """Refuse (UsageError) an --out that is a file, a folder of latents of other settings, or one of other files."""
    path = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the latents")
    if path.is_file():
        old = read_manifest(path)
        differ = sorted(k for k in set(settings) | set(old) if k not in FINISHED_KEYS and old.get(k) != settings.get(k))
        if differ:
            raise UsageError(
                f"--out {out} holds latents made with other settings ({', '.join(differ)} differ): "
                f"give another --out, or delete it to start over"
            )
    elif out.is_dir() and any(not f.name.startswith(LOCK_PREFIX) for f in out.iterdir()):
        raise UsageError(f"--out {out} is a folder with other files in it: give a new or empty folder")


def _start(out, settings):
    """Create DIR with an incomplete manifest, or check that DIR holds a run of the same settings (and remove
    what a killed one left half-written: call it as the only process writing DIR, exclusive_output)."""
    _check_out(out, settings)
    if (out / MANIFEST).is_file():
        remove_stale_temporaries(out)  # a process killed while writing a chunk left its temporary
    else:
        write_manifest(out, dict(settings, complete=False))


def _on_main(dist, check, *args):
    """check(*args) on rank 0; a UsageError it raises, raised on every rank (none waits for the others)."""
    refused = None
    if dist.is_main:
        try:
            check(*args)
        except UsageError as e:
            refused = str(e)
    refused = dist.broadcast_object(refused)
    if refused:
        raise UsageError(refused)


def read_manifest(path):
    """A manifest.json written by `fastdit latents` (its format and version checked)."""
    try:
        meta = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not a fastdit latents manifest ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UsageError(f"{path} is not a version-{VERSION} manifest written by `fastdit latents`")
    return meta


def write_manifest(out, manifest):
    atomic_write(Path(out) / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))


@torch.no_grad()
def encode_chunks(dataset, codec, out, settings, rank=0, world_size=1, batch_size=64, num_workers=0):
    """Encode this rank's chunks that are not on disk yet; returns the indices of the chunks it wrote."""
    n, size = len(dataset), settings["chunk_size"]
    todo = [c for c in range(rank, -(-n // size), world_size) if not chunk_path(out, c).exists()]
    # Batches never cross a chunk: a chunk is complete when its last batch is encoded.
    batches, owner = [], []
    for c in todo:
        for lo in range(c * size, min((c + 1) * size, n), batch_size):
            batches.append(list(range(lo, min(lo + batch_size, (c + 1) * size, n))))
            owner.append(c)
    loader = torch.utils.data.DataLoader(
        _Readable(dataset),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_collate,
        generator=torch.Generator().manual_seed(0),
    )
    from tqdm import tqdm

    sample, skipped, chunk = settings["latent"] == "sample", 0, None
    for b, (x, y, index, bad) in enumerate(
        tqdm(loader, total=len(batches), desc=f"latents (rank {rank})", disable=rank != 0, dynamic_ncols=True)
    ):
        if owner[b] != chunk:
            chunk, zs, labels, indices, unreadable = owner[b], [], [], [], []
            torch.manual_seed(settings["seed"] * 1_000_003 + chunk)  # --latent sample: the same draws on any world size
        for msg in bad:
            skipped += 1
            warn_unreadable(msg, skipped)
        unreadable += bad
        if x is not None:
            zs.append(codec.encode(torch.cat([x, x.flip(-1)]) if settings["flips"] else x, sample=sample).cpu())
            labels.append(y)
            indices += index
        if b + 1 == len(batches) or owner[b + 1] != chunk:
            _write_chunk(out, chunk, zs, labels, indices, unreadable, settings)
    return todo


def _write_chunk(out, c, zs, labels, indices, unreadable, settings):
    from safetensors.torch import save

    dtype = STORAGE_DTYPES[settings["dtype"]]
    shape = settings["latent_shape"]
    flips = settings["flips"]
    z = (
        torch.cat([t.view(2 if flips else 1, -1, *shape).transpose(0, 1) for t in zs], 0)
        if zs
        else torch.zeros(0, 2 if flips else 1, *shape)
    )  # (n, 1 or 2, C, h, w)
    tensors = dict(
        latents=z[:, 0].to(dtype).contiguous(),
        labels=torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
        index=torch.tensor(indices, dtype=torch.long),
    )
    if flips:
        tensors["flipped"] = z[:, 1].to(dtype).contiguous()
    data = save(tensors, metadata=dict(unreadable=json.dumps(unreadable)))
    atomic_write(chunk_path(out, c), lambda f: f.write(data))


def finish(out, settings):
    """Rank 0, once every chunk is written: list the chunks and mark the manifest complete."""
    from safetensors import safe_open

    n, size = settings["source_items"], settings["chunk_size"]
    chunks, skipped, class_counts = [], [], torch.zeros(settings["num_classes"], dtype=torch.int64)
    for c in range(-(-n // size)):
        path = chunk_path(out, c)
        if not path.is_file():
            raise UsageError(f"{path} is missing: a process did not finish its chunks; rerun the same command")
        with safe_open(str(path), "pt") as f:
            labels = f.get_tensor("labels")
            chunks.append(dict(file=path.name, count=len(labels)))
            class_counts += torch.bincount(labels.long(), minlength=len(class_counts))
            skipped += json.loads(f.metadata()["unreadable"])
    if sum(ch["count"] for ch in chunks) == 0:
        raise UsageError(f"no image of {settings['data'].get('path', 'the data')} was readable")
    manifest = dict(
        settings,
        complete=True,
        count=sum(ch["count"] for ch in chunks),
        chunks=chunks,
        skipped=skipped,
        class_counts=class_counts.tolist(),
    )
    write_manifest(out, manifest)
    return manifest


def empty_classes(manifest):
    """The classes of a latents manifest that hold no latents (every image of theirs unreadable)."""
    return [c for c, n in zip(manifest["classes"], manifest.get("class_counts", ())) if n == 0]


def make_latents(args):
    """fastdit latents: encode a dataset (the digits or an image folder) once with a VAE, into a folder of chunks.

    Under torchrun the chunks are shared over the processes; rerunning the same command after a
    crash finishes the missing chunks. `fastdit train --latents DIR` trains on the folder.
    """
    dist = init_distributed(args.device)
    try:
        check_data_path(args.data)
        codec = load_vae(args.vae, dist.device, args.precision, revision=args.vae_revision)
        trained = codec.trained_on or {}
        # Default size: the digits, MNIST, CIFAR-10 at the size the VAE was trained on; DiT's 256 for a folder.
        own_size = args.data is None or datasets.parse(args.data)
        image_size = args.image_size or (trained.get("image_size", 8) if own_size else 256)
        if image_size < 1 or image_size % codec.factor:
            raise UsageError(
                f"--image-size {image_size} must be a positive multiple of the VAE's downsampling factor {codec.factor}"
            )
        dataset = build_dataset(args.data, image_size, channels=codec.image_channels)
        flips = args.flips if args.flips != "auto" else ("both" if dataset.flip else "none")
        settings = plan(dataset, codec, args, flips)
        out = Path(args.out)
        _on_main(dist, _check_out, out, settings)  # bad input first: a refused --out is left untouched
        # A second run would encode the same chunks and remove the temporaries of the first one's writes.
        with exclusive_output(out, str(out), dist):
            _on_main(dist, _start, out, settings)  # checked again: DIR may have changed before the lock
            t0 = time.time()
            # A stop signal (SIGTERM, SIGUSR1) raises where Ctrl-C would: the chunks done are kept all the same.
            with StopSignals(raising=True):
                try:
                    encode_chunks(
                        dataset, codec, out, settings, dist.rank, dist.world_size, args.batch_size, args.num_workers
                    )
                except KeyboardInterrupt as e:  # said on the command's one `interrupted` (or `stopped by`) line
                    raise reworded(e, f"the chunks done are kept in {out}: the same command encodes the rest") from None
            dist.barrier()
            if dist.is_main:
                manifest = finish(out, settings)
                print(
                    f"encoded {manifest['count']} images{' (and their mirror images)' if manifest['flips'] else ''} "
                    f"into latents {tuple(manifest['latent_shape'])} in {time.time() - t0:.1f}s -> {out} (scale "
                    f"factor {codec.scale_factor:.5f}; {len(manifest['skipped'])} unreadable images skipped)"
                )
                empty = empty_classes(manifest)
                if empty:
                    print(
                        f"fastdit: warning: no image of class {', '.join(map(repr, empty))} was "
                        f"readable: a class-conditional model trained on these latents never sees it",
                        file=sys.stderr,
                    )
        return str(out)
    finally:
        dist.close()


class LatentsDataset(torch.utils.data.Dataset):
    """A complete latents folder written by `fastdit latents`, read item by item from its chunk files (memory-mapped).

    image_size is the latents' spatial size (what the model sees); meta["image_size"] the images'.
    """

    def __init__(self, path):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            what = (
                "does not exist"
                if not self.path.exists()
                else "is a file, not a folder"
                if self.path.is_file()
                else f"has no {MANIFEST}"
            )
            raise UsageError(f"latents folder {str(self.path)!r} {what} (write one with `fastdit latents --out DIR`)")
        meta = read_manifest(manifest)
        if not meta.get("complete"):
            raise UsageError(
                f"latents folder {str(self.path)!r} is incomplete (its `fastdit latents` run was "
                f"interrupted): rerun the same command to finish it"
            )
        missing = [k for k in (*DESCRIBED, "num_classes", "chunks") if k not in meta]
        if missing:
            raise UsageError(f"{manifest} lacks {', '.join(missing)}: not a complete `fastdit latents` manifest")
        for ch in meta["chunks"]:
            self._check_chunk(ch, meta)
        self.meta, self.flip = meta, meta["flips"]
        self.num_classes, self.classes = meta["num_classes"], meta["classes"]
        self.channels, self.image_size = meta["latent_shape"][0], meta["latent_shape"][-1]
        self.name = f"latents-{self.path.resolve().name}"
        counts = [ch["count"] for ch in meta["chunks"]]
        self.starts = [sum(counts[:k]) for k in range(len(counts))]
        self.size = sum(counts)
        self._files = {}

    def _check_chunk(self, ch, meta):
        """A chunk file as the manifest lists it: readable, its tensors of the manifest's shapes (headers only)."""
        from safetensors import safe_open

        where = f"latents folder {str(self.path)!r}: chunk file {ch['file']}"
        if not (self.path / ch["file"]).is_file():
            raise UsageError(f"{where} is missing")
        n, shape = ch["count"], meta["latent_shape"]
        wanted = dict(latents=[n, *shape], labels=[n], **({"flipped": [n, *shape]} if meta["flips"] else {}))
        try:
            with safe_open(str(self.path / ch["file"]), "pt") as f:
                found = {k: f.get_slice(k).get_shape() for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise UsageError(f"{where} is not a readable .safetensors file ({e})") from e
        differ = [f"{k} {found.get(k, 'missing')} (manifest: {v})" for k, v in wanted.items() if found.get(k) != v]
        if differ:
            raise UsageError(f"{where} does not match the manifest: {'; '.join(differ)}")

    def __len__(self):
        return self.size

    def __getstate__(self):  # DataLoader workers open their own memory maps
        return {**self.__dict__, "_files": {}}

    def _chunk(self, k):
        if k not in self._files:
            from safetensors import safe_open

            self._files[k] = safe_open(str(self.path / self.meta["chunks"][k]["file"]), "pt")
        return self._files[k]

    def __getitem__(self, item):
        i, flip = item
        k = bisect.bisect_right(self.starts, i) - 1
        j = i - self.starts[k]
        f = self._chunk(k)
        z = f.get_slice("flipped" if flip else "latents")[j : j + 1][0].float()  # (C, h, w)
        return z, int(f.get_slice("labels")[j : j + 1][0])

    def describe(self):
        return dict(kind="latents", path=str(self.path.resolve()), **{k: self.meta[k] for k in DESCRIBED})
