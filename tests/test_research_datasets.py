"""MNIST (IDX files) and CIFAR-10 (python pickles) from synthetic files written here: reading, the checks
on malformed and unsafe files, and the CLI recipes (MNIST in pixel space; CIFAR-10 through the small VAE)."""

import gzip
import os
import pickle

import numpy as np
import pytest
import torch
from _dataset_files import CIFAR_NAMES, cifar_batch, idx_bytes, write, write_cifar10, write_mnist
from _train_helpers import FAST, one_thread, sample_one_per_class  # noqa: F401 (an autouse fixture)

from fastdit import data
from fastdit._util import UsageError
from fastdit.cli import main as cli
from fastdit.latents import LatentsDataset


@pytest.fixture
def mnist(tmp_path):
    """A folder with 20 random 28x28 'digits' (every class twice): images raw, labels gzipped."""
    images, labels = write_mnist(tmp_path)
    return tmp_path, images, labels


def test_mnist_reads_raw_and_gzipped_idx(mnist):
    root, images, labels = mnist
    ds = data.build_dataset(f"mnist:{root}", None)
    assert (ds.channels, ds.image_size, ds.num_classes, len(ds), ds.flip) == (1, 28, 10, 20, False)
    x, y = ds[(3, False)]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == labels[3]
    assert torch.equal(x.add(1).mul(127.5).round().to(torch.uint8)[0], torch.from_numpy(images[3]))
    assert torch.equal(ds[(3, True)][0], x.flip(-1))  # flips only when asked (--flip)
    assert ds.describe()["kind"] == "mnist" and ds.all_images().shape == (20, 1, 28, 28)
    assert data.build_dataset(f"mnist:{root}", 32).all_images().shape == (20, 1, 32, 32)


def _corrupt(root, images, labels, case):
    img, lab = root / "train-images-idx3-ubyte", root / "train-labels-idx1-ubyte.gz"
    if case == "magic":
        write(img, b"\x08\x03\0\0" + idx_bytes(images)[4:])
        return img, "not an IDX file (magic number 08030000"
    if case == "truncated":
        write(img, idx_bytes(images)[:-5])
        return img, "truncated: dimensions (20, 28, 28) need 15680 bytes of values, the file holds 15675"
    if case == "huge":  # a header announcing 2**64 bytes: refused without allocating them, nor overflowing
        write(img, b"\0\0\x08\x03" + (2**32 - 1).to_bytes(4, "big") * 2 + (4).to_bytes(4, "big") + images.tobytes())
        return img, f"truncated: dimensions (4294967295, 4294967295, 4) need {4 * (2**32 - 1) ** 2} bytes"
    if case == "trailing":
        write(img, idx_bytes(images) + b"\0")
        return img, "longer than its header says"
    if case == "header":
        write(img, b"\0\0\x08\x03\0\0\0\x14")
        return img, "truncated IDX header (3 dimensions announced)"
    if case == "count":
        write(lab, idx_bytes(labels[:19]), gz=True)
        return lab, "holds 20 images but"
    if case == "dims":
        write(img, idx_bytes(images.reshape(20, 784)))
        return img, "expected uint8 images (N, H, W) with H == W, got uint8 (20, 784)"
    if case == "label_range":
        write(lab, idx_bytes(labels + 1), gz=True)
        return lab, "labels must be 0-9, found 10"
    if case == "gzip":
        write(lab, gzip.compress(idx_bytes(labels))[:-8])
        return lab, "cannot be read (EOFError"
    os.remove(lab)
    return "train-labels-idx1-ubyte", "no label file train-labels-idx1-ubyte[.gz]"


@pytest.mark.parametrize(
    "case", ["magic", "truncated", "huge", "trailing", "header", "count", "dims", "label_range", "gzip", "missing"]
)
def test_malformed_idx_files_are_named(mnist, case):
    root, images, labels = mnist
    culprit, message = _corrupt(root, images, labels, case)
    with pytest.raises(UsageError) as e:
        data.build_dataset(f"mnist:{root}", None)
    assert message in str(e.value) and str(culprit) in str(e.value)


@pytest.fixture
def cifar(tmp_path):
    """cifar-10-batches-py with 5 batches of 4 random images (labels cycling through the classes)."""
    images, labels = write_cifar10(tmp_path / "cifar-10-batches-py")
    return tmp_path, images, labels


def test_cifar10_reads_the_python_batches(cifar):
    parent, images, labels = cifar
    ds = data.build_dataset(f"cifar10:{parent}", None)  # the parent of cifar-10-batches-py works too
    assert (ds.channels, ds.image_size, ds.num_classes, len(ds), ds.flip) == (3, 32, 10, 20, True)
    assert ds.classes == CIFAR_NAMES and ds.describe()["classes"] == CIFAR_NAMES
    x, y = ds[(13, False)]
    assert torch.equal(x.add(1).mul(127.5).round().to(torch.uint8), torch.from_numpy(images[13])) and y == labels[13]
    with pytest.raises(UsageError, match="cifar10 images have 3 channel"):
        data.build_dataset(f"cifar10:{parent}", None, channels=1)


class _Exploit:
    def __reduce__(self):
        return os.system, ("touch pwned",)


@pytest.mark.parametrize("case", ["exploit", "not_a_pickle", "truncated", "bad_data", "bad_labels", "count", "meta"])
def test_cifar10_refuses_unsafe_and_malformed_pickles(cifar, case, monkeypatch, tmp_path):
    parent, images, labels = cifar
    root = parent / "cifar-10-batches-py"
    culprit = root / "data_batch_2"
    monkeypatch.chdir(tmp_path)
    if case == "exploit":
        write(culprit, pickle.dumps({"data": _Exploit()}, protocol=2))
        message = "refused to load the global"
    elif case == "not_a_pickle":
        write(culprit, b"\x89PNG not a pickle")
        message = "not a CIFAR python batch"
    elif case == "truncated":
        write(culprit, cifar_batch(images[:4], labels[:4])[:-20])
        message = "not a CIFAR python batch, or a corrupt or unsafe one"
    elif case == "count":
        write(culprit, cifar_batch(images[:4], labels[:3]))
        message = "4 images but 3 labels"
    elif case == "bad_data":
        write(culprit, cifar_batch(images[:4].astype(np.float32).astype(np.uint8)[:, :2], labels[:4]))
        message = "'data' must be a uint8 array (N, 3072), got uint8 (4, 2048)"
    elif case == "bad_labels":
        write(culprit, cifar_batch(images[:4], [0, 1, 2, 10]))
        message = "'labels' must be a list of ints in 0-9"
    else:
        culprit = root / "batches.meta"
        write(culprit, pickle.dumps({"label_names": CIFAR_NAMES[:9]}))
        message = "'label_names' must be a list of 10 names"
    with pytest.raises(UsageError) as e:
        data.build_dataset(f"cifar10:{root}", None)
    assert message in str(e.value) and str(culprit) in str(e.value)
    assert not (tmp_path / "pwned").exists()


def test_named_data_errors(tmp_path, capsys):
    assert cli(["train", "--data", "mnist:"]) == 2
    assert "give the folder after the colon" in capsys.readouterr().err
    assert cli(["train", "--data", f"cifar10:{tmp_path}"]) == 2
    assert "data_batch_1 is missing" in capsys.readouterr().err


def test_mnist_train_and_sample_cli(mnist, tmp_path):
    """--data mnist:DIR trains DiT-Tiny/4 on 28x28 pixels (49 tokens) and samples a row per digit."""
    root, _, _ = mnist
    out = tmp_path / "run"
    assert cli(["train", "--data", f"mnist:{root}", "--steps", "2", *FAST, "--out", str(out)]) == 0
    ck = torch.load(out / "checkpoints" / "0000002.pt", weights_only=True)
    assert ck["args"]["model"] == "DiT-Tiny/4" and ck["model_config"]["input_size"] == [28, 28]
    assert ck["data"]["kind"] == "mnist" and (out / "samples.png").is_file()
    from PIL import Image

    assert Image.open(out / "samples.png").height == (10 * (28 + 2) + 2) * 3  # 10 rows of digits, 2-pixel gaps, x3
    assert sample_one_per_class(out / "checkpoints" / "0000002.pt", tmp_path / "s.png") == 0


def test_cifar10_small_vae_latent_recipe(cifar, tmp_path):
    """The README's CIFAR-10 recipe: small VAE to (4, 8, 8) latents, encode, train a DiT on them, sample."""
    parent, _, _ = cifar
    src = f"cifar10:{parent}"
    assert (
        cli(
            [
                "vae",
                "--data",
                src,
                "--image-size",
                "32",
                "--steps",
                "2",
                "--batch-size",
                "8",
                "--base-channels",
                "8",
                "--out",
                str(tmp_path / "vae"),
            ]
        )
        == 0
    )
    lat = tmp_path / "latents"
    assert cli(["latents", "--vae", str(tmp_path / "vae" / "vae.pt"), "--data", src, "--out", str(lat)]) == 0
    stored = LatentsDataset(lat)
    assert len(stored) == 20 and stored[(3, True)][0].shape == (4, 8, 8) and stored.flip  # CIFAR-10 is flipped
    assert stored.meta["data"]["kind"] == "cifar10" and stored.classes == CIFAR_NAMES
    out = tmp_path / "run"
    assert cli(["train", "--latents", str(lat), "--model", "DiT-Tiny/2", "--steps", "2", *FAST, "--out", str(out)]) == 0
    assert sample_one_per_class(out / "checkpoints" / "0000002.pt", tmp_path / "s.png") == 0
    assert (tmp_path / "s.png").is_file()
