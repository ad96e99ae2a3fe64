"""The block designs through the CLI: `fastdit ablate` trains each with one budget (a table and a loss plot),
checkpoints record the design and sample back."""

from argparse import Namespace

import torch
from _train_helpers import FAST, one_thread, sample_one_per_class  # noqa: F401 (an autouse fixture)

from fastdit import _util, train
from fastdit.ablate import data_name
from fastdit.cli import main as cli
from fastdit.models import BLOCKS


def test_ablate_trains_every_design_and_writes_a_table_and_a_plot(tmp_path, monkeypatch, capsys):
    out, steps, train_step = tmp_path / "ablate", [], train.Trainer.train_step

    def step_or_crash(self, x, y):  # killed at the third design's second step, after its first checkpoint
        if not steps or steps[-1][0] != self.args.block:
            steps.append([self.args.block, 0])
        if self.args.block == BLOCKS[2] and self.step == 1 and crash:
            raise KeyboardInterrupt
        steps[-1][1] += 1
        return train_step(self, x, y)

    monkeypatch.setattr(train.Trainer, "train_step", step_or_crash)
    argv, crash = ["ablate", "--steps", "2", "--ckpt-every", "1", *FAST, "--out", str(out)], True
    assert cli(argv) == 130 and not (out / "ablation.md").exists()
    said = capsys.readouterr().err.strip().splitlines()[-1]  # the ablation's way on, not its run's (train --resume)
    assert said == f"fastdit ablate: interrupted: in {BLOCKS[2]}: the same command with --out {out} keeps the " + (
        f"designs done and goes on from {BLOCKS[2]}'s last checkpoint, if it has one"
    )
    crash, steps[:] = False, []
    assert cli(argv) == 0  # the same command continues: the third design from its step 1, then the fourth
    assert steps == [[BLOCKS[2], 1], [BLOCKS[3], 2]]
    table = (out / "ablation.md").read_text().splitlines()
    assert [row.split(" | ")[0].lstrip("| ") for row in table[2:]] == list(BLOCKS)
    losses = [r["loss"] for r in _util.read_jsonl(out / BLOCKS[2] / "metrics.jsonl") if "event" not in r]
    assert len(losses) == 2 and f"| {sum(losses) / 2:.4f} |" in table[4]  # both steps, across the two commands
    assert (out / "ablation.png").stat().st_size > 0 and "ablation.md" in capsys.readouterr().out
    for design in BLOCKS:  # each run records its design, and its checkpoint samples back through the CLI
        ckpt = out / design / "checkpoints" / "0000002.pt"
        raw = torch.load(ckpt, weights_only=True)
        assert raw["model_config"]["block"] == design and raw["args"]["block"] == design
        assert (out / design / "samples.png").is_file()
    assert sample_one_per_class(out / "in-context" / "checkpoints" / "0000002.pt", tmp_path / "s.png") == 0


def test_ablate_and_block_errors(capsys):
    for argv, message in (
        (["ablate", "--blocks", "adaLN,film"], "--blocks must be a comma-separated list of"),
        (["ablate", "--blocks", "adaLN,adaLN"], "--blocks names a design twice"),
        (["ablate", "--block", "adaLN"], "--resume and --block do not apply to ablate"),
        (["ablate", "--resume", "runs/x"], "the same command is run with its --out"),
        (["ablate", "--results-dir", "results"], "--results-dir does not apply to ablate"),
    ):
        assert cli(argv) == 2
        assert message in capsys.readouterr().err
    assert cli(["train", "--block", "film"]) == 2  # argparse's own one-line error
    assert "argument --block: invalid choice: 'film'" in capsys.readouterr().err


def test_ablation_table_and_plot_show_fid_where_the_runs_measured_it(tmp_path):
    from PIL import Image

    from fastdit import ablate

    losses = [dict(step=s, loss=1.0 / s) for s in range(1, 21)]
    with_fid = {
        "adaLN-Zero": losses + [dict(event="fid", step=10, fid=80.0), dict(event="fid", step=20, fid=60.5)],
        "in-context": losses + [dict(event="fid", step=20, fid=75.25)],
    }
    wide = Image.open(ablate.plot_losses(with_fid, tmp_path / "fid.png")).size[0]
    assert wide > 1.5 * Image.open(ablate.plot_losses({"adaLN": losses}, tmp_path / "loss.png")).size[0]
    row = dict(design="adaLN-Zero", params=2e6, gflops=0.02, final_loss=0.05, fid=60.5, seconds=3, steps=20)
    table = ablate.format_table([row, dict(row, design="adaLN", fid=None)])
    assert "| 0.0500 | 60.50 | 20 |" in table and "| not measured |" in table


def test_resume_refuses_another_design(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["train", "--steps", "1", *FAST, "--out", str(out)]) == 0
    assert cli(["train", "--resume", str(out), "--block", "in-context", "--steps", "2"]) == 2
    assert "--block in-context contradicts the resumed run's adaLN-Zero" in capsys.readouterr().err


def test_ablate_help_and_folder_name_are_its_own(capsys):
    """--help shows neither --resume nor --block (ablate refuses them) and gives ablate's default folder, named
    after the data as `fastdit train` names its runs."""
    assert cli(["ablate", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--resume" not in text and "--block " not in text and "runs/ablate-<data>-<time>" in text
    for data, latents, name in [(None, None, "digits"), ("mnist:data/mnist", None, "mnist"),
                                ("path/to/images/", None, "images"), (None, "runs/latents", "latents")]:  # fmt: skip
        assert data_name(Namespace(data=data, latents=latents)) == name
