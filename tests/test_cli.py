"""The `fastdit` command: every bad flag is one line naming it (exit code 2, nothing written, no
traceback), valid edge values work, every option's help states its default, `fastdit bench` forwards."""

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_helpers import FAST, one_thread, send_stop_signal, stop_signals_guarded  # noqa: F401 (autouse fixture)
from PIL import Image

from fastdit import DiT, cli, latents, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """What the invocations point at: a finished 2-step run, a VAE, image folders, files of the wrong kind."""
    root = tmp_path_factory.mktemp("files")
    train.main(FAST + ["--steps", "2", "--out", str(root / "run")])
    assert (
        cli.main(
            [
                "vae",
                "--steps",
                "1",
                "--batch-size",
                "8",
                "--base-channels",
                "4",
                "--log-every",
                "1",
                "--out",
                str(root / "vae"),
            ]
        )
        == 0
    )
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / "rgb" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "rgb" / cls / f"{i}.png")
    (root / "empty").mkdir()
    (root / "broken" / "a").mkdir(parents=True)
    (root / "broken" / "a" / "0.png").write_bytes(b"not a png")
    (root / "junk.pt").write_bytes(os.urandom(256))
    (root / "plain.txt").write_text("not a folder")
    torch.save(
        DiT(input_size=4, in_channels=4, depth=1, hidden_size=32, num_heads=2, num_classes=10).state_dict(),
        root / "official.pt",
    )
    return root


def snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# (argv with {F} for the files folder, text the error line must contain, environment); one line each.
INVALID = [
    # train: single flags
    ("train --steps 0", "argument --steps: must be an integer >= 1, got 0"),
    ("train --steps -5", "argument --steps"),
    ("train --steps ten", "argument --steps: expected an integer, got 'ten'"),
    ("train --steps 1.5", "argument --steps"),
    ("train --epochs 0", "argument --epochs"),
    ("train --steps 3 --epochs 1", "argument --epochs: not allowed with argument --steps"),
    ("train --global-batch-size 0", "argument --global-batch-size"),
    ("train --lr 0", "argument --lr: must be a finite number > 0, got '0'"),
    ("train --lr -1", "argument --lr"),
    ("train --lr inf", "argument --lr: must be a finite number > 0, got 'inf'"),
    ("train --lr nan", "argument --lr"),
    ("train --lr 1e400", "argument --lr"),
    ("train --weight-decay -0.1", "argument --weight-decay"),
    ("train --weight-decay nan", "argument --weight-decay"),
    ("train --ema-decay 1", "argument --ema-decay: must be a finite number >= 0 and < 1"),
    ("train --ema-decay -0.5", "argument --ema-decay"),
    ("train --grad-clip -1", "argument --grad-clip"),
    ("train --grad-clip inf", "argument --grad-clip"),
    ("train --max-bad-steps 0", "argument --max-bad-steps"),
    ("train --ckpt-every -1", "argument --ckpt-every: must be an integer >= 0"),
    ("train --sample-every -1", "argument --sample-every"),
    ("train --sample-steps 0", "argument --sample-steps"),
    ("train --diffusion-steps 20", "argument --diffusion-steps: must be an integer >= 21, got 20"),
    ("train --sample-steps 1", "argument --sample-steps: must be an integer >= 2, got 1"),
    ("train --cfg-scale nan", "argument --cfg-scale: must be a finite number, got 'nan'"),
    ("train --cfg-scale inf", "argument --cfg-scale"),
    ("train --class-dropout-prob 1", "argument --class-dropout-prob"),
    ("train --class-dropout-prob -0.1", "argument --class-dropout-prob"),
    ("train --log-every 0", "argument --log-every"),
    ("train --seed -1", "argument --seed/--global-seed: must be an integer in [0, 4294967295], got -1"),
    ("train --seed 1099511627776", "argument --seed"),
    ("train --num-workers -1", "argument --num-workers"),
    ("train --image-size 0", "argument --image-size"),
    ("train --model DiT-XXL/2", "argument --model: unknown model 'DiT-XXL/2'; valid names: DiT-XL/2, DiT-XL/4"),
    ("train --precision fp4", "argument --precision: invalid choice: 'fp4'"),
    ("train --device tpu", "argument --device"),
    ("train --frobnicate", "unrecognized arguments: --frobnicate"),
    ("train --out {F}/plain.txt", "argument --out: '{F}/plain.txt' is a folder to write into, but"),
    ("train --out {F}/plain.txt/run", "argument --out"),
    ("train --out=", "argument --out: expected a folder, got an empty name"),
    ("train --fsdp --steps 1", "--fsdp shards over torchrun's processes: launch with torchrun"),
    # train: flags that must fit together, the data and the run folder
    (
        "train --model DiT-Tiny/2 --image-size 9",
        "--image-size 9: the model's input 9x9 must be divisible by DiT-Tiny/2's patch size 2",
    ),
    ("train --global-batch-size 5000", "the dataset has 1797 items, fewer than --global-batch-size 5000"),
    ("train --sample-steps 2000", "--sample-steps 2000 must be at most --diffusion-steps 1000"),
    ("train --cfg-scale 2 --class-dropout-prob 0", "--cfg-scale 2.0 guides the sample grids with the null class"),
    ("train --vae v.pt", "--vae needs --data (images encoded on the fly) or --latents"),
    ("train --fid-every 5", "--fid-every needs --fid-ref"),
    ("train --fid-every -1", "argument --fid-every"),
    ("train --fid-samples 0", "argument --fid-samples"),
    ("train --fid-ref ref.npz", "--fid-ref without --fid-every N would measure nothing"),
    ("train --data /no/such/folder", "data path '/no/such/folder' does not exist"),
    ("train --data {F}/plain.txt", "is not a folder"),
    ("train --data {F}/empty", "holds no class sub-folders"),
    ("train --data {F}/broken", "none of the 1 images under '{F}/broken' is readable (the first: {F}/broken/a/0.png: "),
    # a mistyped path is said before a VAE is loaded (or downloaded: offline, that error would come instead)
    ("train --data-path /no/such/folder", "data path '/no/such/folder' does not exist"),
    ("train --data mnist:/no/mnist --vae ema", "--data mnist:/no/mnist: '/no/mnist' is not a folder"),
    ("train --latents /no/latents", "latents folder '/no/latents' does not exist"),
    ("train --latents {F}/run/checkpoints/0000002.pt", "is a file, not a folder"),
    ("train --latents {F}/empty", "has no manifest.json"),
    ("train --out {F}/run", "--out {F}/run holds another run"),
    ("train --data {F}/rgb --vae {F}/vae/vae.pt --image-size 10", "--image-size 10 must be divisible by the VAE's"),
    # train --resume
    ("train --resume /no/run", "--resume /no/run: no such checkpoint file or run folder"),
    ("train --resume {F}/empty", "no checkpoints/NNNNNNN.pt in this folder"),
    ("train --resume {F}/junk.pt", "--resume: {F}/junk.pt: not a PyTorch checkpoint"),
    ("train --resume {F}/official.pt", "is not a fastdit training checkpoint"),
    ("train --resume {F}/run --steps 1", "--steps 1: the resumed run is at step 2 already"),
    ("train --resume {F}/run --model DiT-S/2", "--model DiT-S/2 contradicts the resumed run's DiT-Tiny/2"),
    ("train --resume {F}/run --image-size 16", "--image-size 16 contradicts the resumed run's 8"),
    ("train --resume {F}/run --global-batch-size 32", "--global-batch-size 32 contradicts"),
    ("train --resume {F}/run --seed 3", "--seed 3 contradicts"),
    ("train --resume {F}/run --diffusion-steps 500", "--diffusion-steps 500 contradicts"),
    ("train --resume {F}/run --class-dropout-prob 0.2", "--class-dropout-prob 0.2 contradicts"),
    ("train --resume {F}/run --num-classes 5", "--num-classes 5 contradicts the resumed run's 10"),
    ("train --resume {F}/run --data {F}/rgb --steps 3", "this data makes a model with in_channels 3 (checkpoint: 1)"),
    (
        "train --deterministic --steps 1",
        "attention backend 'sdpa' has no deterministic backward",
        dict(FASTDIT_ATTENTION="sdpa"),
    ),
    # sample
    ("sample --model DiT-B/2", "there is none for DiT-B/2 at --image-size 256: give --ckpt"),
    ("sample --ckpt /no/ckpt.pt", "--ckpt '/no/ckpt.pt' does not exist or is not a file"),
    ("sample --ckpt {F}/empty", "--ckpt {F}/empty: no checkpoints"),
    ("sample --ckpt {F}/junk.pt", "--ckpt: {F}/junk.pt: not a PyTorch checkpoint"),
    ("sample --ckpt {F}/official.pt", "holds no model config"),
    ("sample --ckpt {F}/vae/vae.pt", "--ckpt {F}/vae/vae.pt is a VAE (from fastdit vae), not a DiT"),
    ("sample-ddp --ckpt {F}/vae/vae.pt", "--ckpt {F}/vae/vae.pt is a VAE (from fastdit vae), not a DiT"),
    ("sample --ckpt {F}/official.pt --model DiT-S/2 --image-size 32", "give --vae"),
    (
        "sample --ckpt {F}/official.pt --model DiT-S/2 --image-size 32 --vae x",
        "does not fit the model (pos_embed differs",
    ),
    (
        "sample --ckpt {F}/official.pt --model DiT-S/2 --image-size 32 --vae x",
        "pos_embed: checkpoint (1, 4, 32), model (1, 4, 384); ",
    ),
    ("sample --ckpt {F}/official.pt --model DiT-S/2 --image-size 36 --vae x", "--image-size 36 must be divisible by 8"),
    (
        "sample --ckpt {F}/official.pt --model DiT-S/8 --image-size 32 --vae x",
        "--image-size 32: the model's input 4x4 must be divisible by DiT-S/8's patch size 8",
    ),
    ("sample --ckpt {F}/run --steps 0", "argument --steps"),
    ("sample --ckpt {F}/run --steps 1001", "--steps must be in [2, 1000] (the model's diffusion steps), got 1001"),
    ("sample --ckpt {F}/run --sampler ddim --steps 999", "--steps 999: timestep_respacing (section_counts) 'ddim999'"),
    ("sample --ckpt {F}/run --steps 1", "argument --steps/--num-sampling-steps: must be an integer >= 2, got 1"),
    ("sample --ckpt {F}/run --sampler euler", "argument --sampler: invalid choice"),
    ("sample --ckpt {F}/run --seed -1", "argument --seed"),
    ("sample --ckpt {F}/run --cfg-scale nan", "argument --cfg-scale"),
    ("sample --ckpt {F}/run --classes 3,42", "--classes must be in [0, 10) for this model, got 3,42"),
    ("sample --ckpt {F}/run --classes a,b", "argument --classes: expected an integer, got 'a'"),
    ("sample --ckpt {F}/run --classes 3,,7", "argument --classes: expected comma-separated integers"),
    ("sample --ckpt {F}/run --classes=-1", "argument --classes: must be an integer >= 0, got -1"),
    ("sample --ckpt {F}/run --classes=", "argument --classes"),
    ("sample --ckpt {F}/run --per-class 0", "argument --per-class"),
    ("sample --ckpt {F}/run --out grid.jpeg2", "argument --out: 'grid.jpeg2': the grid is written as .png or .jpg"),
    ("sample --ckpt {F}/run --out grid", "argument --out"),
    ("sample --ckpt {F}/run --out=", "argument --out: expected a file name, got an empty one"),
    ("sample --ckpt {F}/run --out {F}/plain.txt/grid.png", "is a folder to write into, but '{F}/plain.txt' is a file"),
    ("sample --ckpt {F}/run --image-size 0", "argument --image-size"),
    ("sample --ckpt {F}/run --num-classes 0", "argument --num-classes"),
    ("sample --ckpt {F}/run --model DiT-XXL/2", "argument --model"),
    # a fastdit checkpoint records its model: these flags (for official checkpoints) must agree with it
    ("sample --ckpt {F}/run --image-size 16", "--image-size 16 contradicts {F}/run/checkpoints/0000002.pt, a "),
    ("sample --ckpt {F}/run --model DiT-S/2", "--model DiT-S/2 contradicts {F}/run/checkpoints/0000002.pt, a "),
    ("sample-ddp --ckpt {F}/run --num-classes 5", "--num-classes 5 contradicts"),
    ("sample --ckpt {F}/run --weights best", "argument --weights"),
    (
        "sample --ckpt {F}/run --vae {F}/vae/vae.pt",
        "--vae {F}/vae/vae.pt: {F}/run/checkpoints/0000002.pt is a pixel-space",
    ),
    # sample-ddp
    ("sample-ddp --ckpt {F}/run --num-samples 0", "argument --num-samples"),
    ("sample-ddp --ckpt {F}/run --per-proc-batch-size 0", "argument --per-proc-batch-size"),
    (
        "sample-ddp --ckpt {F}/run --out samples.png",
        "argument --out: 'samples.png': the samples file is written as .npz",
    ),
    ("sample-ddp --ckpt {F}/run --out {F}/empty", "argument --out"),
    ("sample-ddp --ckpt {F}/run --steps 0", "argument --steps"),
    ("sample-ddp --ckpt {F}/run --steps 5000", "--steps must be in [2, 1000]"),
    ("sample-ddp --ckpt {F}/run --seed 1e3", "argument --seed"),
    ("sample-ddp --ckpt /no/ckpt.pt", "--ckpt '/no/ckpt.pt'"),
    # vae
    ("vae --image-size 10 --downsample 2", "--image-size 10 must be divisible by 2**--downsample = 4"),
    ("vae --image-size 0", "argument --image-size"),
    ("vae --downsample -1", "argument --downsample"),
    ("vae --downsample 9", "argument --downsample: must be an integer in [0, 8], got 9"),
    ("vae --steps 0", "argument --steps"),
    ("vae --batch-size 0", "argument --batch-size"),
    ("vae --lr 0", "argument --lr"),
    ("vae --lr nan", "argument --lr"),
    ("vae --beta -1", "argument --beta"),
    ("vae --beta inf", "argument --beta"),
    ("vae --latent-channels 0", "argument --latent-channels"),
    ("vae --base-channels 0", "argument --base-channels"),
    ("vae --channels 2", "argument --channels: invalid choice"),
    ("vae --channels 3", "the digits have 1 channel"),
    ("vae --log-every 0", "argument --log-every"),
    ("vae --ckpt-every -1", "argument --ckpt-every: must be an integer >= 0"),
    ("vae --seed -3", "argument --seed"),
    ("vae --out {F}/plain.txt", "argument --out"),
    ("vae --out {F}/vae", "--out {F}/vae holds another VAE ({F}/vae/vae.pt): give a new --out"),
    ("vae --data /no/such/folder", "data path '/no/such/folder' does not exist"),
    ("vae --data {F}/broken", "none of the 1 images under '{F}/broken' is readable"),
    # latents
    ("latents --out x.pt", "the following arguments are required: --vae"),
    ("latents --vae {F}/vae/vae.pt", "the following arguments are required: --out"),
    ("latents --vae /no/vae.pt --out x.pt", "--vae '/no/vae.pt' does not exist"),
    ("latents --vae {F}/junk.pt --out x.pt", "VAE checkpoint: {F}/junk.pt: not a PyTorch checkpoint"),
    ("latents --vae {F}/run/checkpoints/0000002.pt --out x.pt", "is not a fastdit VAE checkpoint"),
    (
        "latents --vae {F}/vae/vae.pt --out {F}/plain.txt",
        "argument --out: '{F}/plain.txt' is a folder to write into, but",
    ),
    ("latents --vae {F}/vae/vae.pt --out {F}/run", "--out {F}/run is a folder with other files in it"),
    ("latents --vae {F}/vae/vae.pt --out x --chunk-size 0", "argument --chunk-size"),
    ("latents --vae {F}/vae/vae.pt --vae-revision main --out x", "--vae-revision main names a hub revision, but"),
    ("latents --vae {F}/vae/vae.pt --out x --num-workers -1", "argument --num-workers"),
    ("latents --vae {F}/vae/vae.pt --out x --dtype float8", "argument --dtype: invalid choice"),
    ("latents --vae {F}/vae/vae.pt --out x.pt --image-size 0", "argument --image-size"),
    (
        "latents --vae {F}/vae/vae.pt --out x.pt --image-size 10",
        "--image-size 10 must be a positive multiple of the VAE's downsampling factor 4",
    ),
    ("latents --vae {F}/vae/vae.pt --out x.pt --batch-size 0", "argument --batch-size"),
    ("latents --vae {F}/vae/vae.pt --out x.pt --seed -1", "argument --seed"),
    ("latents --vae {F}/vae/vae.pt --out x.pt --flips sideways", "argument --flips: invalid choice"),
    ("latents --vae {F}/vae/vae.pt --out x.pt --data /no/such", "data path '/no/such' does not exist"),
    ("latents --vae {F}/vae/vae.pt --out x --data {F}/broken", "none of the 1 images under '{F}/broken' is readable"),
    ("latents --vae ema --out x --data /no/such", "data path '/no/such' does not exist"),
    # fid
    ("fid /no/samples.npz /no/ref.npz", "samples '/no/samples.npz' is not a file"),
    ("fid", "the following arguments are required: samples, ref"),
    ("fid a.npz b.npz --batch-size 0", "argument --batch-size"),
    ("fid a.npz b.npz --metrics fid,xyz", "argument --metrics: unknown metric(s) xyz; choose from fid, sfid"),
    ("fid a.npz b.npz --metrics=", "argument --metrics: unknown metric(s) (none given)"),
    ("fid {F}/junk.pt {F}/junk.pt", "samples {F}/junk.pt: not an .npz file"),  # not 'contains pickled data'
    ("fid a.npz b.npz --out scores.txt", "argument --out: 'scores.txt': the numbers is written as .json"),
    # the command itself, and the environment the ops read
    ("frobnicate", "invalid choice: 'frobnicate' (choose from 'train', 'sample'"),
    ("sample --ckpt {F}/run", "FASTDIT_BACKEND must be one of auto, reference", dict(FASTDIT_BACKEND="fast")),
    ("train --steps 1", "FASTDIT_ATTENTION must be one of auto, triton", dict(FASTDIT_ATTENTION="flash")),
]


@pytest.mark.parametrize("case", INVALID, ids=[c[0].replace("{F}/", "") for c in INVALID])
def test_every_bad_invocation_is_one_line_naming_it_and_writes_nothing(case, files, tmp_path, monkeypatch, capsys):
    command, expected, env = (*case, {})[:3]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    before = snapshot(files)
    code = cli.main([arg.replace("{F}", str(files)) for arg in command.split()])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, err)
    command_name = command.split()[0] if not command.startswith("frob") else ""
    assert lines[0].startswith(f"fastdit {command_name}".rstrip() + ": error: "), lines[0]
    assert expected.replace("{F}", str(files)) in lines[0]
    assert "Traceback" not in out + err
    assert not list(cwd.iterdir()), "files left behind"  # nothing written, not even an empty runs/
    assert snapshot(files) == before


@pytest.mark.parametrize(
    "env, expected",
    [
        (dict(FASTDIT_BACKEND="cuda"), "x is on cpu, and the cuda backend (FASTDIT_BACKEND=cuda) runs"),
        (dict(FASTDIT_ATTENTION="xformers"), "attention backend 'xformers' needs the xformers package"),
    ],
)
def test_a_backend_that_cannot_run_here_is_bad_input(env, expected, files, tmp_path, monkeypatch, capsys):
    """Found at the model's first op (the sampling bar has started), it ends the command as bad input: one
    error line, exit code 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["sample", "--ckpt", str(files / "run"), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"fastdit sample: error: {expected}") and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_options_given_on_resume_apply(files, tmp_path):
    """--lr and --weight-decay given with --resume drive the optimizer (not the values its loaded state holds),
    and --precision fp16 resumes a run saved without fp16 (so without GradScaler state) with a fresh scaler."""
    run = shutil.copytree(files / "run", tmp_path / "run")
    given = ["--lr", "0.05", "--weight-decay", "0.1", "--precision", "fp16"]
    trainer = train.Trainer(train.parse_args(["--resume", str(run), "--steps", "3", *given]))
    try:
        assert [(g["lr"], g["weight_decay"]) for g in trainer.opt.param_groups] == [(0.05, 0.1)]
        assert trainer.scaler.is_enabled() and trainer.step == 2
    finally:
        trainer.close()


@pytest.mark.parametrize(
    "ckpt_every, said",
    [
        (
            2,
            "after step 3; `fastdit train --resume {out}` goes on from the last checkpoint, {out}/checkpoints/0000002.pt",
        ),
        (0, "after step 3, with no checkpoint yet (--ckpt-every 0: at the end only): nothing to resume"),
    ],
)
def test_ctrl_c_in_training_says_how_the_run_goes_on(ckpt_every, said, tmp_path, monkeypatch, capsys):
    real, steps = train.Trainer.train_step, []

    def step(self, x, y):  # Ctrl-C during the 4th step
        if len(steps) == 3:
            raise KeyboardInterrupt
        steps.append(x)
        return real(self, x, y)

    monkeypatch.setattr(train.Trainer, "train_step", step)
    out = tmp_path / "run"
    with stop_signals_guarded():  # the stop signals' handlers the Trainer set are undone: the ones found are back
        assert cli.main(["train", *FAST, "--steps", "5", "--ckpt-every", str(ckpt_every), "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "fastdit train: interrupted: " + said.format(out=out)


@pytest.mark.parametrize(
    "signum, code, how", [(None, 130, "interrupted"), (signal.SIGTERM, 128 + signal.SIGTERM, "stopped by SIGTERM")]
)
def test_ctrl_c_or_a_stop_signal_in_latents_says_the_same_command_goes_on(
    signum, code, how, files, tmp_path, monkeypatch, capsys
):
    def interrupted(*args):
        if signum is None:
            raise KeyboardInterrupt
        send_stop_signal(signum)

    monkeypatch.setattr(latents, "encode_chunks", interrupted)
    out = tmp_path / "latents"
    with stop_signals_guarded():
        assert cli.main(["latents", "--vae", str(files / "vae" / "vae.pt"), "--out", str(out)]) == code
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said == f"fastdit latents: {how}: the chunks done are kept in {out}: the same command encodes the rest"


def test_valid_edge_values_work(files, tmp_path, monkeypatch, capsys):
    """The smallest (or largest) value every check lets through runs end to end."""
    monkeypatch.chdir(tmp_path)
    assert (
        cli.main(
            [
                "train",
                "--model",
                "DiT-Tiny/1",
                "--image-size",
                "4",
                "--steps",
                "1",
                "--global-batch-size",
                "1",
                "--diffusion-steps",
                "21",
                "--sample-steps",
                "2",
                "--ema-decay",
                "0",
                "--weight-decay",
                "0",
                "--cfg-scale",
                "0",
                "--class-dropout-prob",
                "0",
                "--ckpt-every",
                "0",
                "--sample-every",
                "0",
                "--log-every",
                "1",
                "--seed",
                "4294967295",
                "--max-bad-steps",
                "1",
                "--out",
                "edge",
            ]
        )
        == 0
    )
    ckpt = tmp_path / "edge" / "checkpoints" / "0000001.pt"
    assert ckpt.is_file() and (tmp_path / "edge" / "samples.png").is_file()
    assert (
        cli.main(
            [
                "sample",
                "--ckpt",
                "edge",
                "--steps",
                "2",
                "--per-class",
                "1",
                "--classes",
                "0,9",
                "--seed",
                "0",
                "--out",
                "grid.jpg",
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "grid.jpg").format == "JPEG"  # the suffix's format, not PNG bytes
    assert (
        cli.main(
            [
                "sample",
                "--ckpt",
                str(files / "run"),
                "--sampler",
                "ddim",
                "--steps",
                "2",
                "--per-class",
                "1",
                "--classes",
                "3",
                "--out",
                "ddim.png",
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "sample-ddp",
                "--ckpt",
                str(ckpt),
                "--num-samples",
                "1",
                "--per-proc-batch-size",
                "1",
                "--steps",
                "21",
                "--cfg-scale",
                "1",
                "--out",
                "one.npz",
            ]
        )
        == 0
    )
    assert np.load(tmp_path / "one.npz")["arr_0"].shape == (1, 4, 4, 1)
    assert (
        cli.main(
            [
                "vae",
                "--steps",
                "1",
                "--batch-size",
                "1",
                "--downsample",
                "0",
                "--image-size",
                "8",
                "--beta",
                "0",
                "--base-channels",
                "1",
                "--latent-channels",
                "1",
                "--log-every",
                "1",
                "--out",
                "vae",
            ]
        )
        == 0
    )
    assert (
        cli.main(["latents", "--vae", "vae/vae.pt", "--batch-size", "2000", "--chunk-size", "2000", "--out", "lat"])
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddim.png", "edge", "grid.jpg", "lat", "one.npz", "vae"]


def test_outputs_go_under_runs_by_default(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--ckpt", str(files / "run"), "--steps", "2", "--per-class", "1", "--classes", "1", "--seed", "5"]
    assert cli.main(["sample", *args]) == 0
    ddp = ["--ckpt", str(files / "run" / "checkpoints"), *args[2:4]]  # the checkpoints folder: its latest, as the run's
    assert cli.main(["sample-ddp", *ddp, "--num-samples", "1", "--per-proc-batch-size", "1", "--cfg-scale", "1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    written = sorted(p.name for p in (tmp_path / "runs" / "samples").iterdir())
    assert written == ["run-0000002-ddpm2-cfg1-seed0-n1.npz", "run-0000002-ddpm2-cfg4-seed5.png"]


def test_every_option_says_what_it_does_and_its_default(capsys):
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS or name == "bench":
                continue
            text = (action.help or "").lower()
            assert len(text) > 20, (name, action.dest, text)
            if action.option_strings:  # an option: what it is when not given (positional arguments are given)
                assert "default" in text or "required" in text, (name, action.option_strings, text)
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("fastdit 0.")
    assert cli.main(["latents", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "encode a dataset" in help_text and "Returns" not in help_text  # a CLI description, not an API docstring


def test_console_command_prints_no_traceback():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "fastdit", "train", "--data", "/no/such/dir"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # python -m fastdit passes on the exit code
    assert proc.stderr.strip() == "fastdit train: error: data path '/no/such/dir' does not exist"


@pytest.mark.parametrize(
    "error",
    [
        MemoryError("Unable to allocate 745. GiB for an array"),  # numpy
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nmore"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 7188 bytes"),
    ],
)
def test_out_of_memory_is_one_line_and_other_errors_keep_their_traceback(error, monkeypatch, capsys):
    def run(args):
        raise error

    monkeypatch.setattr(train, "run", run)
    assert cli.main(["train"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastdit train: error: out of memory: "), lines
    assert str(error).split("\n")[0] in lines[0]
    monkeypatch.setattr(train, "run", lambda args: [][0])  # a bug, not the user's input: its traceback shows
    with pytest.raises(IndexError):
        cli.main(["train"])


def test_global_batch_must_divide_the_world_size(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as under torchrun --nproc_per_node 3; checked before joining
    assert cli.main(["train", "--global-batch-size", "16"]) == 2
    assert "--global-batch-size 16 is not divisible by the world size 3" in capsys.readouterr().err


def test_help_describes_the_main_job(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "PIXEL space" in out and "digits" in out and "--grad-checkpointing" in out and "DiT-Tiny/2" in out
    assert cli.main([]) == 2
    assert "sample-ddp" in capsys.readouterr().out


def test_bench_forwards_to_the_source_checkout(tmp_path, monkeypatch, capfd):
    fake = tmp_path / "checkout"
    (fake / "fastdit").mkdir(parents=True)
    (fake / "benchmarks").mkdir()
    (fake / "benchmarks" / "__init__.py").write_text("")
    (fake / "benchmarks" / "__main__.py").write_text("import sys; print('bench', sys.argv[1:]); sys.exit(5)")
    monkeypatch.setattr(cli, "__file__", str(fake / "fastdit" / "cli.py"))
    assert cli.main(["bench", "--smoke", "--help"]) == 5
    assert "bench ['--smoke', '--help']" in capfd.readouterr().out
    (fake / "benchmarks" / "__main__.py").unlink()
    assert cli.main(["bench"]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "source checkout" in lines[0]
