"""Synthetic MNIST (IDX files) and CIFAR-10 (python pickles) folders, laid out as the real downloads."""

import gzip
import pickle
import struct

import numpy as np

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def idx_bytes(array, type_code=0x08):
    return bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write(path, payload, gz=False):
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def write_mnist(folder, n=20):
    """n random 28x28 'digits' (labels cycling through 0-9): images raw, labels gzipped -> (images, labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    write(folder / "train-images-idx3-ubyte", idx_bytes(images))
    write(folder / "train-labels-idx1-ubyte.gz", idx_bytes(labels), gz=True)
    return images, labels


def cifar_batch(images, labels, py2_names=False):
    """A data_batch_N pickle as CIFAR-10's python version stores it (images (N, 3, 32, 32) uint8)."""
    raw = pickle.dumps(
        {
            "batch_label": "training batch",
            "labels": [int(v) for v in labels],
            "data": images.reshape(len(images), -1),
            "filenames": ["x.png"] * len(images),
        },
        protocol=2,
    )
    # the real files were written by Python 2 and numpy 1: their arrays name numpy.core.multiarray
    return raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray") if py2_names else raw


def write_cifar10(root):
    """cifar-10-batches-py at root: 5 batches of 4 random images (labels cycling through the classes)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8)
    labels = np.arange(20) % 10
    for b in range(5):
        sl = slice(4 * b, 4 * b + 4)
        write(root / f"data_batch_{b + 1}", cifar_batch(images[sl], labels[sl], py2_names=b % 2 == 0))
    meta = {b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_cases_per_batch": 4, b"num_vis": 3072}
    write(root / "batches.meta", pickle.dumps(meta, protocol=2))
    return images, labels
