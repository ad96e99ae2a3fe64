"""Model names, model configs stored in checkpoints as plain dicts, and loading a model from a checkpoint."""

import argparse
from pathlib import Path

from . import pretrained
from ._util import UsageError, find_checkpoint
from .checkpoint import CheckpointError, extract_state_dict, load_weights, read_checkpoint
from .models import DiT, DiT_models

MODELS = DiT_models  # the CLI's names are the API's: the twelve official configs and DiT-Tiny/1, /2, /4


def check_model_name(name):
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    return name


def check_input_fits(name, image_size, input_size):
    """A model `name` takes inputs of input_size x input_size (--image-size's pixels, or its latents) only
    where its patch size (every name is DiT-<size>/<patch size>) divides it."""
    patch = int(check_model_name(name).rsplit("/", 1)[1])
    if input_size % patch:
        raise UsageError(
            f"--image-size {image_size}: the model's input {input_size}x{input_size} must be divisible "
            f"by {name}'s patch size {patch}"
        )


def model_name(text):
    """argparse type of --model."""
    if text not in MODELS:
        raise argparse.ArgumentTypeError(f"unknown model {text!r}; valid names: {', '.join(MODELS)}")
    return text


def build_model(name, **kwargs):
    """MODELS[name](**kwargs) and its config: a dict of plain values with DiT(**config) == the model."""
    model = MODELS[check_model_name(name)](**kwargs)
    return model, model_config(model)


def model_config(model):
    """The constructor arguments of a DiT as plain values (what checkpoints store)."""
    block = model.blocks[0]
    hidden = model.pos_embed.shape[-1]
    return dict(
        input_size=list(model.x_embedder.img_size),
        patch_size=model.patch_size,
        in_channels=model.in_channels,
        hidden_size=hidden,
        depth=len(model.blocks),
        num_heads=model.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / hidden,
        class_dropout_prob=model.y_embedder.dropout_prob if model.y_embedder is not None else 0.0,
        num_classes=model.num_classes,
        learn_sigma=model.learn_sigma,
        block=model.block,
    )


def model_from_config(config):
    config = dict(config)
    config["input_size"] = tuple(config["input_size"])
    return DiT(**config)


def load_model(path, model=None, weights="ema", device="cpu", **kwargs):
    """A DiT in eval mode holding the weights of checkpoint `path`.

    A `fastdit train` checkpoint (or its run folder: the latest checkpoint) records its model's config,
    so `fastdit.load_model("runs/digits")` is all it takes; weights="ema" (default) or "model" picks
    the EMA or the trained weights. Checkpoints without a config (official releases, DiT train.py)
    need the config's name and its arguments: `load_model("official.pt", "DiT-XL/2", input_size=32)`,
    except DiT's pretrained ones (fastdit.pretrained), which their names imply: `load_model(
    "DiT-XL-2-256x256.pt")` reads pretrained_models/DiT-XL-2-256x256.pt, downloaded first if absent
    (as DiT's find_model), unless that name is a file here.
    Building the model draws initial weights from torch's RNG first, as DiT's sample.py does.
    Raises FileNotFoundError, or CheckpointError (a ValueError) saying what does not fit.
    """
    if Path(path).is_dir():
        path = find_checkpoint(path, "checkpoint folder")
    name = pretrained.named(path)
    if name is not None:
        path = path if Path(path).is_file() else pretrained.fetch(name)
        if model is None:
            model, image_size = pretrained.PRETRAINED[name]
            kwargs.setdefault("input_size", image_size // 8)
    return model_from_checkpoint(read_checkpoint(path), str(path), model, weights, **kwargs).to(device)


def model_from_checkpoint(obj, source, model=None, weights="ema", **kwargs):
    """load_model for a checkpoint object already read (read_checkpoint) from `source`."""
    config = obj.get("model_config") if isinstance(obj, dict) else None
    if config is not None:
        if weights not in ("ema", "model"):
            raise CheckpointError(f"weights must be 'ema' or 'model', got {weights!r}")
        _check_agrees_with_config(obj, source, model, kwargs)
        net = model_from_config(config)
        sd = extract_state_dict(obj, key=weights, source=source)
    elif model is None:
        raise CheckpointError(
            f"{source} records no model config (an official DiT checkpoint?): name the model and "
            f"its arguments, e.g. load_model(path, 'DiT-XL/2', input_size=32)"
        )
    else:
        if model not in MODELS:
            raise CheckpointError(f"unknown model {model!r}; valid names: {', '.join(MODELS)}")
        net = MODELS[model](**kwargs)
        sd = extract_state_dict(obj, source=source)
    return load_weights(net, sd, source).eval()


def _check_agrees_with_config(obj, source, model, kwargs):
    """A checkpoint that records its model builds that model: a model name or argument given as well
    must agree with it (it would otherwise be ignored)."""
    config = obj["model_config"]
    recorded = dict(config, model=obj.get("model_name", model), input_size=tuple(config["input_size"]))
    given = dict(kwargs, model=model) if model is not None else dict(kwargs)
    if isinstance(given.get("input_size"), int):
        given["input_size"] = (given["input_size"],) * 2
    differ = [f"{k}={v!r} (it records {recorded.get(k)!r})" for k, v in given.items() if v != recorded.get(k)]
    if differ:
        raise CheckpointError(
            f"{source} records its model, which contradicts {', '.join(differ)}: leave these arguments out"
        )
