"""Model names accepted by the CLI, and model configs stored in checkpoints as plain dicts."""
from .models import DiT, DiT_models
from ._util import UsageError


def _tiny(patch_size):
    def make(**kwargs):
        return DiT(depth=6, hidden_size=128, num_heads=4, patch_size=patch_size, **kwargs)

    make.__doc__ = f"DiT-Tiny/{patch_size}: depth 6, hidden size 128, 4 heads (~1.9M parameters): the digits job."
    return make


# The twelve official configs plus tiny ones for the digits and MNIST (CPU-sized).
MODELS = {**DiT_models, **{f"DiT-Tiny/{p}": _tiny(p) for p in (1, 2, 4)}}


def check_model_name(name):
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    return name


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
