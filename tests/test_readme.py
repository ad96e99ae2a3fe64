"""Every command in README.md works verbatim.

The test reads README.md's ```bash blocks and runs their lines in order, in one fresh folder (so
later lines find what earlier ones wrote), then its ```python blocks there. A ```console block's
`$ fastdit ...` lines run as they are, and what the block shows under each must be what it prints;
its ```text block of settings must name every backend there is, and only those. A line is split at
`&&`, a `# comment` dropped, leading NAME=value settings set in the environment (a line of settings
alone runs nothing); each command must exit 0. How they run:

  fastdit ...                in this process, through fastdit.cli.main (what the `fastdit` console
                             script calls), in the fresh folder
  torchrun ... -m fastdit.cli ...
                             `python -m torch.distributed.run --standalone`, at most 2 processes (this
                             machine's CPUs: gloo instead of NCCL)

At toy size: TOY's flags are appended to each fastdit command (argparse keeps an option's last
value), and a train command's --steps N becomes N // 500 (the main job's 1500 -> 3, `--resume ...
--steps 3000` -> 6: the order of things is kept). The flags shrink batches, sampling steps and
models; they never change a path, the data or what a command does. README's stand-in paths get tiny
stand-ins (stand_ins). Lines that cannot run here are listed in SKIPPED with the reason, and every
line must be run or skipped: a new README line is tested or explicitly excused.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from _dataset_files import write_cifar10, write_mnist
from _train_helpers import one_thread  # noqa: F401 (an autouse fixture)
from PIL import Image

from fastdit import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

SKIPPED = {  # a command containing the key -> why it does not run here
    "pip install": "installs packages from the network (.ci/run installs the same way, with torch pinned)",
    "python -m pytest": "the test suite, of which this test is a part",
    "python -m benchmarks": "the GPU benchmark report (its CPU smoke mode has tests of its own)",
    "python kernels/build.py": "builds the native CUDA kernels with nvcc (tests/test_native_build.py builds them)",
    "in256": "DiT's ImageNet recipe: ImageNet, the SD-VAE (a download), ADM's reference batch, 8 GPUs "
    "(tests/test_latents.py runs these commands at toy sizes)",
    "DiT-XL-2-256x256.pt": "needs the official DiT-XL/2 release (a download) and a GPU",
}
TOY = {  # subcommand -> flags appended
    "train": ["--global-batch-size", "16", "--sample-steps", "2", "--sample-every", "0", "--ckpt-every", "0"],
    "sample": ["--steps", "2", "--per-class", "2"],
    "sample-ddp": ["--steps", "2", "--num-samples", "4", "--per-proc-batch-size", "2"],
    "vae": ["--steps", "2", "--batch-size", "16", "--base-channels", "8"],
    "latents": [],
}
TOY_MODEL = "DiT-Tiny/4"  # replaces any other model a train command names
STEPS_PER_TOY_STEP = 500
MAX_PROCESSES = 2


def stand_ins(folder):
    """README's stand-in paths, made real: path/to/images, a folder of 2 classes x 8 RGB images; data/mnist
    and data/cifar-10-batches-py, small synthetic copies of the downloads."""
    write_mnist(folder / "data/mnist")
    write_cifar10(folder / "data/cifar-10-batches-py")
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (folder / "path/to/images" / cls).mkdir(parents=True)
        for i in range(8):
            image = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
            Image.fromarray(image).save(folder / f"path/to/images/{cls}/{i}.png")


def blocks(language):
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def commands():
    """README's command lines, each split at && into (settings, argv) pairs (see the module docstring)."""
    lines = [line for block in blocks("bash") for line in block.splitlines() if line.strip()]
    return [(line, [(env, argv) for env, argv in map(settings_and_argv, line.split("&&")) if argv]) for line in lines]


def settings_and_argv(command):
    """'A=1 B=2 fastdit train # why' -> ({'A': '1', 'B': '2'}, ['fastdit', 'train'])."""
    argv, env = shlex.split(command, comments=True), {}
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
        name, value = argv.pop(0).split("=", 1)
        env[name] = value
    return env, argv


def toy(argv):
    """argv at toy size (see the module docstring)."""
    sub = argv[argv.index("-m") + 2] if argv[0] == "torchrun" else argv[1]
    argv = list(argv)
    if sub == "train":
        if "--steps" in argv:
            i = argv.index("--steps") + 1
            argv[i] = str(max(1, int(argv[i]) // STEPS_PER_TOY_STEP))
        else:
            argv += ["--steps", str(1500 // STEPS_PER_TOY_STEP)]
        if "--model" in argv:
            argv[argv.index("--model") + 1] = TOY_MODEL
    if argv[0] == "torchrun":
        i = argv.index("--nproc_per_node") + 1
        argv[i] = str(min(int(argv[i]), MAX_PROCESSES))
    return argv + TOY[sub]


def run(argv):
    """Run one README command (toy-sized) in the current folder; returns its exit code and output."""
    argv = toy(argv)
    if argv[0] == "fastdit":
        return cli.main(argv[1:]), ""
    assert argv[0] == "torchrun", f"README runs {argv[0]!r}: teach this test how"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", *argv[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_readme_commands_run_verbatim(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    stand_ins(tmp_path)
    ran = []
    for line, parts in commands():
        for env, argv in parts:
            command = " ".join(argv)
            if any(key in command for key in SKIPPED):
                continue
            with monkeypatch.context() as m:
                for name, value in env.items():
                    m.setenv(name, value)
                code, output = run(argv)
            assert code == 0, f"README line failed (exit {code}): {line}\n{output}{capsys.readouterr().err[-3000:]}"
            ran.append(command)
    # The ones that matter are among them: the main job, a resume, sampling, DDP, the latent-space recipe.
    assert "fastdit train" in ran and "fastdit train --resume runs/digits --steps 3000" in ran
    assert any(c.startswith("torchrun") for c in ran) and "fastdit train --latents runs/latents" in ran
    assert {c.split()[1] for c in ran if c.startswith("fastdit")} == {"train", "sample", "vae", "latents"}

    for code in blocks("python"):
        if any(key in code for key in SKIPPED):
            continue
        exec(compile(code, str(README), "exec"), {})  # noqa: S102 (README's own example)
    # What the commands promised: outputs in the folders they name, and the latent-space run on
    # small data gets the small defaults (DiT-Tiny, fitted to its 4x4 latents) without being asked.
    assert (tmp_path / "runs/digits/3-and-7.png").is_file() and (tmp_path / "runs/digits/samples.npz").is_file()
    latent_run = next(p for p in (tmp_path / "runs").iterdir() if p.name.startswith("latents-"))
    stored = torch.load(next((latent_run / "checkpoints").glob("*.pt")), weights_only=True)
    assert stored["args"]["model"] == "DiT-Tiny/1" and stored["args"]["lr"] == 1e-3
    folder_run = next(p for p in (tmp_path / "runs").iterdir() if p.name.startswith("images-"))
    stored = torch.load(next((folder_run / "checkpoints").glob("*.pt")), weights_only=True)
    assert stored["classes"] == ["cats", "dogs"]  # what sample grids label their rows with
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "data",
        "path",
        "runs",
    ]  # the stand-ins and runs/: nothing loose


def test_every_command_line_is_run_or_skipped_with_a_reason():
    for _, parts in commands():
        for _, argv in parts:
            command = " ".join(argv)
            if not any(key in command for key in SKIPPED):
                assert argv[0] in ("fastdit", "torchrun"), f"README runs {command!r}: add it to the test or SKIPPED"
                assert toy(argv)  # a subcommand the toy table knows


def console_commands():
    """README's ```console blocks: [(the command after `$ `, the output lines shown under it)]."""
    return [
        (chunk.splitlines()[0], chunk.splitlines()[1:])
        for block in blocks("console")
        for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]
    ]


def test_console_blocks_show_what_the_command_prints(capsys):
    assert console_commands(), "README's console blocks were not found"
    for command, shown in console_commands():
        env, argv = settings_and_argv(command)
        assert argv[0] == "fastdit" and not env, f"README's console runs {command!r}: teach this test how"
        assert cli.main(argv[1:]) == 0, command
        assert capsys.readouterr().out.splitlines()[: len(shown)] == shown, (
            f"README shows another output of {command!r}"
        )


def test_the_backend_settings_block_names_every_backend_and_only_those():
    """README's ```text block of settings: every FASTDIT_BACKEND value, and the attention backends it lists."""
    from fastdit import ops

    (block,) = blocks("text")
    settings = [settings_and_argv(line)[0] for line in block.splitlines()]
    assert [s["FASTDIT_BACKEND"] for s in settings if "FASTDIT_BACKEND" in s] == list(ops.BACKENDS)
    listed = re.search(r"attention alone: ([\w|]+)", block).group(1).split("|")
    assert listed == list(ops.ATTENTION_BACKENDS) and settings[-1]["FASTDIT_ATTENTION"] in listed
