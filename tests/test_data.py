"""Datasets and the resumable sharded sampler."""
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit._util import UsageError
from fastdit.data import DigitsDataset, ImageFolderDataset, ShardedBatches, build_dataset, center_crop_arr

from _train_helpers import one_thread  # noqa: F401 (an autouse fixture)


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
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UsageError, match="no images in class sub-folders"):
        ImageFolderDataset(tmp_path / "empty", 8)
    with pytest.raises(UsageError, match="not a folder"):
        ImageFolderDataset(folder / "cat" / "0.png", 8)
    with pytest.raises(UsageError, match="1 channel"):
        build_dataset(None, 8, channels=3)


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
