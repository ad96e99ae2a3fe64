"""The SD-VAE path through diffusers' AutoencoderKL (a tiny one with random weights, saved with save_pretrained):
hub names offline, `fastdit latents` of an image folder (manifest, ADM crop, flips, chunks, resume after a crash,
shards), and README's ImageNet recipe (latents -> train --latents with FID in the loop -> sample-ddp -> fid) at toy
size, whose sampling decodes with the same VAE."""

import json
import math
import shlex
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from _train_helpers import another_process_holding, one_thread  # noqa: F401 (an autouse fixture)
from _vae_helpers import rgb_folder, save_tiny_sd_vae, sd_vae  # noqa: F401 (fixtures)
from PIL import Image
from test_fid import needs_inception, random_inception_weights
from test_vae import offline_hub

from fastdit import fid, latents, vae
from fastdit._util import UsageError
from fastdit.cli import main as cli
from fastdit.data import read_image

SHA = "0123456789abcdef0123456789abcdef01234567"


def latents_argv(vae_name, folder, out, *extra):
    """README's ImageNet command at toy size: 16x16 images, 3 images a chunk."""
    return [
        "latents",
        "--vae",
        str(vae_name),
        "--data",
        str(folder),
        "--image-size",
        "16",
        "--chunk-size",
        "3",
        "--batch-size",
        "2",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def encoded(sd_vae, rgb_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("lat") / "latents"
    assert cli(latents_argv(sd_vae, rgb_folder, out)) == 0
    return out


def chunks_of(out):
    from safetensors.torch import load_file

    return {p.name: load_file(str(p)) for p in sorted(out.glob("chunk-*.safetensors"))}


def assert_same_latents(a, b):
    ca, cb = chunks_of(a), chunks_of(b)
    assert ca.keys() == cb.keys()
    for name in ca:
        for key in ca[name]:
            assert torch.equal(ca[name][key], cb[name][key]), (name, key)


def test_hub_names_load_from_the_local_cache_with_their_revision(sd_vae, tmp_path, monkeypatch):
    """`--vae owner/name` as on an offline GPU node whose hub cache holds the model: the record names the hub id,
    the commit and the weights' fingerprint (the same as the local folder's)."""
    repo = tmp_path / "hub" / "models--fake--sd-vae"
    shutil.copytree(sd_vae, repo / "snapshots" / SHA)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    offline_hub(monkeypatch, tmp_path / "hub")
    codec = vae.load_vae("fake/sd-vae")
    local = vae.load_vae(sd_vae)
    assert (codec.name, codec.revision, codec.kind) == ("fake/sd-vae", SHA, "diffusers")
    assert codec.fingerprint == local.fingerprint and local.revision is None and codec.scale_factor == 0.18215
    assert vae.load_vae_record(codec.describe(), name=sd_vae).fingerprint == codec.fingerprint  # a local copy decodes
    with pytest.raises(UsageError, match="--vae fake/other: cannot get it from the Hugging Face hub"):
        vae.load_vae("fake/other")


def test_latents_folder_manifest_and_values(encoded, sd_vae, rgb_folder, tmp_path):
    ds = latents.LatentsDataset(encoded)
    m = ds.meta
    codec = vae.load_vae(sd_vae)
    assert m["vae"] == codec.describe() and m["vae"]["revision"] is None and m["scale_factor"] == 0.18215
    assert (m["crop"], m["image_size"], m["flips"], m["count"], m["classes"]) == (
        "adm-center-crop",
        16,
        True,
        7,
        ["a", "b"],
    )
    assert m["latent_shape"] == [4, 8, 8] and [c["count"] for c in m["chunks"]] == [3, 3, 1] and m["complete"]
    assert len(ds) == 7 and ds.flip and (ds.channels, ds.image_size, ds.num_classes) == (4, 8, 2)
    files = sorted(rgb_folder.rglob("*.png"))
    x = torch.stack([read_image(f, 16, 3) for f in files])  # the ADM center crop, [-1, 1]
    # By default one posterior sample per image, as DiT's train.py draws: standard normal noise about the mean.
    with torch.no_grad():
        mean, std = (t.float() for t in codec._posterior(x))
    z = torch.stack([ds[(i, False)][0] for i in range(len(ds))])
    noise = (z / m["scale_factor"] - mean) / std
    assert m["latent"] == "sample" and 0.8 < noise.std() < 1.2 and noise.mean().abs() < 0.1
    # --latent mean stores the posterior mean, of the image and of its mirror image
    out = tmp_path / "mean"
    assert cli(latents_argv(sd_vae, rgb_folder, out, "--latent", "mean")) == 0
    ds = latents.LatentsDataset(out)
    want = codec.encode(x, sample=False)
    flipped = codec.encode(x.flip(-1), sample=False)
    for i in (0, 4, 6):
        z, label = ds[(i, False)]
        assert torch.allclose(z, want[i], atol=1e-5) and label == (0 if i < 4 else 1)
        assert torch.allclose(ds[(i, True)][0], flipped[i], atol=1e-5)


def test_latents_resume_after_a_crash_and_shard_over_ranks(encoded, sd_vae, rgb_folder, tmp_path, monkeypatch):
    out = tmp_path / "crashed"
    write = latents._write_chunk
    written = []

    def crash_after_two(*args):
        if len(written) == 2:
            raise KeyboardInterrupt  # the process dies with 2 of 3 chunks on disk
        write(*args)
        written.append(args[1])

    monkeypatch.setattr(latents, "_write_chunk", crash_after_two)
    assert cli(latents_argv(sd_vae, rgb_folder, out)) == 130  # interrupted: the command reports it, exit code 130
    with pytest.raises(UsageError, match="is incomplete .* rerun the same command"):
        latents.LatentsDataset(out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("chunk-*")}
    assert len(before) == 2
    monkeypatch.setattr(latents, "_write_chunk", write)
    stale = out / ".chunk-000002.safetensors.k1ll3d00.tmp"  # what a SIGKILL during a chunk's write leaves
    stale.write_bytes(b"half a chunk")
    assert cli(latents_argv(sd_vae, rgb_folder, out)) == 0  # the same command finishes the missing chunk
    assert not stale.exists()
    assert all(out.joinpath(name).stat().st_mtime_ns == t for name, t in before.items())  # not encoded again
    assert_same_latents(out, encoded)
    assert json.loads((out / "manifest.json").read_text()) == json.loads((encoded / "manifest.json").read_text())

    assert cli(latents_argv(sd_vae, rgb_folder, out, "--flips", "none")) == 2  # other settings: refused

    # Two ranks (as under torchrun) each encode their chunks (c = rank mod 2); rank 0 then completes the manifest.
    sharded = tmp_path / "sharded"
    codec = vae.load_vae(sd_vae)
    argv = latents_argv(sd_vae, rgb_folder, sharded)
    from fastdit.cli import build_parser

    args = build_parser().parse_args(argv)
    dataset = latents.build_dataset(str(rgb_folder), 16, channels=3)
    settings = latents.plan(dataset, codec, args, "both")
    latents._start(sharded, settings)
    assert latents.encode_chunks(dataset, codec, sharded, settings, rank=1, world_size=2, batch_size=2) == [1]
    assert latents.encode_chunks(dataset, codec, sharded, settings, rank=0, world_size=2, batch_size=2) == [0, 2]
    latents.finish(sharded, settings)
    assert_same_latents(sharded, encoded)


def test_a_second_run_of_the_same_folder_is_refused(encoded, sd_vae, rgb_folder, tmp_path, monkeypatch, capsys):
    """While a run writes DIR (here: one killed after its first chunk, with a chunk's write in flight), the same
    command is refused, one line, the first one's files untouched; the holder killed, it finishes DIR."""
    out, write = tmp_path / "lat", latents._write_chunk

    def write_then_crash(*args):
        write(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(latents, "_write_chunk", write_then_crash)
    assert cli(latents_argv(sd_vae, rgb_folder, out)) == 130
    monkeypatch.setattr(latents, "_write_chunk", write)
    in_flight = out / ".chunk-000001.safetensors.a1b2c3d4.tmp"  # the running command's write, not yet renamed
    in_flight.write_bytes(b"half a chunk")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    with another_process_holding(out / ".lock-rank00000"):
        assert cli(latents_argv(sd_vae, rgb_folder, out)) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"fastdit latents: error: {out}: another fastdit process is writing it (it holds {out}/.lock-rank00000); "
        f"wait for it to end, or stop it, then run the command again"
    ]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in before} == before
    assert cli(latents_argv(sd_vae, rgb_folder, out)) == 0
    assert not in_flight.exists() and not (out / ".lock-rank00000").exists()
    assert_same_latents(out, encoded)


def test_latents_skip_unreadable_images_and_list_them(sd_vae, rgb_folder, tmp_path, capfd):
    folder = tmp_path / "imgs"
    shutil.copytree(rgb_folder, folder)
    (folder / "b" / "1x.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "lat"
    assert cli(latents_argv(sd_vae, folder, out)) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["count"] == 7 and m["source_items"] == 8 and len(m["skipped"]) == 1 and "1x.png" in m["skipped"][0]
    assert "skipped an unreadable image (1 so far)" in capfd.readouterr().err
    labels = [latents.LatentsDataset(out)[(i, False)][1] for i in range(7)]
    assert labels == [0, 0, 0, 0, 1, 1, 1] and m["class_counts"] == [4, 3]


def test_a_damaged_latents_folder_is_named_before_any_work(encoded, sd_vae, rgb_folder, tmp_path, capsys):
    """A chunk cut short or of other shapes than its manifest says, a manifest that is no JSON: one line naming the
    file, when the folder is opened (not a traceback from a data loader mid-training)."""
    from safetensors.torch import load_file, save_file

    chunk = "chunk-000001.safetensors"

    def damaged(name, damage):
        shutil.copytree(encoded, tmp_path / name)
        damage(tmp_path / name)
        return tmp_path / name

    def one_channel(folder):
        tensors = {k: v[:, :1].contiguous() if v.dim() == 4 else v for k, v in load_file(str(folder / chunk)).items()}
        save_file(tensors, str(folder / chunk), metadata=dict(unreadable="[]"))

    for folder, message in [
        (damaged("cut", lambda f: (f / chunk).write_bytes((f / chunk).read_bytes()[:-8])), "is not a readable"),
        (damaged("shapes", one_channel), r"does not match the manifest: latents \[3, 1, 8, 8\] \(manifest: \[3, 4,"),
    ]:
        with pytest.raises(UsageError, match=f"chunk file {chunk} {message}"):
            latents.LatentsDataset(folder)
    no_json = damaged("no-json", lambda f: (f / "manifest.json").write_text("{"))
    assert cli(latents_argv(sd_vae, rgb_folder, no_json)) == 2  # resuming into it
    assert "manifest.json is not a fastdit latents manifest (Expecting" in capsys.readouterr().err


def test_a_class_with_no_readable_image_is_named_and_not_trained_on(sd_vae, rgb_folder, tmp_path, capfd):
    """Every image of class c unreadable: `fastdit latents` says so; class-conditional training refuses the latents."""
    folder = tmp_path / "imgs"
    shutil.copytree(rgb_folder, folder)
    (folder / "c").mkdir()
    (folder / "c" / "0.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "lat"
    assert cli(latents_argv(sd_vae, folder, out)) == 0
    assert json.loads((out / "manifest.json").read_text())["class_counts"] == [4, 3, 0]
    assert "no image of class 'c' was readable" in capfd.readouterr().err
    assert cli(["train", "--latents", str(out), "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    err = capfd.readouterr().err
    assert "class 'c' holds no latents" in err and "--num-classes 0" in err and not (tmp_path / "run").exists()


ROOT = Path(__file__).resolve().parent.parent


def readme_imagenet_commands():
    """The commands of README's ImageNet recipe, as argv lists for `fastdit` (torchrun's launcher dropped)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("### ImageNet", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.strip().splitlines():
        argv = shlex.split(line)
        if argv[0] == "torchrun":
            argv = argv[argv.index("fastdit.cli") + 1 :]
        else:
            assert argv[0] == "fastdit", line
            argv = argv[1:]
        commands.append(argv)
    return commands


def toy(argv, values, extra):
    """argv with its option values swapped for toy ones (values: {option: toy value}) and `extra` options added."""
    out = list(argv)
    for i, a in enumerate(out[:-1]):
        if a in values:
            out[i + 1] = values[a]
    return out + extra.get(out[0], [])


@pytest.fixture(scope="module")
def recipe(sd_vae, rgb_folder, tmp_path_factory):
    """README's ImageNet recipe run at toy size in a fresh folder: latents -> train (FID in the loop) -> sample-ddp -> fid."""
    import os

    work = tmp_path_factory.mktemp("recipe")
    weights = random_inception_weights(work / "inception.pt")
    rng = np.random.default_rng(0)
    # ADM's reference-batch format: images and pool_3 / spatial statistics (63-d spatial: Inception at 75x75 here)
    np.savez(
        work / "VIRTUAL_imagenet256_labeled.npz",
        arr_0=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8),
        mu=np.zeros(2048),
        sigma=np.eye(2048) * 1e-2,
        mu_s=np.zeros(63),
        sigma_s=np.eye(63) * 1e-2,
    )
    values = {
        "--vae": sd_vae,
        "--data": str(rgb_folder),
        "--image-size": "16",
        "--batch-size": "2",
        "--num-workers": "0",
        "--model": "DiT-Tiny/2",
        "--fid-every": "2",
        "--fid-samples": "4",
        "--num-samples": "4",
        "--ckpt": "runs/in256-xl2/checkpoints/0000002.pt",
    }
    extra = {
        "latents": ["--chunk-size", "3"],
        "train": ["--steps", "2", "--global-batch-size", "4", "--sample-steps", "2"],
        "sample-ddp": ["--steps", "2", "--per-proc-batch-size", "4"],
    }
    commands = [toy(argv, values, extra) for argv in readme_imagenet_commands()]
    assert [c[0] for c in commands] == ["latents", "train", "sample-ddp", "fid"]
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with (
            mock.patch.dict(os.environ, {fid.INCEPTION_ENV: weights}),
            mock.patch.object(fid.inception_class(), "INPUT_IMAGE_SIZE", 75),
        ):
            for argv in commands:
                assert cli(argv) == 0, argv
    finally:
        os.chdir(cwd)
    return work


@needs_inception
def test_readme_imagenet_recipe_at_toy_size(recipe):
    manifest = json.loads((recipe / "latents" / "in256" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["count"] == 7 and manifest["precision"] == "bf16"
    ckpt = torch.load(recipe / "runs" / "in256-xl2" / "checkpoints" / "0000002.pt", weights_only=True)
    assert ckpt["vae"] == manifest["vae"] and ckpt["model_config"]["input_size"] == [8, 8]
    assert ckpt["model_config"]["in_channels"] == 4 and ckpt["args"]["precision"] == "bf16"
    fids = [json.loads(line) for line in open(recipe / "runs" / "in256-xl2" / "metrics.jsonl")]
    assert [r["step"] for r in fids if r.get("event") == "fid"] == [2]
    arr = np.load(recipe / "samples" / "in256-xl2.npz")["arr_0"]
    assert arr.shape == (4, 16, 16, 3) and arr.dtype == np.uint8  # decoded 16x16 RGB, not 8x8 latents
    results = json.loads((recipe / "samples" / "in256-xl2-fid.json").read_text())
    assert all(math.isfinite(results[m]) for m in fid.METRICS) and results["num_samples"] == 4


@needs_inception
def test_sampling_decodes_with_the_vae_of_the_latents_only(recipe, encoded, sd_vae, rgb_folder, tmp_path, capsys):
    ckpt = str(recipe / "runs" / "in256-xl2" / "checkpoints" / "0000002.pt")
    png = tmp_path / "grid.png"
    assert cli(["sample", "--ckpt", ckpt, "--steps", "2", "--per-class", "1", "--vae", sd_vae, "--out", str(png)]) == 0
    assert Image.open(png).mode == "RGB"  # a local copy of the same VAE decodes
    # Errors: a latent shape the model does not take, and another VAE than the latents were encoded with.
    other = save_tiny_sd_vae(tmp_path / "other-vae", seed=1)
    other_latents = tmp_path / "other-latents"  # the same shapes as `encoded`, in another latent space
    assert cli(latents_argv(other, rgb_folder, other_latents)) == 0
    capsys.readouterr()
    for argv, message in [
        (["train", "--latents", str(encoded), "--image-size", "32"], "--image-size 32: "),
        (
            ["train", "--latents", str(encoded), "--vae", other, "--steps", "1"],
            "VAE mismatch: the latents were encoded",
        ),
        (["sample", "--ckpt", ckpt, "--vae", other, "--out", str(png)], "VAE mismatch"),
        (["train", "--latents", str(other_latents), "--resume", ckpt], "the run's data was encoded with"),
        (["train", "--latents", str(encoded / "manifest.json")], "is a file, not a folder"),
        (["latents", "--vae", sd_vae, "--out", str(tmp_path / "digits")], "the digits have 1 channel, not the 3"),
    ]:
        assert cli(argv) == 2, argv
        assert message in capsys.readouterr().err
