"""The small VAE, VAE names and their errors, latents of the digits, and latent-space training + sampling."""

import argparse
import importlib.util
import os
import signal
from pathlib import Path

import pytest
import torch
from _train_helpers import one_thread, stop_signals_guarded  # noqa: F401 (an autouse fixture)
from _vae_helpers import vae_signalled
from PIL import Image

from fastdit import _util, data, latents, train, vae
from fastdit._util import UsageError
from fastdit.cli import main as cli


def vae_args(tmp_path, **kw):
    p = argparse.ArgumentParser()
    vae.add_arguments(p)
    args = p.parse_args(
        [
            "--out",
            str(tmp_path / "vae"),
            "--steps",
            "40",
            "--batch-size",
            "32",
            "--base-channels",
            "16",
            "--log-every",
            "1000",
        ]
    )
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


TINY_VAE = ["vae", "--steps", "6", "--batch-size", "8", "--base-channels", "8", "--log-every", "1000"]


@pytest.fixture(scope="module")
def whole_vae(tmp_path_factory):
    """vae.pt of an uninterrupted 6-step run: what an interrupted and continued one must end with."""
    out = tmp_path_factory.mktemp("whole") / "vae"
    assert cli(TINY_VAE + ["--out", str(out)]) == 0
    return torch.load(out / "vae.pt", weights_only=True)


def assert_finished_as(out, whole):
    """`out` holds what the uninterrupted run wrote, the same to the bit, and no state left to continue."""
    assert sorted(os.listdir(out)) == ["reconstructions.png", "vae.pt"]
    done = torch.load(out / "vae.pt", weights_only=True)
    assert (done["scale_factor"], done["final_loss"], done["steps"]) == (
        whole["scale_factor"],
        whole["final_loss"],
        whole["steps"],
    )
    assert done["vae"].keys() == whole["vae"].keys()
    assert all(torch.equal(done["vae"][k], whole["vae"][k]) for k in whole["vae"])


def state_step(out):
    return len(torch.load(out / vae.STATE_FILE, weights_only=True)["losses"])


def test_vae_stopped_by_sigterm_keeps_its_state_refuses_other_settings_and_goes_on(whole_vae, tmp_path, capsys):
    """SIGTERM in step 3 of 4: the step ends, its state is written, one line says how to go on, exit code 143.
    The state is no VAE; other settings (or fewer --steps) are refused; --steps 6 then ends as the whole run."""
    out = tmp_path / "vae"
    with stop_signals_guarded(), vae_signalled(signal.SIGTERM, 3):
        assert cli(TINY_VAE + ["--steps", "4", "--out", str(out)]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fastdit vae: stopped by SIGTERM: after step 3 of 4, kept in {out / vae.STATE_FILE}: the same command "
        f"with --out {out} goes on from there"
    )
    assert os.listdir(out) == [vae.STATE_FILE] and state_step(out) == 3
    with pytest.raises(UsageError, match="is the state of an interrupted `fastdit vae` run, not a VAE"):
        vae.load_vae(out / vae.STATE_FILE)
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (8, 8)).save(images / "a" / f"{i}.png")
    for given, said in [
        (
            ["--data", str(images)],
            f"--data {images} (2 images) differs from the interrupted run's digits (1797 images)",
        ),
        (["--lr", "0.01"], "--lr 0.01 differs from the interrupted run's 0.002"),
        (["--image-size", "8"], "--image-size 8 differs from the interrupted run's 16"),
        (["--steps", "2"], "--steps 2: the interrupted run in {out} is at step 3 already; give --steps 3 or more"),
    ]:
        assert cli(TINY_VAE + ["--out", str(out), *given]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"fastdit vae: error: {said.format(out=out)}")
    assert cli(TINY_VAE + ["--out", str(out)]) == 0  # --steps 4 -> 6: the run goes on
    assert f"continuing the run in {out} from step 3" in capsys.readouterr().out
    assert_finished_as(out, whole_vae)
    assert cli(TINY_VAE + ["--out", str(out)]) == 2  # a finished VAE stays as it is
    assert f"--out {out} holds another VAE" in capsys.readouterr().err


def test_vae_ctrl_c_ends_the_step_in_flight_and_names_the_default_folder(whole_vae, tmp_path, monkeypatch, capsys):
    """Ctrl-C in step 2 (--out not given: a folder named after the time) ends that step and writes its state;
    the line names the real folder, and the same command with that --out ends as the whole run."""
    monkeypatch.chdir(tmp_path)
    handler = signal.getsignal(signal.SIGINT)
    with vae_signalled(signal.SIGINT, 2):
        assert cli(TINY_VAE) == 130
    assert signal.getsignal(signal.SIGINT) is handler  # put back
    (out,) = (tmp_path / "runs").iterdir()
    out = out.relative_to(tmp_path)
    said = capsys.readouterr()
    assert said.out.startswith(f"fastdit vae: into {out} (if interrupted, the same command with --out {out} continues")
    assert said.err.strip().splitlines()[-1] == (
        f"fastdit vae: interrupted: after step 2 of 6, kept in {out / vae.STATE_FILE}: the same command with "
        f"--out {out} goes on from there"
    )
    assert state_step(out) == 2
    assert cli(TINY_VAE + ["--out", str(out)]) == 0
    assert_finished_as(out, whole_vae)


def test_vae_crash_while_saving_its_state_keeps_the_last_good_one(whole_vae, tmp_path, monkeypatch, capsys):
    """--ckpt-every 2: a crash in the middle of writing step 4's state leaves step 2's (atomic_save), from which
    the same command ends as the whole run."""
    out, save, saves = tmp_path / "vae", torch.save, []

    def fails_second(obj, f):
        saves.append(obj)
        if len(saves) == 2:
            f.write(b"\x80\x02half a pickle")
            raise OSError("disk full")
        return save(obj, f)

    monkeypatch.setattr(_util.torch, "save", fails_second)
    assert cli(TINY_VAE + ["--ckpt-every", "2", "--out", str(out)]) == 2
    monkeypatch.undo()
    assert capsys.readouterr().err.strip().splitlines()[-1] == "fastdit vae: error: disk full"
    assert os.listdir(out) == [vae.STATE_FILE] and state_step(out) == 2  # no temporary, no lock file left
    assert cli(TINY_VAE + ["--ckpt-every", "2", "--out", str(out)]) == 0
    assert_finished_as(out, whole_vae)


def offline_hub(monkeypatch, cache):
    """The Hugging Face hub as on a machine without internet, with `cache` as its local cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


def test_vae_path_errors(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="'/no/such/vae.pt' does not exist"):
        vae.load_vae("/no/such/vae.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UsageError, match="not a PyTorch checkpoint"):
        vae.load_vae(tmp_path / "junk.pt")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(UsageError, match="not a fastdit VAE"):
        vae.load_vae(tmp_path / "other.pt")
    moved = dict(name=str(tmp_path / "moved" / "vae.pt"), fingerprint="0", scale_factor=1.0)  # as recorded
    with pytest.raises(UsageError, match=r"the VAE recorded with these latents .*/moved/vae.pt, is not there any more"):
        vae.load_vae_record(moved)  # sample or train --latents, not given --vae: the error is not about --vae
    if importlib.util.find_spec("diffusers") is not None:
        offline_hub(monkeypatch, tmp_path / "empty-cache")
        with pytest.raises(
            UsageError, match="--vae stabilityai/sd-vae-ft-ema: cannot get it from the Hugging Face hub"
        ):
            vae.load_vae("ema")  # DiT's shorthand, neither online nor cached here


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is not None, reason="diffusers is installed")
def test_diffusers_vae_without_diffusers_is_a_clear_error(tmp_path):
    (tmp_path / "sd-vae").mkdir()
    (tmp_path / "sd-vae" / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="diffusers is not installed"):
        vae.load_vae(tmp_path / "sd-vae")


def test_latents_round_trip_train_and_sample(tmp_path, trained_vae):
    """fastdit latents of the digits (with mirrored copies) -> LatentsDataset -> train --latents -> sample decodes."""
    out = tmp_path / "latents"
    assert (
        cli(["latents", "--vae", trained_vae["path"], "--flips", "both", "--chunk-size", "1000", "--out", str(out)])
        == 0
    )
    ds = latents.LatentsDataset(out)
    meta = ds.meta
    assert meta["flips"] and meta["latent"] == "mean" and meta["image_size"] == 16 and meta["count"] == 1797
    assert meta["vae"]["kind"] == "small" and meta["vae"]["name"] == str(Path(trained_vae["path"]).resolve())
    assert meta["scale_factor"] == pytest.approx(trained_vae["scale_factor"]) and meta["data"]["kind"] == "digits"
    assert [c["count"] for c in meta["chunks"]] == [1000, 797] and meta["classes"] == [str(d) for d in range(10)]
    assert len(ds) == 1797 and ds.flip and ds.image_size == 4 and ds.channels == 4
    codec = vae.load_vae(trained_vae["path"])
    x = data.DigitsDataset(16).images[[2, 1500]]
    z = codec.encode(x, sample=False)
    assert torch.allclose(torch.stack([ds[(2, False)][0], ds[(1500, False)][0]]), z, atol=1e-6)
    assert torch.allclose(ds[(1500, True)][0], codec.encode(x[1:].flip(-1), sample=False)[0], atol=1e-6)
    assert ds[(1500, False)][1] == int(data.DigitsDataset(16).labels[1500])

    run = train.main(
        [
            "--latents",
            str(out),
            "--model",
            "DiT-Tiny/1",
            "--steps",
            "2",
            "--global-batch-size",
            "8",
            "--sample-steps",
            "2",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    stored = torch.load(run.checkpoint, weights_only=True)
    assert stored["vae"] == meta["vae"] and stored["model_config"]["in_channels"] == 4
    png = tmp_path / "s.png"
    assert (
        cli(
            [
                "sample",
                "--ckpt",
                run.checkpoint,
                "--steps",
                "2",
                "--per-class",
                "1",
                "--classes",
                "3,4",
                "--out",
                str(png),
            ]
        )
        == 0
    )
    from PIL import Image

    assert Image.open(png).size[0] >= 2 * 16  # decoded 16x16 images, not 4x4 latents


def test_image_folder_training_pixel_and_latent_space(tmp_path, trained_vae, capfd):
    """--data FOLDER trains in pixel space (RGB, random flips); with --vae it encodes each batch on the fly.
    An unreadable image in the folder does not stop either run."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / cls / f"{i}.png"
            )
    (tmp_path / "imgs" / "b" / "9.png").write_bytes(b"broken")  # skipped, with a warning: the run goes on
    common = [
        "--data",
        str(tmp_path / "imgs"),
        "--model",
        "DiT-Tiny/2",
        "--global-batch-size",
        "9",
        "--steps",
        "2",
        "--sample-steps",
        "2",
    ]  # every step reads every image
    pixel = train.main(common + ["--image-size", "8", "--num-workers", "1", "--out", str(tmp_path / "pixel")])
    assert f"skipped an unreadable image (1 so far): {tmp_path / 'imgs' / 'b' / '9.png'}" in capfd.readouterr().err
    stored = torch.load(pixel.checkpoint, weights_only=True)
    assert stored["model_config"]["in_channels"] == 3 and stored["args"]["lr"] == 1e-3  # the small-data defaults
    assert stored["data"]["classes"] == ["a", "b"] and stored["vae"] is None
    latent = train.main(common + ["--image-size", "16", "--vae", trained_vae["path"], "--out", str(tmp_path / "lat")])
    stored = torch.load(latent.checkpoint, weights_only=True)
    assert stored["model_config"]["in_channels"] == 4 and stored["model_config"]["input_size"] == [4, 4]
    assert stored["vae"]["kind"] == "small" and all(v is not None for v in latent.losses)
