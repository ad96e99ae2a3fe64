"""The block designs through the CLI: `fastdit ablate` trains each with one budget (a table and a loss plot),
checkpoints record the design and sample back."""
import pytest
import torch

from fastdit.cli import main as cli
from fastdit.models import BLOCKS

from _train_helpers import FAST, one_thread  # noqa: F401 (an autouse fixture)


def test_ablate_trains_every_design_and_writes_a_table_and_a_plot(tmp_path, capsys):
    out = tmp_path / "ablate"
    assert cli(["ablate", "--steps", "2", *FAST, "--out", str(out)]) == 0
    table = (out / "ablation.md").read_text().splitlines()
    assert [row.split(" | ")[0].lstrip("| ") for row in table[2:]] == list(BLOCKS)
    assert (out / "ablation.png").stat().st_size > 0 and "ablation.md" in capsys.readouterr().out
    for design in BLOCKS:  # each run records its design, and its checkpoint samples back through the CLI
        ckpt = out / design / "checkpoints" / "0000002.pt"
        raw = torch.load(ckpt, weights_only=True)
        assert raw["model_config"]["block"] == design and raw["args"]["block"] == design
        assert (out / design / "samples.png").is_file()
    assert cli(["sample", "--ckpt", str(out / "in-context" / "checkpoints" / "0000002.pt"), "--steps", "2",
                "--per-class", "1", "--out", str(tmp_path / "s.png")]) == 0


def test_ablate_and_block_errors(capsys):
    for argv, message in ((["ablate", "--blocks", "adaLN,film"], "--blocks must be a comma-separated list of"),
                          (["ablate", "--blocks", "adaLN,adaLN"], "--blocks names a design twice"),
                          (["ablate", "--block", "adaLN"], "--resume and --block do not apply to ablate")):
        assert cli(argv) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's own one-line error
        cli(["train", "--block", "film"])
    assert e.value.code == 2 and "argument --block: invalid choice: 'film'" in capsys.readouterr().err
