"""Loading DiT weights from untrusted files: official releases, DiT train.py and fastdit checkpoints.

A checkpoint file is untrusted input. `.pt`/`.pth` files are read with
`torch.load(weights_only=True)`, which unpickles tensors and plain containers only, plus the
allow-listed argparse.Namespace that DiT's train.py stores under "args"; `.safetensors` files
hold tensors only. Arbitrary pickled objects are refused unless the caller passes trusted=True.
A file that is no torch.save file (zip or legacy format) is reported as not a PyTorch
checkpoint, and weights that are not floating-point tensors are refused (load_state_dict would
cast them silently).
"""

import argparse
import os
import pickle
import tarfile

import torch

# Keys under which training scripts store weights, in order of preference: EMA weights are
# the ones DiT samples with.
WEIGHT_KEYS = ("ema", "model", "state_dict", "model_state_dict")
PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


# How torch.save files begin: a zip archive (torch >= 1.6), or the legacy format's pickled magic
# number (any pickle protocol); torch.load also reads the tar archives of torch < 0.1.10.
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
_LEGACY_HEADERS = tuple(
    pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1)
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


def _is_torch_file(path):
    with open(path, "rb") as f:
        head = f.read(max(map(len, _LEGACY_HEADERS)))
    return head.startswith(_ZIP_SIGNATURES + _LEGACY_HEADERS) or tarfile.is_tarfile(path)


def read_checkpoint(path, map_location="cpu", trusted=False):
    """The object stored in a checkpoint file, read safely (see the module docstring).

    Raises FileNotFoundError for a missing file and CheckpointError for one that cannot be read.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a valid .safetensors file ({e})") from e
    if not _is_torch_file(path):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch.save file nor .safetensors)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=not trusted)
    except Exception as e:  # a corrupt file fails anywhere in the unpickler, with any error type
        # torch words it "Unsupported global: GLOBAL m.f", or "unsupported GLOBAL m.f whose module m is blocked"
        if isinstance(e, pickle.UnpicklingError) and "unsupported global" in str(e).lower():
            raise CheckpointError(
                f"{path} contains pickled objects beyond tensors and plain containers, which are not loaded "
                f"from untrusted files (from Python, read_checkpoint or load_checkpoint with trusted=True loads "
                f"a file you trust). ({_first_line(e)})"
            ) from e
        raise CheckpointError(
            f"{path}: a corrupt or truncated checkpoint, or one torch.load(weights_only=True) cannot read "
            f"({type(e).__name__}: {_first_line(e)})"
        ) from e


def _first_line(error):
    """The gist of torch.load's error: the line naming what the weights-only unpickler does not
    support (a global, an opcode), else the first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "unsupported " in line.lower()), lines[0] if lines else "")


def extract_state_dict(obj, key=None, source="checkpoint"):
    """The model state_dict inside a loaded checkpoint object, with wrapper prefixes removed.

    obj: a state_dict, or a training checkpoint dict holding one under `key` (default: the
    first of "ema", "model", "state_dict", "model_state_dict" present).
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state_dict or a checkpoint dict")
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"{source} has no key {key!r}; its keys are {sorted(map(str, obj))[:20]}")
        sd = obj[key]
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        found = [k for k in WEIGHT_KEYS if isinstance(obj.get(k), dict)]
        if not found:
            raise CheckpointError(
                f"{source} is neither a state_dict (name -> tensor) nor a training checkpoint with one of "
                f"the keys {WEIGHT_KEYS}; its keys are {sorted(map(str, obj))[:20]}"
            )
        key = found[0]
        sd = obj[key]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        where = f"the weights under {key!r}" if key is not None else "its weights"
        raise CheckpointError(f"{source}: {where} are not a mapping of names (str) to tensors")
    # load_state_dict would cast integer or bool tensors into the float parameters without a word.
    not_float = [f"{k} ({v.dtype})" for k, v in sd.items() if not v.is_floating_point()]
    if not_float:
        raise CheckpointError(f"{source}: DiT weights are floating-point tensors, but not {_some(not_float)}")
    return {_strip_prefixes(k): v for k, v in sd.items()}


def _strip_prefixes(name):
    stripped = True
    while stripped:
        stripped = False
        for p in PREFIXES:
            if name.startswith(p):
                name, stripped = name[len(p) :], True
    return name


def load_checkpoint(path, model=None, key=None, strict=True, map_location="cpu", trusted=False):
    """Read DiT weights from `path`; load them into `model` if given.

    Accepts an official DiT release (a bare state_dict), a DiT train.py checkpoint
    ({"model", "ema", "opt", "args"}: the EMA weights are preferred), a fastdit checkpoint,
    a `.safetensors` file, and keys prefixed by "module." or "_orig_mod.".

    Returns the state_dict, or `model` when one is given. Raises FileNotFoundError for a missing
    file and CheckpointError (a ValueError) for an unreadable one or one that does not fit.
    """
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model must be the torch.nn.Module to load the weights into, got {type(model).__name__} {model!r} "
            f"(fastdit.load_model(path, name) builds a model by its name)"
        )
    sd = extract_state_dict(read_checkpoint(path, map_location, trusted), key=key, source=str(path))
    if model is None:
        return sd
    return load_weights(model, sd, path, strict)


def load_weights(model, sd, source="checkpoint", strict=True):
    """model.load_state_dict(sd, strict), where a misfit is a CheckpointError naming every tensor that
    does not fit (missing, unexpected, or its shapes), not torch's multi-line RuntimeError. Returns model."""
    _check_fits(model, sd, source, strict)
    model.load_state_dict(sd, strict=strict)
    return model


def _check_fits(model, sd, path, strict):
    own = model.state_dict()
    problems = []
    for name, value in sd.items():
        if name in own and own[name].shape != value.shape:
            problems.append(f"{name}: checkpoint {tuple(value.shape)}, model {tuple(own[name].shape)}")
    if strict:
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if missing:
            problems.append(f"missing from the checkpoint: {_some(missing)}")
        if unexpected:
            problems.append(f"not in the model: {_some(unexpected)}")
    if problems:
        hint = ""
        if any(p.startswith("pos_embed") for p in problems):
            hint = " (pos_embed differs: was the model built with the checkpoint's input_size and patch_size?)"
        raise CheckpointError(f"{path} does not fit the model{hint}:\n  " + "\n  ".join(problems))


def _some(names, n=8):
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
