"""Training data: the embedded digits, an image folder, precomputed latents, and a resumable sharded sampler.

Every dataset item is addressed as (index, flip): the sampler draws the horizontal flips from
its seeded per-epoch generator, so what a batch holds depends only on (seed, epoch, batch
position) — never on worker processes or on where a run was resumed.
"""
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ._util import UsageError, atomic_save, load_plain

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
LATENTS_FORMAT = "fastdit-latents"


class TensorImages(torch.utils.data.Dataset):
    """Images (or latents) held in memory: (N, C, S, S) floats and (N,) labels."""

    def __init__(self, images, labels, num_classes, name, flipped=None):
        self.images, self.labels, self.num_classes, self.name = images, labels, num_classes, name
        self.flipped = flipped  # precomputed flipped versions (latents), or None: flip on the fly
        self.channels, self.image_size = images.shape[1], images.shape[-1]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        i, flip = item
        if not flip:
            return self.images[i], self.labels[i]
        return (self.flipped[i] if self.flipped is not None else self.images[i].flip(-1)), self.labels[i]

    def all_images(self):
        return self.images


class DigitsDataset(TensorImages):
    """scikit-learn's handwritten digits: 1797 real 8x8 images with 17 gray levels, 10 classes.

    Ships inside scikit-learn (no download). Ink is white on black, scaled to [-1, 1];
    image_size != 8 resizes bilinearly. Never flipped: a mirrored digit is not a digit.
    """

    flip = False

    def __init__(self, image_size=8):
        from sklearn.datasets import load_digits

        if image_size < 2:
            raise UsageError(f"--image-size must be at least 2, got {image_size}")
        digits = load_digits()
        x = torch.from_numpy(digits.images).float().div(16.0).mul(2.0).sub(1.0).unsqueeze(1)  # (1797, 1, 8, 8)
        if image_size != 8:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                              antialias=image_size < 8).clamp(-1, 1)
        super().__init__(x, torch.from_numpy(digits.target).long(), 10, "digits")

    def describe(self):
        return dict(kind="digits", image_size=self.image_size, channels=1, size=len(self))


def center_crop_arr(pil_image, image_size):
    """ADM's center crop: halve with a box filter while still 2x too big, bicubic-resize the short side, crop."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


class ImageFolderDataset(torch.utils.data.Dataset):
    """root/<class>/<image>: classes are the sorted sub-folder names; center crop to image_size, flips.

    Images are decoded when read (use --num-workers for parallel decoding).
    """

    def __init__(self, root, image_size, channels=3, flip=True):
        root = Path(root)
        if not root.exists():
            raise UsageError(f"data path {str(root)!r} does not exist")
        if not root.is_dir():
            raise UsageError(f"data path {str(root)!r} is not a folder (expected <folder>/<class>/<image>)")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        self.files = [
            (str(f), label)
            for label, cls in enumerate(self.classes)
            for f in sorted((root / cls).rglob("*"))
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
        ]
        if not self.files:
            raise UsageError(
                f"data path {str(root)!r} holds no images in class sub-folders (expected {root}/<class>/<image>.png; "
                f"extensions {', '.join(IMAGE_EXTENSIONS)})"
            )
        self.root, self.image_size, self.channels, self.flip = root, image_size, channels, flip
        self.num_classes, self.name = len(self.classes), root.name or "images"

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        from PIL import Image

        i, flip = item
        path, label = self.files[i]
        with Image.open(path) as img:
            arr = center_crop_arr(img.convert("RGB" if self.channels == 3 else "L"), self.image_size)
        x = torch.from_numpy(np.array(arr, dtype=np.float32)).div(127.5).sub(1.0)  # (S, S[, 3]) in [-1, 1]
        x = x.permute(2, 0, 1) if x.dim() == 3 else x.unsqueeze(0)  # (C, S, S)
        return (x.flip(-1) if flip else x), label

    def all_images(self):
        return torch.stack([self[(i, False)][0] for i in range(len(self))])

    def describe(self):
        return dict(kind="image-folder", path=str(self.root.resolve()), image_size=self.image_size,
                    channels=self.channels, size=len(self), classes=self.classes)


class LatentsDataset(TensorImages):
    """A latents file written by `fastdit latents`: scaled latents, labels and how they were made."""

    def __init__(self, path):
        obj = load_plain(path, "latents file")
        if not isinstance(obj, dict) or obj.get("format") != LATENTS_FORMAT:
            raise UsageError(f"{path} is not a latents file written by `fastdit latents`")
        self.meta = obj["meta"]
        super().__init__(obj["latents"], obj["labels"], self.meta["num_classes"], f"latents-{Path(path).stem}",
                         flipped=obj.get("flipped"))
        self.flip = self.flipped is not None  # flips only where flipped latents were encoded
        self.path = str(Path(path).resolve())

    def describe(self):
        return dict(kind="latents", path=self.path, size=len(self), **self.meta)


def build_dataset(data, image_size, channels=None, flip=None):
    """data None -> the digits; else an image folder. channels/flip None -> the dataset's default."""
    if data is None:
        if channels not in (None, 1):
            raise UsageError("the digits have 1 channel; --channels 3 needs --data FOLDER")
        return DigitsDataset(image_size)
    return ImageFolderDataset(data, image_size, channels=channels or 3, flip=True if flip is None else flip)


class ShardedBatches:
    """Endless local batches of (index, flip): epoch-wise shuffled, sharded over ranks, resumable.

    Epoch e's order is a permutation from a generator seeded (seed, e). Global batch b of the
    epoch is order[b*G : (b+1)*G] and rank r takes the r-th of its world_size equal slices, so
    a position (epoch, batch) names the same data whatever the world size. The incomplete last
    global batch of an epoch is dropped (as DiT's drop_last=True).
    """

    def __init__(self, size, global_batch, rank, world_size, seed, flip, epoch=0, batch=0):
        if global_batch > size:
            raise UsageError(f"the dataset has {size} items, fewer than --global-batch-size {global_batch}")
        self.size, self.global_batch, self.rank, self.world = size, global_batch, rank, world_size
        self.local = global_batch // world_size
        self.seed, self.flip, self.start = seed, flip, (epoch, batch)
        self.per_epoch = size // global_batch

    def advance(self, position, batches=1):
        """The position `batches` global batches after `position`."""
        epoch, batch = position
        epoch, batch = epoch + (batch + batches) // self.per_epoch, (batch + batches) % self.per_epoch
        return epoch, batch

    def __iter__(self):
        epoch, batch = self.start
        while True:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.size)
            flips = rng.integers(0, 2, self.size) if self.flip else np.zeros(self.size, dtype=np.int64)
            for b in range(batch, self.per_epoch):
                lo = b * self.global_batch + self.rank * self.local
                yield [(int(i), bool(f)) for i, f in zip(order[lo : lo + self.local], flips[lo : lo + self.local])]
            epoch, batch = epoch + 1, 0


def make_loader(dataset, batches, num_workers, pin_memory, seed):
    # A private generator: the loader draws its workers' base seed from it, not from the global
    # RNG, whose stream (diffusion noise and timesteps) must not depend on when a loader starts.
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed),
    )


#################################################################################
#                    fastdit latents: encode a dataset once                     #
#################################################################################


def add_latents_arguments(parser):
    parser.add_argument("--vae", required=True, help="fastdit VAE checkpoint (`fastdit vae`) or local diffusers AutoencoderKL folder")
    parser.add_argument("--data", help="image folder (class per sub-folder); default: the embedded digits")
    parser.add_argument("--image-size", type=int, help="image size to encode (default: the VAE's training size for the digits, else 256)")
    parser.add_argument("--latent", choices=["mean", "sample"], default="mean",
                        help="store the posterior mean, or one sample per image (default mean)")
    parser.add_argument("--flips", choices=["auto", "both", "none"], default="auto",
                        help="both: also encode every image mirrored, training then picks one at random; "
                             "none: no flips; auto: both for folders, none for the digits")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of --latent sample")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", required=True, help="latents file to write (.pt)")


@torch.no_grad()
def encode_latents(dataset, codec, out, batch_size=64, latent="mean", flips="none", seed=0):
    """Encode every image of `dataset` once (and, with flips='both', its mirror image) into a latents file.

    The file holds scaled latents (what the DiT trains on), labels, and meta: the VAE (kind,
    path, config, scale factor), latent='mean'|'sample', the flip policy and the source data.
    """
    if flips not in ("both", "none"):
        raise UsageError(f"flips must be 'both' or 'none', got {flips!r}")
    torch.manual_seed(seed)
    lat, lat_flipped, labels = [], [], []
    for lo in range(0, len(dataset), batch_size):
        items = [dataset[(i, False)] for i in range(lo, min(lo + batch_size, len(dataset)))]
        x = torch.stack([x for x, _ in items])
        lat.append(codec.encode(x, sample=latent == "sample").float().cpu())
        if flips == "both":
            lat_flipped.append(codec.encode(x.flip(-1), sample=latent == "sample").float().cpu())
        labels += [int(y) for _, y in items]
    latents = torch.cat(lat)
    meta = dict(vae=codec.describe(), scale_factor=codec.scale_factor, latent=latent, flip_policy=flips,
                seed=seed, scaled=True, num_classes=dataset.num_classes, image_size=dataset.image_size,
                image_channels=dataset.channels, latent_shape=list(latents.shape[1:]), data=dataset.describe())
    atomic_save(dict(format=LATENTS_FORMAT, latents=latents, flipped=torch.cat(lat_flipped) if lat_flipped else None,
                     labels=torch.tensor(labels, dtype=torch.long), meta=meta), out)
    return meta


def make_latents(args):
    from ._dist import pick_device
    from .vae import load_vae

    codec = load_vae(args.vae, pick_device(args.device, 0))
    trained = codec.trained_on or {}
    # Default size: the digits at the size the VAE was trained on; DiT's 256 for a folder.
    image_size = args.image_size or (trained.get("image_size", 8) if args.data is None else 256)
    dataset = build_dataset(args.data, image_size, channels=codec.image_channels)
    if image_size % codec.factor:
        raise UsageError(f"--image-size {image_size} must be divisible by the VAE's downsampling factor {codec.factor}")
    flips = args.flips if args.flips != "auto" else ("both" if dataset.flip else "none")
    t0 = time.time()
    meta = encode_latents(dataset, codec, args.out, args.batch_size, args.latent, flips, args.seed)
    print(f"encoded {len(dataset)} images{' (and their mirror images)' if flips == 'both' else ''} into latents "
          f"{tuple(meta['latent_shape'])} in {time.time() - t0:.1f}s -> {args.out} (scale factor {codec.scale_factor:.5f})")
    return meta

