"""fastdit sample (PNG grid) and fastdit sample-ddp (ADM .npz) from a tiny checkpoint."""

import contextlib
import errno
import fcntl
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _sync_trap import SyncTrap, checks_as_on_a_gpu  # noqa: F401 (a fixture)
from _train_helpers import (  # noqa: F401 (an autouse fixture)
    FAST,
    another_process_holding,
    one_thread,
    send_stop_signal,
    stop_signals_guarded,
)
from _vae_helpers import sd_vae  # noqa: F401 (a fixture)
from PIL import Image

import fastdit
from fastdit import DiT, _parts, _util, pretrained, sample, train
from fastdit._util import MAX_GRID_SIDE, UsageError, grid_limits, save_grid
from fastdit.cli import build_parser
from fastdit.cli import main as cli


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
    assert (
        cli(
            [
                "sample-ddp",
                "--ckpt",
                ckpt,
                "--num-samples",
                "5",
                "--per-proc-batch-size",
                "2",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    arr = np.load(out)["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 8, 8, 1)  # 6 sampled (3 batches of 2), trimmed to 5
    assert not list(tmp_path.glob(".*"))  # the per-rank shards are cleaned up
    assert (
        cli(
            [
                "sample-ddp",
                "--ckpt",
                ckpt,
                "--num-samples",
                "2",
                "--per-proc-batch-size",
                "2",
                "--steps",
                "2",
                "--rgb",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rgb = np.load(out)["arr_0"]
    assert rgb.shape == (2, 8, 8, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])


def test_sample_ddp_stopped_by_a_signal_says_what_it_kept(ckpt, tmp_path, monkeypatch, capsys):
    """SLURM's notice (SIGUSR1) after the first batch: one line says what is kept and that the same command goes on,
    exit code 128 + 10; the handlers found are put back."""
    save = _parts.Parts.save

    def save_then_signal(self, batch, images):
        save(self, batch, images)
        send_stop_signal(signal.SIGUSR1)

    monkeypatch.setattr(_parts.Parts, "save", save_then_signal)
    out = tmp_path / "s.npz"
    args = ["sample-ddp", "--ckpt", ckpt, "--per-proc-batch-size", "2", "--steps", "2", "--num-samples", "4"]
    with stop_signals_guarded():
        assert cli(args + ["--out", str(out)]) == 128 + signal.SIGUSR1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fastdit sample-ddp: stopped by SIGUSR1: the batches it finished are kept in {tmp_path / '.s.npz.parts'}: "
        f"the same command continues from them"
    )
    assert not out.exists() and any((tmp_path / ".s.npz.parts").glob("rank*-batch*.npz"))


def test_sample_ddp_continues_after_a_crash_to_the_same_file(ckpt, tmp_path, monkeypatch, capsys):
    args = ["sample-ddp", "--ckpt", ckpt, "--per-proc-batch-size", "2", "--steps", "2", "--seed", "3"]
    assert cli(args + ["--num-samples", "7", "--out", str(tmp_path / "whole.npz")]) == 0
    whole = np.load(tmp_path / "whole.npz")["arr_0"]
    out, save, sampled = tmp_path / "split.npz", _parts.Parts.save, []

    def save_then_crash(self, batch, images):
        save(self, batch, images)
        sampled.append(batch)
        if batch == crash_after:
            raise KeyboardInterrupt  # like a kill after the batch's file is written

    monkeypatch.setattr(_parts.Parts, "save", save_then_crash)
    crash_after = 1
    assert cli(args + ["--num-samples", "7", "--out", str(out)]) == 130
    assert not out.exists() and "the same command continues" in capsys.readouterr().err
    crash_after = 2  # the settings, not --num-samples, key the batches: 3 of 4 kept, the last one sampled
    assert cli(args + ["--num-samples", "5", "--out", str(out)]) == 130
    assert sampled == [0, 1, 2]  # batches 0 and 1 were not sampled again
    crash_after = None
    assert cli(args + ["--num-samples", "7", "--out", str(out)]) == 0
    assert sampled == [0, 1, 2, 3] and "continuing from" in capsys.readouterr().out
    assert np.array_equal(np.load(out)["arr_0"], whole)  # as if it never stopped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split.npz", "whole.npz"]  # the parts removed
    # Other settings start afresh: a crashed run of seed 3, then seed 4 to the same file.
    crash_after = 0
    assert cli(args + ["--num-samples", "7", "--out", str(out)]) == 130
    crash_after, sampled[:] = None, []
    assert cli(args[:-1] + ["4", "--num-samples", "7", "--out", str(out)]) == 0
    assert sampled == [0, 1, 2, 3] and not np.array_equal(np.load(out)["arr_0"], whole)


def test_a_second_run_of_the_same_output_is_refused_and_the_first_ones_batches_kept(
    ckpt, tmp_path, monkeypatch, capsys
):
    """A run crashed after its first batch, then a second command of the output (other settings, which would empty
    the parts folder) while another process holds the lock: refused, one line, nothing touched. The holder killed
    (its lock file stays), the first command continues from its batches to the file an uninterrupted run writes."""
    args = ["sample-ddp", "--ckpt", ckpt, "--num-samples", "4", "--per-proc-batch-size", "2", "--steps", "2"]
    assert cli(args + ["--out", str(tmp_path / "whole.npz")]) == 0
    out, save, parts = tmp_path / "split.npz", _parts.Parts.save, tmp_path / ".split.npz.parts"
    parts.mkdir()
    (parts / "settings.json").write_text("{}")  # an earlier run of other settings: its batch is cleared away
    (parts / "rank00000-batch0000003.npz").write_bytes(b"another run's batch")

    def save_then_crash(self, batch, images):
        save(self, batch, images)
        with open(parts / ".lock-rank00000", "ab") as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: emptying the folder kept the lock file
        raise KeyboardInterrupt

    monkeypatch.setattr(_parts.Parts, "save", save_then_crash)
    assert cli(args + ["--out", str(out)]) == 130
    monkeypatch.setattr(_parts.Parts, "save", save)
    kept = {p.name: p.read_bytes() for p in parts.iterdir()}
    assert sorted(kept) == ["rank00000-batch0000000.npz", "settings.json"]
    capsys.readouterr()
    with another_process_holding(parts / ".lock-rank00000"):
        assert cli(args + ["--seed", "1", "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"fastdit sample-ddp: error: {out}: another fastdit process is writing it (it holds {parts}/.lock-rank00000); "
        f"wait for it to end, or stop it, then run the command again"
    ]
    assert {p.name: p.read_bytes() for p in parts.iterdir() if p.name in kept} == kept and not out.exists()
    assert cli(args + ["--out", str(out)]) == 0
    assert "continuing from" in capsys.readouterr().out
    assert np.array_equal(np.load(out)["arr_0"], np.load(tmp_path / "whole.npz")["arr_0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split.npz", "whole.npz"]  # the parts and the lock removed


def test_output_lock_ranks_agree_races_and_file_systems_without_locks(tmp_path, monkeypatch, capsys):
    alone = SimpleNamespace(rank=0, all_gather_object=lambda error: [error])
    with_refused_rank1 = SimpleNamespace(rank=0, all_gather_object=lambda error: [error, "rank 1: refused"])
    with (
        pytest.raises(UsageError, match="rank 1: refused"),
        _util.exclusive_output(tmp_path, "out", with_refused_rank1),
    ):
        pytest.fail("a rank went on")
    assert not list(tmp_path.iterdir())  # rank 0's lock released and its file removed
    lock, flock, calls = tmp_path / ".lock-rank00000", fcntl.flock, []

    def holder_ends_between_open_and_lock(f, operation):
        if not calls:
            os.unlink(lock)  # what the holder's release does: the file we opened is no longer the lock file
        calls.append(f)
        flock(f, operation)

    monkeypatch.setattr(fcntl, "flock", holder_ends_between_open_and_lock)
    with _util.exclusive_output(tmp_path, "out", alone):
        assert len(calls) == 2 and os.path.samestat(os.fstat(calls[1].fileno()), os.stat(lock))

    def no_locks(f, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with _util.exclusive_output(tmp_path, "out", alone):
        calls.append("ran")
    assert calls[-1] == "ran" and "No locks available: nothing keeps a second run" in capsys.readouterr().err


def test_sample_dir_writes_dits_pngs_and_npz(ckpt, tmp_path):
    args = ["sample-ddp", "--ckpt", ckpt, "--num-samples", "5", "--per-proc-batch-size", "2", "--steps", "2"]
    assert cli(args + ["--sample-dir", str(tmp_path / "samples")]) == 0
    name = f"DiT-Tiny-2-{Path(ckpt).stem}-size-8-vae-none-cfg-1.5-seed-0"  # DiT's name; a pixel-space model
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [name, f"{name}.npz"]
    pngs = sorted((tmp_path / "samples" / name).iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(6)]  # 3 batches of 2, as DiT: all kept
    arr = np.load(tmp_path / "samples" / f"{name}.npz")["arr_0"]
    assert np.array_equal(arr[..., 0], np.stack([np.asarray(Image.open(p)) for p in pngs[:5]]))
    assert cli(args + ["--out", str(tmp_path / "out.npz")]) == 0
    assert np.array_equal(np.load(tmp_path / "out.npz")["arr_0"], arr)
    # --rgb: the PNGs hold what the .npz holds, the grayscale samples as 3 identical channels
    assert cli(args + ["--rgb", "--sample-dir", str(tmp_path / "rgb")]) == 0
    rgb = np.load(tmp_path / "rgb" / f"{name}.npz")["arr_0"]
    pngs = [Image.open(tmp_path / "rgb" / name / p.name) for p in pngs]
    assert rgb.shape == (5, 8, 8, 3) and np.array_equal(rgb, np.repeat(arr, 3, axis=-1))
    assert all(p.mode == "RGB" for p in pngs) and np.array_equal(rgb, np.stack([np.asarray(p) for p in pngs[:5]]))


def test_dits_sample_folder_names():
    """sample_ddp.py's folder_name, e.g. for its defaults (the pretrained DiT-XL/2, the ema VAE, guidance 1.5)."""
    sd_vae = SimpleNamespace(name="stabilityai/sd-vae-ft-ema", factor=8)
    loaded = SimpleNamespace(
        name="DiT-XL/2", codec=sd_vae, model=SimpleNamespace(x_embedder=SimpleNamespace(img_size=(32, 32)))
    )
    args = SimpleNamespace(model="DiT-XL/2", image_size=256, seed=0)
    name = sample.dits_sample_folder_name
    assert name(args, None, loaded, 1.5) == "DiT-XL-2-pretrained-size-256-vae-ema-cfg-1.5-seed-0"
    ckpt = "results/000-DiT-XL-2/checkpoints/0400000.pt"
    assert name(args, ckpt, loaded, 4) == "DiT-XL-2-0400000-size-256-vae-ema-cfg-4.0-seed-0"
    loaded.codec = SimpleNamespace(name="runs/vae/vae.pt", factor=4)  # a fastdit VAE; non-square latents
    loaded.model.x_embedder.img_size, args.model, args.image_size = (8, 16), None, None
    assert name(args, "run", loaded, 1.0) == "DiT-XL-2-run-size-32x64-vae-vae.pt-cfg-1.0-seed-0"


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
    out = diffusion.p_sample_loop(
        model.forward_with_cfg,
        (4, 1, 8, 8),
        torch.cat([z, z]),
        clip_denoised=True,
        model_kwargs=dict(y=y, cfg_scale=1.5, cfg_channels="all"),
        device="cpu",
    )
    assert torch.equal(ours, out[:2].clamp(-1, 1))


def test_official_checkpoint_needs_model_and_vae(tmp_path):
    path = tmp_path / "DiT-Tiny-64.pt"
    torch.save(
        DiT(input_size=8, in_channels=4, depth=1, hidden_size=32, num_heads=2, num_classes=10).state_dict(), path
    )
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
    assert fastdit.load_model(run, "DiT-Tiny/2", input_size=8, in_channels=1).patch_size == 2  # agreeing: fine
    with pytest.raises(
        fastdit.CheckpointError,
        match=r"contradicts input_size=\(4, 4\) \(it records \(8, 8\)\), model='DiT-S/2' \(it records 'DiT-Tiny/2'\)",
    ):
        fastdit.load_model(run, "DiT-S/2", input_size=4)  # not silently ignored
    official = tmp_path / "official.pt"  # a bare state_dict records no config: name it
    torch.save(fastdit.DiT_models["DiT-Tiny/2"](input_size=4, num_classes=10).state_dict(), official)
    with pytest.raises(fastdit.CheckpointError, match="records no model config"):
        fastdit.load_model(official)
    assert fastdit.load_model(official, "DiT-Tiny/2", input_size=4, num_classes=10).x_embedder.img_size == (4, 4)
    with pytest.raises(
        fastdit.CheckpointError,
        match=r"x_embedder.proj.weight: checkpoint \(128, 4, 2, 2\), model "
        r"\(128, 4, 4, 4\)",
    ):
        fastdit.load_model(official, "DiT-Tiny/4", input_size=4, num_classes=10)


def test_sample_errors(ckpt, tmp_path, capsys):
    assert cli(["sample", "--ckpt", str(tmp_path / "nope.pt")]) == 2
    assert cli(["sample", "--ckpt", ckpt, "--classes", "3,42"]) == 2
    assert cli(["sample-ddp", "--ckpt", ckpt, "--out", str(tmp_path / "x.png")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastdit")]
    assert len(err) == 3 and "does not exist" in err[0] and "[0, 10)" in err[1] and ".npz" in err[2]


def test_a_grid_too_large_to_write_is_refused_before_sampling(ckpt, monkeypatch, capsys):
    monkeypatch.setattr(sample, "generate", None)  # sampling would fail with a traceback
    assert cli(["sample", "--ckpt", ckpt, "--per-class", "100000000000"]) == 2
    assert cli(["sample", "--ckpt", ckpt, "--classes", ",".join(["3"] * 819)]) == 2
    limit = f"a grid image is at most {MAX_GRID_SIDE:,} pixels a side (libjpeg's limit)"
    assert capsys.readouterr().err.splitlines() == [
        f"fastdit sample: error: --per-class 100000000000: at most 818 for 8x8 images: {limit}",
        f"fastdit sample: error: --classes: at most 818 rows of 8x8 images, got 819: {limit}",
    ]


@pytest.mark.parametrize("size", [8, 40], ids=["enlarged", "as-is"])
def test_grid_limits_are_the_largest_grid_written_as_jpeg(size, tmp_path):
    """save_grid at grid_limits' most images a row (and rows), captioned, is written as JPEG; one more is too wide."""
    captions = ["seven", 7]
    rows, per_row = grid_limits(size, size, captions)
    images = torch.rand(max(rows, per_row) + 1, 1, size, size) * 2 - 1

    def save(n, nrow):  # rows of one class each, captioned on their left
        return save_grid(images[:n], tmp_path / "grid.jpg", nrow, [captions[i // nrow % 2] for i in range(n)])

    assert max(Image.open(save(per_row, per_row)).size) <= MAX_GRID_SIDE
    assert max(Image.open(save(rows, 1)).size) <= MAX_GRID_SIDE
    for n, nrow in ((per_row + 1, per_row + 1), (rows + 1, 1)):
        with pytest.raises(OSError):  # libjpeg: "Maximum supported image dimension is 65500 pixels"
            save(n, nrow)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_cuda_graphs_on_cpu_is_a_clear_error(ckpt, capsys):
    assert cli(["sample", "--ckpt", ckpt, "--cuda-graphs", "--steps", "2"]) == 2
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The Sampler: one denoising step on static buffers, built once, reused per batch, CUDA graphs


def sampler_model(device="cpu", **kwargs):
    torch.manual_seed(0)
    model = DiT(
        input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=3, **{"num_classes": 10, **kwargs}
    )
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero's zeros would make every step trivial
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(device).eval()


def dit_loop(model, sampler_name, steps, z, y, cfg_scale):
    """DiT's sample.py by hand: [z, z] with the null class, p_sample_loop / ddim_sample_loop of forward_with_cfg
    (cfg_scale None: of forward, on z alone; y None: an unconditional model)."""
    diffusion = sample.sampling_diffusion(sampler_name, steps, learn_sigma=model.learn_sigma)
    loop = diffusion.ddim_sample_loop if sampler_name == "ddim" else diffusion.p_sample_loop
    if cfg_scale is None:
        fn, kwargs = model.forward, dict(y=y)
    else:
        z, y = torch.cat([z, z]), torch.cat([y, torch.full_like(y, 10)])
        fn, kwargs = model.forward_with_cfg, dict(y=y, cfg_scale=cfg_scale)
    out = loop(fn, z.shape, z, clip_denoised=False, model_kwargs=kwargs, device=z.device)
    return out[: len(z) // 2] if cfg_scale is not None else out


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_sampler_reused_per_batch_equals_dits_loop(name):
    """Two batches through one Sampler (one set of static buffers), then a smaller last batch (buffers of
    its own shape): each equals DiT's loop from the same seed."""
    model = sampler_model()
    run = sample.Sampler(model, cfg_scale=3.0, sampler=name, steps=3, clip_denoised=False)
    for seed, n in ((1, 3), (2, 3), (3, 1)):
        z, y = torch.randn(n, 4, 8, 8), torch.randint(0, 10, (n,))
        torch.manual_seed(seed)
        ours = run(y, z=z)
        torch.manual_seed(seed)
        assert torch.equal(ours, dit_loop(model, name, 3, z, y, 3.0))
    assert sorted(key[0][0] for key in run.loops) == [2, 6]  # one loop per batch shape (CFG doubles it)


@pytest.mark.parametrize(
    "name, model_kwargs",
    [("ddpm", dict(learn_sigma=False)), ("ddim", dict(num_classes=0))],
    ids=["fixed-sigma", "unconditional"],
)
def test_unguided_sampler_equals_dits_loop(name, model_kwargs):
    """Without CFG: a model with fixed variances (learn_sigma=False), and an unconditional one (num_classes=0)."""
    model = sampler_model(**model_kwargs)
    run = sample.Sampler(model, cfg_scale=1.0, sampler=name, steps=3, clip_denoised=False)
    z = torch.randn(3, 4, 8, 8)
    y = torch.randint(0, 10, (3,)) if model.num_classes else None
    torch.manual_seed(5)
    ours = run(y if y is not None else len(z), z=z)
    torch.manual_seed(5)
    assert torch.equal(ours, dit_loop(model, name, 3, z, y, None))


def test_denoising_loop_never_reads_the_device(checks_as_on_a_gpu):
    """What a CUDA graph captures must not synchronise with the host: the whole sampling loop after a first
    batch (as the capture follows warm-up steps, which build the diffusion's device tables), checked on the CPU."""
    model = sampler_model()
    run = sample.Sampler(model, cfg_scale=3.0, steps=3, clip_denoised=False)
    z, y = torch.randn(2, 4, 8, 8), torch.randint(0, 10, (2,))
    run(y, z=z)
    with SyncTrap() as trap:
        run(y, z=z)
    trap.check()


def test_gemm_weights_cast_once_give_the_same_samples():
    """bf16 sampling with the GEMM weights stored in bf16 = autocast casting the fp32 weights at every step."""
    model = sampler_model()
    z, y = torch.randn(2, 4, 8, 8), torch.randint(0, 10, (2,))
    outs = []
    for m in (model, sample.cast_gemm_weights(sampler_model(), torch.bfloat16)):
        torch.manual_seed(3)
        outs.append(sample.Sampler(m, cfg_scale=3.0, steps=2, clip_denoised=False, precision="bf16")(y, z=z))
    assert (
        model.blocks[0].mlp.fc1.weight.dtype == torch.float32
        and model.y_embedder.embedding_table.weight.dtype == torch.float32
    )
    assert torch.equal(outs[0], outs[1])


def test_sample_ddp_compiles_once_for_all_batches(ckpt, tmp_path, monkeypatch):
    compiled = []

    def fake_compile(fn, **kwargs):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    assert (
        cli(
            [
                "sample-ddp",
                "--ckpt",
                ckpt,
                "--num-samples",
                "6",
                "--per-proc-batch-size",
                "2",
                "--steps",
                "2",
                "--compile",
                "--out",
                str(tmp_path / "s.npz"),
            ]
        )
        == 0
    )
    assert len(compiled) == 1  # 3 batches, one compilation


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_cuda_graph_replay_equals_eager_steps(name):
    """The captured denoising step replayed for every step and for a second batch of the same shape gives
    the samples of the eager step (and of DiT's loop); one capture in all."""
    model = sampler_model("cuda")
    graphs = sample.Sampler(model, cfg_scale=3.0, sampler=name, steps=5, clip_denoised=False, precision="bf16")
    eager = sample.Sampler(
        model, cfg_scale=3.0, sampler=name, steps=5, clip_denoised=False, precision="bf16", cuda_graphs=False
    )
    assert graphs.cuda_graphs
    for seed in (1, 2):
        z, y = torch.randn(3, 4, 8, 8, device="cuda"), torch.randint(0, 10, (3,), device="cuda")
        results = []
        for run in (graphs, eager):
            torch.manual_seed(seed)
            results.append(run(y, z=z))
        torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)
    assert len(graphs.loops) == 1 and all(loop.graph is not None for loop in graphs.loops.values())


# ----------------------------------------------------------------------------------------------
# DiT's pretrained checkpoints (fastdit.pretrained): found, or downloaded once, as DiT's scripts do


@pytest.fixture
def fake_pretrained(tmp_path, monkeypatch):
    """A working directory whose pretrained models are a tiny 'DiT-Tiny-2-32x32.pt', and a stand-in for
    the download (offline): it writes that official-format state dict and records each URL it fetches."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pretrained, "PRETRAINED", {"DiT-Tiny-2-32x32.pt": ("DiT-Tiny/2", 32)})
    urls = []

    def download(url, dst, progress=True):
        urls.append(url)
        torch.save(fastdit.DiT_models["DiT-Tiny/2"](input_size=4).state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    return urls


def test_sample_without_ckpt_downloads_the_pretrained_model_once(fake_pretrained, sd_vae, tmp_path):
    args = ["--model", "DiT-Tiny/2", "--image-size", "32", "--vae", sd_vae, "--steps", "2"]
    grid = ["--classes", "1,2", "--per-class", "1"]
    assert cli(["sample", *args, *grid, "--out", str(tmp_path / "a.png")]) == 0
    assert fake_pretrained == ["https://dl.fbaipublicfiles.com/DiT/models/DiT-Tiny-2-32x32.pt"]
    assert (tmp_path / "pretrained_models" / "DiT-Tiny-2-32x32.pt").is_file()
    # again, and by its name (with the model and size it implies): the file already there, no download
    assert cli(["sample", *args, *grid, "--out", str(tmp_path / "b.png")]) == 0
    assert cli(["sample-ddp", "--ckpt", "DiT-Tiny-2-32x32.pt", "--vae", sd_vae, "--steps", "2",
                "--num-fid-samples", "2", "--per-proc-batch-size", "2", "--out", str(tmp_path / "c.npz")]) == 0  # fmt: skip
    assert fastdit.load_model("DiT-Tiny-2-32x32.pt").x_embedder.img_size == (4, 4)  # the model its name implies
    assert len(fake_pretrained) == 1
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    assert np.load(tmp_path / "c.npz")["arr_0"].shape[0] == 2


def test_pretrained_defaults_follow_dits_scripts(fake_pretrained, monkeypatch):
    monkeypatch.setattr(pretrained, "PRETRAINED", {"DiT-XL-2-256x256.pt": ("DiT-XL/2", 256)})
    one = type("Dist", (), {"local_rank": 0, "barrier": lambda self: None})()
    args = build_parser().parse_args(["sample"])  # no --ckpt: DiT-XL/2 at 256, sample.py's VAE
    sample.use_pretrained(args, one, default_vae="mse")
    assert (args.ckpt, args.model, args.image_size, args.vae) == (
        str(Path("pretrained_models", "DiT-XL-2-256x256.pt")), "DiT-XL/2", 256, "mse"
    )  # fmt: skip
    assert fake_pretrained == ["https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"]


def test_pretrained_errors(fake_pretrained, monkeypatch, tmp_path, capsys):
    assert cli(["sample", "--model", "DiT-S/2"]) == 2  # no pretrained DiT-S/2
    assert cli(["sample", "--ckpt", "DiT-Tiny-2-32x32.pt", "--image-size", "64"]) == 2
    assert fake_pretrained == []

    def offline(url, dst, progress=True):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert cli(["sample", "--model", "DiT-Tiny/2", "--image-size", "32"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastdit")]
    assert "there is none for DiT-S/2 at --image-size 256: give --ckpt" in err[0]
    assert "--image-size 64 contradicts DiT-Tiny-2-32x32.pt, DiT's pretrained DiT-Tiny/2 at 32" in err[1]
    assert "could not download https://dl.fbaipublicfiles.com/DiT/models/DiT-Tiny-2-32x32.pt" in err[2]
    assert "put the file at pretrained_models/DiT-Tiny-2-32x32.pt yourself" in err[2]
    assert not (tmp_path / "pretrained_models").exists()  # nothing half-written left behind


def test_dits_flag_names_are_accepted():
    parse = build_parser().parse_args
    args = parse(["sample-ddp", "--num-sampling-steps", "7", "--global-seed", "3", "--num-fid-samples", "9"])
    assert (args.steps, args.seed, args.num_samples) == (7, 3, 9)
    args = parse(["train", "--global-seed", "5"])  # train's --data-path and --results-dir: tests/test_train.py
    assert args.seed == 5


def test_sampling_runs_tf32_as_dits_scripts_unless_told(ckpt, tmp_path, monkeypatch):
    used = []

    @contextlib.contextmanager
    def tf32(enabled, device):
        used.append((enabled, str(device)))
        yield

    monkeypatch.setattr(sample, "tf32", tf32)
    args = ["--ckpt", ckpt, "--steps", "2"]
    assert cli(["sample", *args, "--classes", "1", "--per-class", "1", "--out", str(tmp_path / "a.png")]) == 0
    assert cli(["sample-ddp", *args, "--num-samples", "2", "--no-tf32", "--out", str(tmp_path / "a.npz")]) == 0
    assert used == [(True, "cpu"), (False, "cpu")]
