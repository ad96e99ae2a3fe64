"""Datasets (every PIL mode, unreadable files, empty folders) and the resumable sharded sampler."""

import itertools

import numpy as np
import pytest
import torch
from _train_helpers import one_thread  # noqa: F401 (an autouse fixture)
from PIL import Image

from fastdit._util import UsageError
from fastdit.data import (
    DigitsDataset,
    ImageFolderDataset,
    ShardedBatches,
    UnreadableImage,
    build_dataset,
    center_crop_arr,
    read_image,
)


def test_digits_are_the_real_embedded_dataset():
    ds = DigitsDataset()
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.channels == 1 and ds.image_size == 8
    x, y = ds[(0, False)]
    assert x.shape == (1, 8, 8) and y == 0 and x.min() == -1 and x.max() <= 1
    assert sorted(torch.unique(ds.labels).tolist()) == list(range(10))
    assert not ds.flip  # mirrored digits are not digits
    big = DigitsDataset(16)
    assert big.images.shape == (1797, 1, 16, 16) and big.images.abs().max() <= 1
    assert torch.equal(ds[(5, True)][0], ds[(5, False)][0].flip(-1))


@pytest.fixture
def folder(tmp_path):
    """root/cat (3 images, one non-square and larger) and root/dog (2 grayscale images)."""
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for cls, n in (("cat", 3), ("dog", 2)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            shape = (40, 24, 3) if (cls, i) == ("cat", 0) else (16, 16, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_classes_crop_and_flip(folder):
    ds = ImageFolderDataset(folder, image_size=8)
    assert ds.classes == ["cat", "dog"] and len(ds) == 5 and ds.num_classes == 2 and ds.flip
    labels = [ds[(i, False)][1] for i in range(len(ds))]
    assert labels == [0, 0, 0, 1, 1]
    x, _ = ds[(0, False)]  # the 24x40 image: center-cropped to 8x8
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert torch.equal(ds[(0, True)][0], x.flip(-1))
    expected = center_crop_arr(Image.open(folder / "cat" / "0.png").convert("RGB"), 8)
    assert torch.equal(x, torch.from_numpy(expected.astype(np.float32)).div(127.5).sub(1).permute(2, 0, 1))
    gray = build_dataset(str(folder), 8, channels=1)
    assert gray[(3, False)][0].shape == (1, 8, 8)


def test_image_folder_errors(tmp_path, folder):
    with pytest.raises(UsageError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "empty" / "loose.png")  # an image, but no class folder
    with pytest.raises(UsageError, match="holds no class sub-folders"):
        ImageFolderDataset(tmp_path / "empty", 8)
    (folder / "emu").mkdir()
    (folder / "emu" / "readme.txt").write_text("no images here")
    with pytest.raises(UsageError, match=f"class folder '{folder / 'emu'}' holds no images"):
        ImageFolderDataset(folder, 8)
    with pytest.raises(UsageError, match="not a folder"):
        ImageFolderDataset(folder / "cat" / "0.png", 8)
    with pytest.raises(UsageError, match="1 channel"):
        build_dataset(None, 8, channels=3)


GRAY = np.arange(64, dtype=np.float64).reshape(8, 8) / 63  # a ramp 0..1 over the 8x8 image


def white_over(rgb, alpha):
    """What a viewer shows: rgb composited over white (uint8 arrays; alpha (H, W))."""
    a = alpha[..., None].astype(np.float64) / 255
    return np.rint(rgb * a + 255 * (1 - a))


# (mode, file suffix, the PIL image, the expected 8-bit RGB pixels)
RAMP16 = np.rint(GRAY * 65535)
RGB = np.random.default_rng(1).integers(0, 256, (8, 8, 3)).astype(np.uint8)
ALPHA = np.tile(np.array([0, 255, 128, 64, 255, 0, 200, 30], dtype=np.uint8), (8, 1))
MODES = [
    ("I;16", ".png", lambda: Image.fromarray(RAMP16.astype(np.uint16)), np.rint(RAMP16 / 257)),
    (
        "I;16B",
        ".tif",
        lambda: Image.fromarray(RAMP16.astype(np.uint16)).convert("I").convert("I;16B"),
        np.rint(RAMP16 / 257),
    ),
    ("I", ".tif", lambda: Image.fromarray(RAMP16.astype(np.int32)), np.rint(RAMP16 / 257)),
    ("F", ".tif", lambda: Image.fromarray(GRAY.astype(np.float32)), np.rint(GRAY * 255)),
    ("1", ".png", lambda: Image.fromarray(GRAY > 0.5), 255.0 * (GRAY > 0.5)),
    ("L", ".png", lambda: Image.fromarray(np.rint(GRAY * 255).astype(np.uint8)), np.rint(GRAY * 255)),
    (
        "LA",
        ".png",
        lambda: Image.fromarray(np.dstack([np.rint(GRAY * 255).astype(np.uint8), ALPHA]), "LA"),
        white_over(np.rint(GRAY * 255)[..., None], ALPHA)[..., 0],
    ),
    ("RGBA", ".png", lambda: Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA"), white_over(RGB, ALPHA)),
    ("P", ".png", lambda: Image.fromarray(RGB).quantize(256), None),  # checked against its own palette below
    ("P+transparency", ".png", lambda: _palette_with_transparency(), None),
    ("CMYK", ".tif", lambda: Image.fromarray(RGB).convert("CMYK"), RGB),
]


def _palette_with_transparency():
    img = Image.fromarray(RGB).quantize(256)
    img.info["transparency"] = int(np.asarray(img)[0, 0])  # one palette entry is transparent
    return img


@pytest.mark.parametrize("mode, suffix, make, expected", MODES, ids=[m[0] for m in MODES])
def test_every_pil_mode_reads_as_a_viewer_shows_it(tmp_path, mode, suffix, make, expected):
    img = make()
    path = tmp_path / f"img{suffix}"
    img.save(path, **({"transparency": img.info["transparency"]} if "transparency" in img.info else {}))
    assert Image.open(path).mode == mode.split("+")[0]  # the file really is of that mode
    if mode.startswith("P"):
        with Image.open(path) as reopened:
            index = np.asarray(reopened)
            rgb = np.asarray(reopened.convert("RGB"), dtype=np.float64)
            key = reopened.info.get("transparency")
        expected = np.where((index == key)[..., None], 255.0, rgb) if key is not None else rgb
    expected = np.asarray(expected, dtype=np.float64)
    rgb = (read_image(path, 8, 3).permute(1, 2, 0).double() + 1) * 127.5  # (8, 8, 3) in 0..255
    want = expected if expected.ndim == 3 else np.repeat(expected[..., None], 3, -1)
    assert np.abs(rgb.numpy() - want).max() <= 1.0 + 1e-9, (
        f"{mode}: worst pixel off by {np.abs(rgb.numpy() - want).max()}"
    )
    gray = (read_image(path, 8, 1)[0].double() + 1) * 127.5
    assert gray.shape == (8, 8) and (gray.max() - gray.min()) > 50  # not a flat (all-white) image


def test_unreadable_images_are_skipped_with_a_warning_naming_each(tmp_path, folder, capfd):
    good = (folder / "cat" / "1.png").read_bytes()
    (folder / "cat" / "1b_truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "dog" / "0a_junk.jpg").write_bytes(b"\x00not an image")
    ds = ImageFolderDataset(folder, image_size=8)
    assert len(ds) == 7
    bad = [i for i, (f, _) in enumerate(ds.files) if "truncated" in f or "junk" in f]
    with pytest.raises(UnreadableImage, match="1b_truncated.png"):
        ds.load(bad[0])
    # Training: the next readable image stands in; nothing stops.
    x, label = ds[(bad[1], False)]
    assert torch.equal(x, ds.load(bad[1] + 1)[0]) and label == 1
    assert "0a_junk.jpg" in capfd.readouterr().err
    kept = ds.readable()
    assert [i for i, _, _ in kept] == [i for i in range(7) if i not in bad]
    err = capfd.readouterr().err
    assert "1b_truncated.png" in err and "0a_junk.jpg" in err and "(2 so far)" in err
    assert ds.all_images().shape == (5, 3, 8, 8)


def take(batches, n):
    return list(itertools.islice(iter(batches), n))


def test_sharded_batches_partition_resume_and_world_size_independence():
    n, g = 50, 12  # 4 global batches per epoch, 2 items dropped
    one = take(ShardedBatches(n, g, 0, 1, seed=3, flip=True), 8)
    ranks = [take(ShardedBatches(n, g, r, 3, seed=3, flip=True), 8) for r in range(3)]
    for b in range(8):  # 3 ranks together see exactly the 1-rank global batch, each a distinct slice
        assert sum((ranks[r][b] for r in range(3)), []) == one[b]
    epoch0 = [i for batch in one[:4] for i, _ in batch]
    assert len(set(epoch0)) == 48  # no repeats within an epoch
    assert one[:4] != one[4:]  # a new order each epoch
    assert any(f for batch in one for _, f in batch) and not all(f for batch in one for _, f in batch)
    # Starting at a position continues exactly where an uninterrupted sampler would be.
    sampler = ShardedBatches(n, g, 0, 1, seed=3, flip=True)
    assert sampler.advance((0, 0), 5) == (1, 1) and sampler.advance((1, 3)) == (2, 0)
    assert take(ShardedBatches(n, g, 0, 1, seed=3, flip=True, epoch=1, batch=1), 3) == one[5:8]
    assert all(not f for batch in take(ShardedBatches(n, g, 0, 1, 3, flip=False), 4) for _, f in batch)
    with pytest.raises(UsageError, match="fewer than --global-batch-size"):
        ShardedBatches(5, 8, 0, 1, 0, False)
