"""fastdit.load_checkpoint: official, DiT train.py and wrapped checkpoints, safely, with clear errors."""

import argparse
import collections
import os
import pickle
import random

import pytest
import torch
from safetensors.torch import save_file

from fastdit import CheckpointError, DiT, cli, load_checkpoint
from fastdit.reference_model import ReferenceDiT


def small(cls=DiT, **kw):
    return cls(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10, **kw)


@pytest.fixture
def weights():
    torch.manual_seed(5)
    sd = small(ReferenceDiT).state_dict()
    return {k: v + 0.01 * torch.randn_like(v) for k, v in sd.items()}  # nothing left at its init value


def assert_loaded(model, sd):
    own = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k], v), k


def test_official_release_format_loads_strictly(tmp_path, weights):
    path = tmp_path / "DiT-S-2.pt"
    torch.save(weights, path)
    model = load_checkpoint(str(path), small())
    assert_loaded(model, weights)


def test_dit_train_checkpoint_prefers_ema(tmp_path, weights):
    model_sd = {k: v + 1 for k, v in weights.items()}
    opt = torch.optim.AdamW(small().parameters()).state_dict()
    args = argparse.Namespace(model="DiT-S/2", image_size=256, global_batch_size=256)
    path = tmp_path / "0050000.pt"
    torch.save({"model": model_sd, "ema": weights, "opt": opt, "args": args}, path)
    assert_loaded(load_checkpoint(str(path), small()), weights)
    assert_loaded(load_checkpoint(str(path), small(), key="model"), model_sd)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped(tmp_path, weights, prefix):
    path = tmp_path / "wrapped.pt"
    torch.save({"ema": collections.OrderedDict((prefix + k, v) for k, v in weights.items())}, path)
    assert_loaded(load_checkpoint(str(path), small()), weights)


def test_safetensors(tmp_path, weights):
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    assert_loaded(load_checkpoint(str(path), small()), weights)


def test_returns_state_dict_without_model(tmp_path, weights):
    path = tmp_path / "w.pt"
    torch.save(weights, path)
    sd = load_checkpoint(str(path))
    assert sorted(sd) == sorted(weights)


class Payload:  # an object a malicious pickle could carry
    def __reduce__(self):
        return (print, ("executed",))


class BlockedPayload:  # a global from a module torch's unpickler blocks outright (its error is worded otherwise)
    def __reduce__(self):
        return (os.getpid, ())


@pytest.mark.parametrize("payload", [Payload, BlockedPayload])
def test_arbitrary_pickles_are_refused(tmp_path, weights, capsys, payload):
    path = tmp_path / "evil.pt"
    torch.save({"ema": weights, "extra": payload()}, path)
    with pytest.raises(CheckpointError, match="contains pickled objects .* trusted=True"):
        load_checkpoint(str(path), small())
    assert "executed" not in capsys.readouterr().out


@pytest.mark.parametrize("bad", [{0: 1.0}, {"ema": {"a": {"b": 1}}}], ids=["int_keys", "nested"])
def test_weights_that_are_no_name_to_tensor_mapping(tmp_path, bad):
    path = tmp_path / "w.pt"
    torch.save({k: torch.full((1,), v) if isinstance(v, float) else v for k, v in bad.items()}, path)
    with pytest.raises(CheckpointError, match=r"(its weights|the weights under 'ema') are not a mapping of names"):
        load_checkpoint(str(path), small())


NOT_CHECKPOINTS = {
    "random": random.Random(0).randbytes(4096),
    "text": b"this is not a checkpoint at all" * 10,
    "empty": b"",
    "pickle": pickle.dumps({"ema": [1, 2]}),  # a plain pickle, not a torch.save file
    "pickle_like": b"\x80\x02" + bytes(range(100)),
}


@pytest.mark.parametrize("kind", sorted(NOT_CHECKPOINTS))
def test_not_a_checkpoint(tmp_path, kind):
    path = tmp_path / "random.pt"
    path.write_bytes(NOT_CHECKPOINTS[kind])
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as info:
        load_checkpoint(str(path), small())
    assert "trusted" not in str(info.value)


def test_cli_reports_random_bytes_as_not_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "random.pt"
    path.write_bytes(NOT_CHECKPOINTS["random"])
    assert cli.main(["sample", "--ckpt", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not a PyTorch checkpoint" in err and "trusted" not in err, err


def test_legacy_format_loads(tmp_path, weights):
    path = tmp_path / "legacy.pt"
    torch.save(weights, path, _use_new_zipfile_serialization=False)
    assert_loaded(load_checkpoint(str(path), small()), weights)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=str)
def test_integer_or_bool_weights_are_refused(tmp_path, weights, dtype):
    path = tmp_path / "w.pt"
    torch.save(dict(weights, **{"final_layer.linear.bias": weights["final_layer.linear.bias"].to(dtype)}), path)
    with pytest.raises(CheckpointError, match=rf"floating-point tensors, but not final_layer.linear.bias \({dtype}\)"):
        load_checkpoint(str(path), small())


def test_truncated_file(tmp_path, weights):
    path = tmp_path / "truncated.pt"
    torch.save(weights, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(str(path), small())


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(str(path), small())


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(str(tmp_path / "nope.pt"), small())
    with pytest.raises(TypeError, match=r"model must be the torch.nn.Module .* got str 'DiT-S/2' \(fastdit.load_model"):
        load_checkpoint(str(tmp_path / "nope.pt"), "DiT-S/2")  # a name is load_model's


def test_wrong_model_size_names_the_mismatch(tmp_path, weights):
    path = tmp_path / "w.pt"
    torch.save(weights, path)
    bigger = DiT(input_size=16, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    with pytest.raises(CheckpointError, match=r"pos_embed: checkpoint \(1, 16, 32\), model \(1, 64, 32\)"):
        load_checkpoint(str(path), bigger)


def test_missing_and_unexpected_keys(tmp_path, weights):
    path = tmp_path / "w.pt"
    partial = dict(weights)
    partial.pop("final_layer.linear.bias")
    partial["extra.weight"] = torch.zeros(1)
    torch.save(partial, path)
    with pytest.raises(CheckpointError, match="missing from the checkpoint: final_layer.linear.bias"):
        load_checkpoint(str(path), small())
    with pytest.raises(CheckpointError, match="not in the model: extra.weight"):
        load_checkpoint(str(path), small())


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="not a state_dict"):
        load_checkpoint(str(path))
    torch.save({"step": 3, "config": {"a": 1}}, path)
    with pytest.raises(CheckpointError, match="neither a state_dict"):
        load_checkpoint(str(path))
