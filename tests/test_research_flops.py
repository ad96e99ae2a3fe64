"""Parameters and FLOPs (fastdit.flops, `fastdit info`): the paper's Gflops, MFU's training FLOPs, and the
analytic count checked against torch's FlopCounterMode on small models."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastdit
from fastdit import complexity
from fastdit._registry import model_config
from fastdit.cli import main as cli
from fastdit.models import BLOCKS, DiT


def counted_macs(model, batch=3):
    """Multiply-accumulates of one image's forward as torch's FlopCounterMode counts them (2 per multiply-add)."""
    C, (H, W) = model.in_channels, model.x_embedder.img_size
    x, t = torch.randn(batch, C, H, W), torch.randint(0, 1000, (batch,))
    y = torch.randint(0, min(model.num_classes, 10), (batch,)) if model.num_classes else None
    with FlopCounterMode(display=False) as counter, torch.no_grad(), fastdit.ops.use_backend("reference"):
        model.eval()(x, t, y)
    total = counter.get_total_flops()
    assert total % (2 * batch) == 0
    return total // (2 * batch)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("kwargs", [
    dict(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=3),
    dict(input_size=(12, 8), patch_size=4, in_channels=1, hidden_size=72, depth=1, num_heads=2, mlp_ratio=2.5,
         learn_sigma=False, num_classes=0),
])  # fmt: skip
def test_analytic_count_matches_torch_flop_counter(kwargs, block):
    model = DiT(**kwargs, block=block)
    assert complexity.forward_macs(model_config(model)) == counted_macs(model)


def test_block_designs_cost_what_the_paper_says():
    """Figure 5's models at DiT-XL/2 256x256: cross-attention adds the most, about 15 %; adaLN the least;
    in-context's two tokens next to nothing."""
    cost = {b: fastdit.flops("DiT-XL/2", 256, block=b).gflops for b in BLOCKS}
    assert cost["adaLN"] < cost["adaLN-Zero"] < cost["in-context"] < cost["cross-attention"]
    assert round(cost["cross-attention"] / cost["adaLN-Zero"] - 1, 2) == 0.16 and round(cost["in-context"], 1) == 119.4


def test_the_papers_numbers_and_mfus():
    """The official README: 119 Gflops for DiT-XL/2 at 256x256, 525 at 512x512 (675M parameters); the
    benchmarks' MFU: ~712 GFLOP per training image at 256x256."""
    xl256, xl512 = fastdit.flops("DiT-XL/2", 256), fastdit.flops("DiT-XL/2", 512)
    assert round(xl256.gflops) == 119 and round(xl256.gflops, 1) == 118.6 and round(xl512.gflops) == 525
    assert round(xl256.params / 1e6) == 675 and xl256.tokens == 256 and xl512.input_shape == (4, 64, 64)
    assert round(xl256.train_gflop) == 712 and xl256.train_gflop == pytest.approx(6 * xl256.gflops)
    from benchmarks import workloads

    cfg = {"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 2, "latent": 32}
    assert 3 * workloads.forward_flops(**cfg) == pytest.approx(xl256.train_gflop * 1e9, rel=1e-12)
    # a built model at its own size, and a pixel-space one
    tiny = fastdit.flops("DiT-Tiny/2", 28, vae_factor=1, in_channels=1)
    with torch.device("meta"):
        built = DiT(input_size=28, patch_size=2, in_channels=1, hidden_size=128, depth=6, num_heads=4)
    assert fastdit.flops(built).gflops == tiny.gflops and tiny.tokens == 196 and tiny.input_shape == (1, 28, 28)


# The paper's Table 4 (ImageNet 256x256): Gflops and parameters (M) of the twelve configs, and of the block
# designs at XL/2 (its Figure 5's models).
PAPER_TABLE_4 = {
    ("DiT-S/8", "adaLN-Zero"): (0.36, 33), ("DiT-S/4", "adaLN-Zero"): (1.41, 33), ("DiT-S/2", "adaLN-Zero"): (6.06, 33),
    ("DiT-B/8", "adaLN-Zero"): (1.42, 131), ("DiT-B/4", "adaLN-Zero"): (5.56, 130),
    ("DiT-B/2", "adaLN-Zero"): (23.01, 130), ("DiT-L/8", "adaLN-Zero"): (5.01, 459),
    ("DiT-L/4", "adaLN-Zero"): (19.70, 458), ("DiT-L/2", "adaLN-Zero"): (80.71, 458),
    ("DiT-XL/8", "adaLN-Zero"): (7.39, 676), ("DiT-XL/4", "adaLN-Zero"): (29.05, 675),
    ("DiT-XL/2", "adaLN-Zero"): (118.64, 675), ("DiT-XL/2", "in-context"): (119.37, 449),
    ("DiT-XL/2", "cross-attention"): (137.62, 598), ("DiT-XL/2", "adaLN"): (118.56, 600),
}  # fmt: skip


def test_every_config_matches_the_papers_table_4():
    """To 0.02 Gflops (the last printed digit; the paper's tool counted a little more elementwise work, 0.01 %
    at XL/2) and to 1M parameters (the paper rounds some counts down)."""
    for (name, block), (gflops, params_m) in PAPER_TABLE_4.items():
        got = fastdit.flops(name, 256, block=block)
        assert abs(got.gflops - gflops) < 0.02 and abs(got.params / 1e6 - params_m) < 1, (name, block, got)


def test_info_command(capsys):
    assert cli(["info", "--model", "DiT-XL/2", "--image-size", "512"]) == 0
    out = capsys.readouterr().out
    assert "| DiT-XL/2 | adaLN-Zero | 4x64x64 | 1024 | 676.01 | 524.54 |" in out
    assert cli(["info", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["model"] for r in rows] == list(complexity.OFFICIAL) and rows[-1]["gflops"] == pytest.approx(
        118.62, abs=0.005
    )


@pytest.mark.parametrize("argv, message", [
    (["--model", "DiT-M/2"], "unknown --model 'DiT-M/2'"),
    (["--image-size", "100"], "--image-size 100 must be divisible by --vae-factor 8"),  # the flags' names
    (["--model", "DiT-XL/8", "--image-size", "32"], "--image-size 32: the model's input 4x4 must be divisible by DiT-XL/8's patch size 8"),
    (["--block", "film"], "--block must be one of"),
    (["--num-classes", "-1"], "argument --num-classes"),
])  # fmt: skip
def test_info_errors_are_one_line(argv, message, capsys):
    assert cli(["info", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_flops_argument_errors():
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        fastdit.flops("DiT-S/2")
    with pytest.raises(TypeError, match="model name or a DiT"):
        fastdit.flops(torch.nn.Linear(2, 2))
