"""Unconditional DiTs (num_classes=0): no label embedding, no CFG; training and sampling without labels."""

import numpy as np
import pytest
import torch
from _train_helpers import FAST, one_thread  # noqa: F401 (an autouse fixture)

from fastdit.cli import main as cli
from fastdit.models import DiT

SMALL = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=2, num_heads=4)


def randomised(model):
    """Every parameter drawn at random (adaLN-Zero's zeros would hide the conditioning)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def test_unconditional_model_is_the_conditional_one_without_its_label_embedding():
    uncond = randomised(DiT(**SMALL, num_classes=0)).eval()
    assert uncond.y_embedder is None and not any(k.startswith("y_embedder") for k in uncond.state_dict())
    cond = DiT(**SMALL, num_classes=5).eval()
    cond.load_state_dict(uncond.state_dict(), strict=False)  # everything but the label table
    torch.nn.init.zeros_(cond.y_embedder.embedding_table.weight)  # c = t_emb + 0
    x, t = torch.randn(3, 3, 8, 8), torch.randint(0, 1000, (3,))
    out = uncond(x, t)
    torch.testing.assert_close(out, cond(x, t, torch.tensor([0, 4, 5])), rtol=0, atol=0)
    assert out.shape == (3, 6, 8, 8) and out.abs().sum() > 0
    with pytest.raises(ValueError, match="y must be None for an unconditional model"):
        uncond(x, t, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="y \\(N,\\) class labels are required: the model has 5 classes"):
        cond(x, t)
    with pytest.raises(ValueError, match="classifier-free guidance needs a class-conditional model"):
        uncond.forward_with_cfg(x, t, None, 4.0)


def test_train_and_sample_without_labels(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli(["train", "--num-classes", "0", "--steps", "2", *FAST, "--out", str(out)]) == 0
    assert "unconditional" in capsys.readouterr().out
    ckpt = out / "checkpoints" / "0000002.pt"
    raw = torch.load(ckpt, weights_only=True)
    assert raw["model_config"]["num_classes"] == 0 and not any(k.startswith("y_embedder") for k in raw["ema"])
    assert (
        cli(["sample", "--ckpt", str(ckpt), "--steps", "2", "--per-class", "2", "--out", str(tmp_path / "s.png")]) == 0
    )
    assert "sampled 20 images" in capsys.readouterr().out  # 10 rows of 2
    monkeypatch.chdir(tmp_path)
    assert cli(["sample", "--ckpt", str(ckpt), "--steps", "2", "--per-class", "1"]) == 0  # default name: unguided
    assert capsys.readouterr().out.rstrip().endswith("-ddpm2-cfg1-seed0.png")
    npz = tmp_path / "s.npz"
    assert cli(["sample-ddp", "--ckpt", str(ckpt), "--steps", "2", "--num-samples", "3", "--out", str(npz)]) == 0
    assert np.load(npz)["arr_0"].shape == (3, 8, 8, 1)
    for argv, message in (
        (["sample", "--classes", "1"], "--classes: the model is unconditional"),
        (["sample", "--cfg-scale", "4"], "--cfg-scale 4.0: the model is unconditional"),
        (["sample", "--per-class", "100000000000"], "--per-class 100000000000: at most 818 for 8x8 images: a grid"),
    ):
        assert cli([*argv, "--ckpt", str(ckpt), "--out", str(tmp_path / "x.png")]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--num-classes", "0", "--cfg-scale", "2"], "--cfg-scale 2.0: an unconditional model (--num-classes 0) has no"),
    (["--num-classes", "3"], "--num-classes must be 0 (unconditional) or the dataset's 10, got 3"),
])  # fmt: skip
def test_train_option_errors(argv, message, capsys):
    assert cli(["train", *argv, "--steps", "1"]) == 2
    assert message in capsys.readouterr().err
