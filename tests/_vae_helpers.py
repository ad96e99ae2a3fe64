"""A tiny diffusers AutoencoderKL with random weights (nothing downloaded), a small RGB image folder, and
`fastdit vae` stopped by a signal."""

import contextlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit import vae


def save_tiny_sd_vae(path, seed=0):
    """A 2-level AutoencoderKL (factor 2, 4 latent channels, SD's scaling factor 0.18215) -> save_pretrained(path)."""
    AutoencoderKL = pytest.importorskip(
        "diffusers.models", reason="diffusers is not installed (pip install -e '.[test]')"
    ).AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    )
    vae.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def sd_vae(tmp_path_factory):
    return save_tiny_sd_vae(tmp_path_factory.mktemp("sd-vae") / "vae")


@pytest.fixture(scope="session")
def rgb_folder(tmp_path_factory):
    """root/a (4 images), root/b (3 images, one non-square): 7 random RGB images around 20x24 pixels."""
    root = tmp_path_factory.mktemp("rgb") / "imgs"
    rng = np.random.default_rng(0)
    for cls, n in (("a", 4), ("b", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            shape = (20, 24, 3) if i else (18, 18, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


@contextlib.contextmanager
def vae_signalled(signum, step):
    """While the block runs, `fastdit vae` sends itself `signum` in the middle of its step `step` (1-based), as a
    user's Ctrl-C (SIGINT) or a cluster (SIGTERM, SIGUSR1) would."""
    real, calls = vae.SmallVAE.loss, []

    def loss(self, x, beta):
        calls.append(x)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return real(self, x, beta)

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(vae.SmallVAE, "loss", loss)
        yield
