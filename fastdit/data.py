"""Training data: the embedded digits, an image folder, and a resumable sharded sampler.

Every dataset item is addressed as (index, flip): the sampler draws the horizontal flips from
its seeded per-epoch generator, so what a batch holds depends only on (seed, epoch, batch
position) — never on worker processes or on where a run was resumed.
"""

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import datasets
from ._util import UsageError
from .datasets import TensorImages

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


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
            x = F.interpolate(
                x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=image_size < 8
            ).clamp(-1, 1)
        super().__init__(x, torch.from_numpy(digits.target).long(), 10, "digits")
        self.classes = [str(d) for d in range(10)]

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


class UnreadableImage(UsageError):
    """An image file that cannot be decoded (the message names the file and the reason)."""


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit gray (PNG, TIFF, PGM): 0..65535


def to_8bit(img, channels):
    """A PIL image of any mode -> 8-bit 'RGB' (channels 3) or 'L' (channels 1), as a viewer shows it.

    16-bit gray (I;16*, and I, which 16-bit PNGs open as in older Pillow) is scaled 65535 -> 255
    (a plain convert clips it to white); float gray (F) is read as 0..1; transparency (RGBA, LA,
    PA, premultiplied RGBa/La, a palette or a colour key with transparency) is composited over
    white; P, 1, CMYK, YCbCr, LAB, HSV go through Pillow's own conversions.
    """
    from PIL import Image

    if img.mode in SIXTEEN_BIT_MODES:
        img = Image.fromarray(np.clip(np.rint(np.asarray(img, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.rint(np.asarray(img, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8), "L")
    elif img.mode == "La":  # premultiplied: Pillow converts it to LA only
        img = img.convert("LA")
    if "A" in img.mode or "a" in img.mode or "transparency" in img.info:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("RGB" if channels == 3 else "L")


def read_uint8(path, image_size, channels):
    """An image file -> uint8 (S, S, 3) or (S, S): any PIL mode (to_8bit), ADM center crop.

    Raises UnreadableImage naming the file for anything Pillow cannot decode (also a truncated file).
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            return center_crop_arr(to_8bit(img, channels), image_size)
    except Exception as e:  # an untrusted file fails in any decoder, with any error type
        raise UnreadableImage(f"{path}: {type(e).__name__}: {e}") from e


def read_image(path, image_size, channels):
    """An image file -> (C, S, S) float32 in [-1, 1] (read_uint8, then DiT's normalisation)."""
    x = torch.from_numpy(np.array(read_uint8(path, image_size, channels), dtype=np.float32)).div(127.5).sub(1.0)
    return x.permute(2, 0, 1) if x.dim() == 3 else x.unsqueeze(0)  # (C, S, S)


def warn_unreadable(error, skipped):
    """One line on stderr about a skipped image, with the count of those skipped so far (by this process)."""
    print(f"fastdit: warning: skipped an unreadable image ({skipped} so far): {error}", file=sys.stderr, flush=True)


def check_data_path(data):
    """A UsageError unless --data names an existing folder (None: the digits). Checked before anything slow
    (a VAE to load, or to download): a mistyped path is the first thing said."""
    if data is not None and datasets.parse(data):
        datasets.folder(data)
    elif data is not None:
        _image_folder(data)


def _image_folder(root):
    root = Path(root)
    if not root.exists():
        raise UsageError(f"data path {str(root)!r} does not exist")
    if not root.is_dir():
        raise UsageError(f"data path {str(root)!r} is not a folder (expected <folder>/<class>/<image>)")
    return root


def list_image_folder(root):
    """root/<class>/<images, any depth> -> (sorted class names, [(path, label)]); clear errors for empty ones."""
    root = _image_folder(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UsageError(
            f"data path {str(root)!r} holds no class sub-folders (expected {root}/<class>/<image>.png; "
            f"extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    files = []
    for label, cls in enumerate(classes):
        found = [
            (str(f), label)
            for f in sorted((root / cls).rglob("*"))
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
        ]
        if not found:
            raise UsageError(
                f"class folder {str(root / cls)!r} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)}): "
                f"remove it or add its images"
            )
        files += found
    return classes, files


class ImageFolderDataset(torch.utils.data.Dataset):
    """root/<class>/<image>: classes are the sorted sub-folder names; center crop to image_size, flips.

    Images are decoded when read (use --num-workers for parallel decoding). An unreadable image
    never stops a run: training reads the next readable one in its place (load() raises instead),
    with a warning naming the file.
    """

    def __init__(self, root, image_size, channels=3, flip=True):
        self.classes, self.files = list_image_folder(root)
        self.root, self.image_size, self.channels, self.flip = Path(root), image_size, channels, flip
        self.num_classes, self.name = len(self.classes), self.root.name or "images"
        self.unreadable = set()  # indices found unreadable by this process

    def __len__(self):
        return len(self.files)

    def load(self, i):
        """(image (C, S, S) in [-1, 1], label); raises UnreadableImage."""
        path, label = self.files[i]
        return read_image(path, self.image_size, self.channels), label

    def __getitem__(self, item):
        i, flip = item
        for j in (k % len(self) for k in range(i, i + len(self))):
            if j in self.unreadable:
                continue
            try:
                x, label = self.load(j)
            except UnreadableImage as e:
                self.unreadable.add(j)
                warn_unreadable(f"{e}; reading the next image in its place", len(self.unreadable))
                continue
            return (x.flip(-1) if flip else x), label
        raise UsageError(f"no image under {str(self.root)!r} is readable")

    def check_readable(self):
        """Before a run starts: a UsageError unless some image is readable (on healthy data, one read)."""
        first = None
        for i in range(len(self)):
            try:
                self.load(i)
                return
            except UnreadableImage as e:
                first = first or e
        raise UsageError(f"none of the {len(self)} images under {str(self.root)!r} is readable (the first: {first})")

    def readable(self):
        """[(index, image, label)] of every readable image; each unreadable one is skipped with a warning."""
        self.check_readable()  # none readable: one error line, not a warning per file before it
        out = []
        for i in range(len(self)):
            try:
                out.append((i, *self.load(i)))
            except UnreadableImage as e:
                self.unreadable.add(i)
                warn_unreadable(e, len(self.unreadable))
        return out

    def all_images(self):
        return torch.stack([x for _, x, _ in self.readable()])

    def describe(self):
        return dict(
            kind="image-folder",
            path=str(self.root.resolve()),
            image_size=self.image_size,
            channels=self.channels,
            size=len(self),
            classes=self.classes,
        )


def build_dataset(data, image_size, channels=None, flip=None):
    """data None -> the digits; 'mnist:DIR' / 'cifar10:DIR' -> fastdit.datasets; else an image folder.
    channels/flip None -> the dataset's default."""
    if data is None:
        if channels not in (None, 1):
            raise UsageError(
                f"the digits have 1 channel, not the {channels} asked for (by --channels, or a --vae of RGB "
                f"images): give --data FOLDER"
            )
        return DigitsDataset(image_size)
    if datasets.parse(data):
        return datasets.build(data, image_size, channels, flip)
    folder = ImageFolderDataset(data, image_size, channels=channels or 3, flip=True if flip is None else flip)
    folder.check_readable()  # now, not when a run has started and written its folder
    return folder


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
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
