"""fastdit sample (PNG grid) and fastdit sample-ddp (ADM .npz) from a tiny checkpoint."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastdit
from fastdit import DiT, sample, train
from fastdit._util import UsageError
from fastdit.cli import main as cli

from _train_helpers import FAST, one_thread  # noqa: F401 (an autouse fixture)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return train.main(FAST + ["--steps", "1", "--out", str(tmp_path_factory.mktemp("run"))]).checkpoint


def test_sample_writes_a_grid_deterministically(ckpt, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    args = ["sample", "--ckpt", ckpt, "--steps", "3", "--classes", "1,7", "--per-class", "3", "--cfg-scale", "2"]
    assert cli(args + ["--out", str(a)]) == 0
    assert cli(args + ["--out", str(b)]) == 0
    img = Image.open(a)
    assert img.mode == "L" and img.size[0] > img.size[1] > 0  # 2 rows of 3 digits, enlarged
    cells = 3 * (8 + 2) * 8 + 2 * 8  # 3 digits a row, 8x8 with a 2-pixel pad, enlarged 8 times
    assert np.asarray(img)[:, : img.size[0] - cells].max() > 200  # the class labels, light, left of the rows
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(b)))  # same seed, same samples
    assert cli(args + ["--out", str(b), "--seed", "1", "--sampler", "ddim"]) == 0
    assert not np.array_equal(np.asarray(img), np.asarray(Image.open(b)))


def test_sample_ddp_writes_an_adm_npz(ckpt, tmp_path):
    out = tmp_path / "samples.npz"
    assert cli(["sample-ddp", "--ckpt", ckpt, "--num-samples", "5", "--per-proc-batch-size", "2", "--steps", "2",
                "--out", str(out)]) == 0
    arr = np.load(out)["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 8, 8, 1)  # 6 sampled (3 batches of 2), trimmed to 5
    assert not list(tmp_path.glob(".*"))  # the per-rank shards are cleaned up
    assert cli(["sample-ddp", "--ckpt", ckpt, "--num-samples", "2", "--per-proc-batch-size", "2", "--steps", "2",
                "--rgb", "--out", str(out)]) == 0
    rgb = np.load(out)["arr_0"]
    assert rgb.shape == (2, 8, 8, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])


def test_generate_follows_dit_sample_order(ckpt):
    """seed -> z -> [z, z] with the null class -> p_sample_loop(forward_with_cfg): DiT's sample.py, by hand."""
    model = sample.load_sampler_model(ckpt).model
    labels = [3, 5]
    torch.manual_seed(7)
    ours = sample.generate(model, labels, cfg_scale=1.5, cfg_channels="all", steps=4, use_cfg=True)
    torch.manual_seed(7)
    z = torch.randn(2, 1, 8, 8)
    diffusion = sample.sampling_diffusion("ddpm", 4)
    y = torch.tensor(labels + [10, 10])
    out = diffusion.p_sample_loop(model.forward_with_cfg, (4, 1, 8, 8), torch.cat([z, z]), clip_denoised=True,
                                  model_kwargs=dict(y=y, cfg_scale=1.5, cfg_channels="all"), device="cpu")
    assert torch.equal(ours, out[:2].clamp(-1, 1))


def test_official_checkpoint_needs_model_and_vae(tmp_path):
    path = tmp_path / "DiT-Tiny-64.pt"
    torch.save(DiT(input_size=8, in_channels=4, depth=1, hidden_size=32, num_heads=2, num_classes=10).state_dict(), path)
    with pytest.raises(UsageError, match="give --model and --image-size"):
        sample.load_sampler_model(str(path))
    with pytest.raises(UsageError, match="--vae"):
        sample.load_sampler_model(str(path), model="DiT-Tiny/2", image_size=64, num_classes=10)
    # depth-1 weights into the 6-block DiT-Tiny/2: the error says what does not fit
    with pytest.raises(UsageError, match="(?s)does not fit the model.*missing from the checkpoint: blocks.1"):
        sample.load_sampler_model(str(path), model="DiT-Tiny/2", image_size=64, num_classes=10, vae="x")


def test_load_model_builds_the_model_a_checkpoint_records(ckpt, tmp_path):
    run = Path(ckpt).parent.parent
    stored = torch.load(ckpt, weights_only=True)
    model = fastdit.load_model(run)  # a run folder: its latest checkpoint, EMA weights, eval mode
    assert not model.training and model.patch_size == 2 and model.in_channels == 1
    assert all(torch.equal(v, stored["ema"][k]) for k, v in model.state_dict().items())
    trained = fastdit.load_model(ckpt, weights="model")
    assert all(torch.equal(v, stored["model"][k]) for k, v in trained.state_dict().items())
    official = tmp_path / "official.pt"  # a bare state_dict records no config: name it
    torch.save(fastdit.DiT_models["DiT-Tiny/2"](input_size=4, num_classes=10).state_dict(), official)
    with pytest.raises(fastdit.CheckpointError, match="records no model config"):
        fastdit.load_model(official)
    assert fastdit.load_model(official, "DiT-Tiny/2", input_size=4, num_classes=10).x_embedder.img_size == (4, 4)
    with pytest.raises(fastdit.CheckpointError, match=r"x_embedder.proj.weight: checkpoint \(128, 4, 2, 2\), model "
                                                      r"\(128, 4, 4, 4\)"):
        fastdit.load_model(official, "DiT-Tiny/4", input_size=4, num_classes=10)


def test_sample_errors(ckpt, tmp_path, capsys):
    assert cli(["sample", "--ckpt", str(tmp_path / "nope.pt")]) == 2
    assert cli(["sample", "--ckpt", ckpt, "--classes", "3,42"]) == 2
    assert cli(["sample-ddp", "--ckpt", ckpt, "--out", str(tmp_path / "x.png")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastdit")]
    assert len(err) == 3 and "does not exist" in err[0] and "[0, 10)" in err[1] and ".npz" in err[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_cuda_graphs_on_cpu_is_a_clear_error(ckpt, capsys):
    assert cli(["sample", "--ckpt", ckpt, "--cuda-graphs", "--steps", "2"]) == 2
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err
