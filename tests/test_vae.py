"""The small VAE, the diffusers wrapper's error paths, latents files, and latent-space training + sampling."""
import argparse
import importlib.util

import pytest
import torch

from fastdit import data, train, vae
from fastdit._util import UsageError
from fastdit.cli import main as cli

from _train_helpers import one_thread  # noqa: F401 (an autouse fixture)


def vae_args(tmp_path, **kw):
    p = argparse.ArgumentParser()
    vae.add_arguments(p)
    args = p.parse_args(["--out", str(tmp_path / "vae"), "--steps", "40", "--batch-size", "32", "--base-channels", "16",
                         "--log-every", "1000"])
    return argparse.Namespace(**{**vars(args), **kw})


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    return vae.train_vae(vae_args(tmp_path_factory.mktemp("vae")))


def test_small_vae_trains_and_its_loss_falls(trained_vae):
    losses = trained_vae["losses"]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    codec = vae.load_vae(trained_vae["path"])
    assert codec.kind == "small" and codec.factor == 4 and codec.latent_channels == 4 and codec.image_channels == 1
    assert codec.scale_factor == pytest.approx(trained_vae["scale_factor"]) and codec.scale_factor > 0
    x = data.DigitsDataset(16).images[:8]
    z = codec.encode(x, sample=False)
    assert z.shape == (8, 4, 4, 4)
    assert torch.equal(codec.encode(x, sample=False), z)  # the mean is deterministic
    assert not torch.equal(codec.encode(x, sample=True), z)
    recon = codec.decode(z)
    assert recon.shape == x.shape and recon.abs().max() <= 1


def test_small_vae_loss_parts():
    torch.manual_seed(0)
    model = vae.SmallVAE(1, 2, 8, 1)
    parts = model.loss(torch.rand(4, 1, 8, 8) * 2 - 1, beta=0.5)
    assert torch.allclose(parts["loss"], parts["mse"] + 0.5 * parts["kl"]) and parts["kl"] >= 0


def test_vae_path_errors(tmp_path):
    with pytest.raises(UsageError, match="never downloads"):
        vae.load_vae("stabilityai/sd-vae-ft-ema")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UsageError, match="not a PyTorch checkpoint"):
        vae.load_vae(tmp_path / "junk.pt")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(UsageError, match="not a fastdit VAE"):
        vae.load_vae(tmp_path / "other.pt")


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is not None, reason="diffusers is installed")
def test_diffusers_vae_without_diffusers_is_a_clear_error(tmp_path):
    (tmp_path / "sd-vae").mkdir()
    (tmp_path / "sd-vae" / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="diffusers is not installed"):
        vae.load_vae(tmp_path / "sd-vae")


def test_latents_round_trip_train_and_sample(tmp_path, trained_vae):
    """fastdit latents (with mirrored copies) -> LatentsDataset -> fastdit train --latents -> fastdit sample decodes."""
    out = tmp_path / "latents.pt"
    assert cli(["latents", "--vae", trained_vae["path"], "--flips", "both", "--out", str(out)]) == 0
    ds = data.LatentsDataset(out)
    meta = ds.meta
    assert meta["flip_policy"] == "both" and meta["latent"] == "mean" and meta["image_size"] == 16
    assert meta["vae"]["kind"] == "small" and meta["vae"]["path"] == trained_vae["path"]
    assert meta["scale_factor"] == pytest.approx(trained_vae["scale_factor"]) and meta["data"]["kind"] == "digits"
    assert len(ds) == 1797 and ds.flip and ds.images.shape == (1797, 4, 4, 4)
    codec = vae.load_vae(trained_vae["path"])
    x = data.DigitsDataset(16).images[:3]
    assert torch.allclose(ds.images[:3], codec.encode(x, sample=False), atol=1e-6)
    assert torch.allclose(ds[(2, True)][0], codec.encode(x[2:3].flip(-1), sample=False)[0], atol=1e-6)

    run = train.main(["--latents", str(out), "--model", "DiT-Tiny/1", "--steps", "2", "--global-batch-size", "8",
                      "--sample-steps", "2", "--out", str(tmp_path / "run")])
    stored = torch.load(run.checkpoint, weights_only=True)
    assert stored["vae"]["path"] == trained_vae["path"] and stored["model_config"]["in_channels"] == 4
    png = tmp_path / "s.png"
    assert cli(["sample", "--ckpt", run.checkpoint, "--steps", "2", "--per-class", "1", "--classes", "3,4",
                "--out", str(png)]) == 0
    from PIL import Image

    assert Image.open(png).size[0] >= 2 * 16  # decoded 16x16 images, not 4x4 latents


def test_image_folder_training_pixel_and_latent_space(tmp_path, trained_vae):
    """--data FOLDER trains in pixel space (RGB, random flips); with --vae it encodes each batch on the fly."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    common = ["--data", str(tmp_path / "imgs"), "--model", "DiT-Tiny/2", "--global-batch-size", "4", "--steps", "2",
              "--sample-steps", "2"]
    pixel = train.main(common + ["--image-size", "8", "--num-workers", "1", "--out", str(tmp_path / "pixel")])
    stored = torch.load(pixel.checkpoint, weights_only=True)
    assert stored["model_config"]["in_channels"] == 3 and stored["args"]["lr"] == 1e-4  # DiT's defaults for data
    assert stored["data"]["classes"] == ["a", "b"] and stored["vae"] is None
    latent = train.main(common + ["--image-size", "16", "--vae", trained_vae["path"], "--out", str(tmp_path / "lat")])
    stored = torch.load(latent.checkpoint, weights_only=True)
    assert stored["model_config"]["in_channels"] == 4 and stored["model_config"]["input_size"] == [4, 4]
    assert stored["vae"]["kind"] == "small" and all(v is not None for v in latent.losses)
