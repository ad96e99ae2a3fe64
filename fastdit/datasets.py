"""MNIST and CIFAR-10 from the files their sites distribute: the small datasets people learn DiT on.
(TensorImages, images held in memory, is theirs and the digits' base class.)

    --data mnist:DIR     DIR holds train-images-idx3-ubyte and train-labels-idx1-ubyte, raw or gzipped
                         (.gz); Fashion-MNIST's files have the same names and format
    --data cifar10:DIR   DIR is cifar-10-batches-py (or holds it): data_batch_1 ... data_batch_5, batches.meta

Nothing is downloaded: DIR is a folder you filled. The training split is read. Files are checked
against their format (magic numbers, sizes, image and label counts) and a bad one is named in a
one-line error. CIFAR-10's batches are Python pickles, and a pickle can run code when loaded: they
are read by an unpickler that resolves only the numpy array constructors those files use (every other
global is refused), then the result is checked to be uint8 images and integer labels.
"""

import gzip
import io
import math
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ._util import UsageError

# Training defaults per dataset (over the digits job's): small models that train on a CPU or one GPU.
PRESETS = {
    "mnist": dict(model="DiT-Tiny/4", image_size=28, steps=3000),  # 28x28 pixels, patch 4: 49 tokens
    "cifar10": dict(
        model="DiT-S/2", image_size=32, lr=3e-4, steps=50_000, ema_decay=0.999, ckpt_every=10_000, sample_every=10_000
    ),  # pixels: 256 tokens; SmallVAE latents (4, 8, 8): 16 tokens
}


class TensorImages(torch.utils.data.Dataset):
    """Images held in memory: (N, C, S, S) floats and (N,) labels."""

    def __init__(self, images, labels, num_classes, name):
        self.images, self.labels, self.num_classes, self.name = images, labels, num_classes, name
        self.channels, self.image_size = images.shape[1], images.shape[-1]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        i, flip = item
        return (self.images[i].flip(-1) if flip else self.images[i]), self.labels[i]

    def load(self, i):
        return self.images[i], int(self.labels[i])

    def all_images(self):
        return self.images


def parse(data):
    """'mnist:DIR' -> ('mnist', 'DIR'); anything else (an image folder) -> None."""
    scheme, sep, rest = str(data).partition(":")
    return (scheme, rest) if sep and scheme in DATASETS else None


def folder(data):
    """The existing folder that data = 'SCHEME:DIR' names, else a UsageError saying what is wrong."""
    scheme, rest = parse(data)
    if not rest:
        raise UsageError(f"--data {data}: give the folder after the colon, e.g. --data {scheme}:data/{scheme}")
    root = Path(rest).expanduser()
    if not root.is_dir():
        raise UsageError(f"--data {data}: {str(root)!r} is not a folder")
    return root


def build(data, image_size=None, channels=None, flip=None):
    """The dataset named by data = 'SCHEME:DIR' (see parse), at image_size (default: its own size)."""
    scheme, root = parse(data)[0], folder(data)
    cls = DATASETS[scheme]
    if channels not in (None, cls.native_channels):
        raise UsageError(f"--data {data}: {scheme} images have {cls.native_channels} channel(s), not {channels}")
    return cls(root, image_size, flip)


class _Uint8Images(TensorImages):
    """Images kept as uint8 (N, C, S, S) (a quarter of float32's memory); items are floats in [-1, 1]."""

    def __init__(self, images, labels, classes, name, root, image_size, flip):
        images = torch.from_numpy(np.ascontiguousarray(images))  # (N, C, s, s) uint8
        if image_size not in (None, images.shape[-1]):
            if image_size < 2:
                raise UsageError(f"--image-size must be at least 2, got {image_size}")
            x = F.interpolate(
                images.float(),
                size=(image_size, image_size),
                mode="bilinear",
                align_corners=False,
                antialias=image_size < images.shape[-1],
            )
            images = x.round().clamp(0, 255).to(torch.uint8)
        super().__init__(images, torch.from_numpy(labels.astype(np.int64)), len(classes), name)
        self.classes, self.root = classes, root
        self.flip = self.default_flip if flip is None else flip

    def __getitem__(self, item):
        x, y = super().__getitem__(item)
        return _to_float(x), y

    def load(self, i):
        x, y = super().load(i)
        return _to_float(x), y

    def all_images(self):
        return _to_float(self.images)

    def describe(self):
        return dict(
            kind=self.name,
            path=str(self.root.resolve()),
            image_size=self.image_size,
            channels=self.channels,
            size=len(self),
            classes=self.classes,
        )


def _to_float(x):
    return x.float().div(127.5).sub(1.0)  # uint8 -> [-1, 1]


#################################################################################
#                                     MNIST                                     #
#################################################################################

IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """The array stored in an IDX file (LeCun's MNIST format), raw or gzipped.

    Layout: two zero bytes, a type code, the number of dimensions n, n big-endian uint32 sizes,
    then the values row-major. At most one byte more than the header announces is read (a gzip bomb
    cannot fill memory), in chunks (a header announcing terabytes allocates nothing), and a file
    holding fewer or more is refused.
    """
    path = Path(path)
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in IDX_TYPES or magic[3] == 0:
                raise UsageError(
                    f"{path}: not an IDX file (magic number {magic.hex() or 'missing'}; expected 0000, a "
                    f"type code in {', '.join(f'{c:02x}' for c in IDX_TYPES)} and the number of dimensions)"
                )
            ndim = magic[3]
            header = f.read(4 * ndim)
            if len(header) < 4 * ndim:
                raise UsageError(f"{path}: truncated IDX header ({ndim} dimensions announced)")
            dims = struct.unpack(f">{ndim}I", header)
            dtype = np.dtype(IDX_TYPES[magic[2]])
            size = math.prod(dims) * dtype.itemsize  # Python ints: no overflow
            body = _read_at_most(f, size + 1)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UsageError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
    if len(body) != size:
        what = "truncated" if len(body) < size else "longer than its header says"
        raise UsageError(
            f"{path}: {what}: dimensions {dims} need {size} bytes of values, the file holds "
            f"{len(body) if len(body) <= size else 'more'}"
        )
    return np.frombuffer(body, dtype=dtype).reshape(dims).copy()  # writable, as torch.from_numpy wants


def _read_at_most(f, n, chunk=1 << 24):
    """Up to n bytes of f, read chunk by chunk: memory grows with what the file holds, not with n."""
    parts = []
    while n > 0 and (part := f.read(min(n, chunk))):
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _find(root, stem, what):
    """root/stem (or the '.idx' spelling some mirrors use), raw or .gz, also under torchvision's MNIST/raw."""
    names = [stem, stem.replace("-idx", ".idx")]
    for folder in (root, root / "raw", root / "MNIST" / "raw"):
        for name in names:
            for suffix in ("", ".gz"):
                if (folder / (name + suffix)).is_file():
                    return folder / (name + suffix)
    raise UsageError(
        f"--data mnist:{root}: no {what} file {stem}[.gz] in that folder (download the four files "
        f"of MNIST or Fashion-MNIST and unpack nothing, or gunzip them: both work)"
    )


class MNISTDataset(_Uint8Images):
    """MNIST's (or Fashion-MNIST's) 60000 training images, 28x28 grayscale, 10 classes; never flipped."""

    native_channels, default_flip = 1, False

    def __init__(self, root, image_size=None, flip=None):
        images_path = _find(root, "train-images-idx3-ubyte", "image")
        labels_path = _find(root, "train-labels-idx1-ubyte", "label")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8 or images.shape[1] != images.shape[2]:
            raise UsageError(
                f"{images_path}: expected uint8 images (N, H, W) with H == W, got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise UsageError(f"{labels_path}: expected uint8 labels (N,), got {labels.dtype} {labels.shape}")
        if len(images) != len(labels):
            raise UsageError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
        if len(labels) and labels.max() > 9:
            raise UsageError(f"{labels_path}: labels must be 0-9, found {int(labels.max())}")
        super().__init__(images[:, None], labels, [str(c) for c in range(10)], "mnist", root, image_size, flip)


#################################################################################
#                                    CIFAR-10                                   #
#################################################################################


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _ArrayUnpickler(pickle.Unpickler):
    """Builds plain containers, numbers, strings and numpy arrays; refuses every other global."""

    def find_class(self, module, name):
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,  # the name in CIFAR-10's own files
            ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,  # numpy >= 2 writes this one
            ("numpy", "ndarray"): lambda: np.ndarray,
            ("numpy", "dtype"): lambda: np.dtype,
            ("_codecs", "encode"): lambda: __import__("codecs").encode,  # bytes written by Python 3
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refused to load the global {module}.{name}")
        return allowed[module, name]()


def load_pickle(path):
    """A CIFAR python batch as a dict with str keys, read with _ArrayUnpickler; errors name the file."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except Exception as e:  # a corrupt pickle fails anywhere in the unpickler, with any error type
        raise UsageError(
            f"{path}: not a CIFAR python batch, or a corrupt or unsafe one ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: expected a dict, the pickle holds a {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(path):
    """(images (N, 3, 32, 32) uint8, labels (N,)) of one data_batch_N file, checked."""
    batch = load_pickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UsageError(f"{path}: 'data' must be a uint8 array (N, 3072), got {got}")
    if not isinstance(labels, list) or not all(isinstance(v, int) and 0 <= v < 10 for v in labels):
        raise UsageError(f"{path}: 'labels' must be a list of ints in 0-9")
    if len(labels) != len(data):
        raise UsageError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)  # rows are R, G, B planes, row-major


class CIFAR10Dataset(_Uint8Images):
    """CIFAR-10's 50000 training images, 32x32 RGB, 10 named classes; horizontal flips by default."""

    native_channels, default_flip = 3, True

    def __init__(self, root, image_size=None, flip=None):
        if (root / "cifar-10-batches-py").is_dir():
            root = root / "cifar-10-batches-py"
        paths = [root / f"data_batch_{i}" for i in range(1, 6)]
        for p in paths + [root / "batches.meta"]:
            if not p.is_file():
                raise UsageError(
                    f"--data cifar10:{root}: {p.name} is missing (expected the python version's folder "
                    f"cifar-10-batches-py: data_batch_1 ... data_batch_5 and batches.meta)"
                )
        names = load_pickle(root / "batches.meta").get("label_names")
        if not isinstance(names, list) or len(names) != 10 or not all(isinstance(n, (bytes, str)) for n in names):
            raise UsageError(f"{root / 'batches.meta'}: 'label_names' must be a list of 10 names")
        images, labels = zip(*map(_cifar_batch, paths))
        classes = [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
        super().__init__(np.concatenate(images), np.concatenate(labels), classes, "cifar10", root, image_size, flip)


DATASETS = {"mnist": MNISTDataset, "cifar10": CIFAR10Dataset}
