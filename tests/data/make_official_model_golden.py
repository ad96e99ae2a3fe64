"""Generate tests/data/official_model_golden.pt from the official DiT models.py.

    python tests/data/make_official_model_golden.py /path/to/DiT  [--out tests/data/official_model_golden.pt]

/path/to/DiT is a directory holding facebookresearch/DiT's models.py; it is imported from there and
never committed here. It needs torch, numpy and timm (`pip install timm==1.0.31 --no-deps`). timm's
package __init__ imports torchvision (its data transforms), and PyPI's torchvision does not import
beside a CPU-only torch wheel; so when torchvision cannot be imported, `import_official` imports
timm.layers alone, with a stub module standing in for torchvision (timm.layers only names
torchvision's FrozenBatchNorm2d and FX helpers, which DiT never uses), and serves the official
`from timm.models.vision_transformer import PatchEmbed, Attention, Mlp` from timm.layers: the very
classes timm's vision_transformer imports. The fixture's metadata records whether that shim was used.

The committed fixture was made from facebookresearch/DiT at OFFICIAL_COMMIT (models.py last changed
in c9f545c) with timm 1.0.31 (shimmed), on CPU in float32, with the torch version recorded in the
metadata. The cases below are also what the tests run on fastdit.DiT (reference and Triton
backends) and on fastdit.reference_model.ReferenceDiT: `run_case(make_model, name)` builds a model
with `make_model(**CONFIGS[name])` from a seed and returns named tensors:

  init.<key>       the state_dict as constructed from the seed (initialize_weights, every draw)
  forward          eval forward on perturbed weights (as if trained: no zero-initialised gate left)
  cfg_raw          eval forward on the doubled conditional half: what forward_with_cfg guides
  forward_with_cfg forward_with_cfg at scale 4 ([labels; null class] halves where there is one)
  train_forward    training-mode forward from a fixed seed: class dropout draws included
  grad.<name>      d loss / d parameter of that training forward, for every trained parameter
"""

import argparse
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import torch

OFFICIAL_COMMIT = "ed81ce2229091fd4ecc9a223645f95cf379d582b"
GOLDEN_PATH = Path(__file__).with_name("official_model_golden.pt")
CFG_SCALE = 4.0
# Tiny configs (the fixture stays ~1 MB) covering: learn_sigma on and off; 4, 1, 3 and 5 input channels
# (5: CFG guides 3 of the eps channels); class dropout 0.1, 0.5, 1 (every training label dropped) and 0
# (no null class); a single class; head dims 16 and 24 (a tail past a power of two); patch sizes 2, 4
# and 1 (patchify is a view); 16 and 9 tokens; mlp_ratio 4, 2 and 2.5 (int(hidden * mlp_ratio)).
CONFIGS = {
    "c4_sigma": dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                     mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True),
    "c1_sigma_p4": dict(input_size=12, patch_size=4, in_channels=1, hidden_size=48, depth=1, num_heads=2,
                        mlp_ratio=2.0, class_dropout_prob=0.5, num_classes=5, learn_sigma=True),
    "c3_fixed_sigma": dict(input_size=6, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                           mlp_ratio=4.0, class_dropout_prob=0.0, num_classes=7, learn_sigma=False),
    "c5_sigma_p1": dict(input_size=3, patch_size=1, in_channels=5, hidden_size=16, depth=1, num_heads=1,
                        mlp_ratio=2.5, class_dropout_prob=1.0, num_classes=1, learn_sigma=True),
}  # fmt: skip


def _inputs(cfg, seed):
    """x (3, C, H, W); integer t; fractional t; y with the null class where there is one; the cfg batch."""
    g = torch.Generator().manual_seed(seed)
    C, S, K = cfg["in_channels"], cfg["input_size"], cfg["num_classes"]
    x = torch.randn(3, C, S, S, generator=g)
    t = torch.tensor([0, 421, 999])
    t_frac = torch.tensor([0.5, 250.25, 998.0])
    y = torch.randint(0, K, (3,), generator=g)
    null = K if cfg["class_dropout_prob"] > 0 else K - 1  # the last valid label without a null class
    y[-1] = null
    x_cfg = torch.randn(4, C, S, S, generator=g)  # only the first half is read
    y_cfg = torch.cat([torch.randint(0, K, (2,), generator=g), torch.full((2,), null)])
    return x, t, t_frac, y, x_cfg, torch.tensor([3, 500, 3, 500]), y_cfg


def _perturb(model, seed):
    """Every trained parameter plus N(0, 0.05^2) noise drawn by name order, like trained weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def run_case(make_model, name):
    """{key: tensor} for config `name` (see the module docstring), on CPU, computed by make_model's model."""
    cfg = CONFIGS[name]
    seed = 10 + sorted(CONFIGS).index(name)
    torch.manual_seed(seed)
    model = make_model(**cfg)
    out = {f"init.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    _perturb(model, seed)
    x, t, t_frac, y, x_cfg, t_cfg, y_cfg = _inputs(cfg, seed)
    model.eval()
    with torch.no_grad():
        out["forward"] = model(x, t, y)
        half = x_cfg[:2]
        out["cfg_raw"] = model(torch.cat([half, half]), t_cfg, y_cfg)
        out["forward_with_cfg"] = model.forward_with_cfg(x_cfg, t_cfg, y_cfg, CFG_SCALE)
    model.train()
    torch.manual_seed(seed + 100)  # the class-dropout draw
    train_out = model(x, t_frac, y)
    target = torch.linspace(-1, 1, train_out.numel()).view_as(train_out)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad((train_out - target).square().mean(), [p for _, p in named])
    out["train_forward"] = train_out.detach()
    out.update({f"grad.{n}": g for (n, _), g in zip(named, grads)})
    return {k: v.detach().cpu() for k, v in out.items()}


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of `root` and its submodules get empty modules whose every attribute is a dummy class."""

    def __init__(self, root):
        self.root = root

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] == self.root:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__getattr__ = _dummy_class
        return module

    def exec_module(self, module):
        module.__path__ = []


def _dummy_class(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (), {})


def _shim_timm():
    """`timm.models.vision_transformer`'s PatchEmbed, Attention and Mlp from timm.layers, without
    torchvision (see the module docstring). Returns True when the shim was needed."""
    try:
        importlib.import_module("torchvision")
        return False
    except Exception:
        pass
    sys.meta_path.insert(0, _StubFinder("torchvision"))
    spec = importlib.util.find_spec("timm")
    timm = types.ModuleType("timm")  # the package without its __init__ (which imports timm.data)
    timm.__path__ = list(spec.submodule_search_locations)
    sys.modules["timm"] = timm
    layers = importlib.import_module("timm.layers")
    vit = types.ModuleType("timm.models.vision_transformer")
    vit.PatchEmbed, vit.Attention, vit.Mlp = layers.PatchEmbed, layers.Attention, layers.Mlp
    sys.modules["timm.models"] = types.ModuleType("timm.models")
    sys.modules["timm.models.vision_transformer"] = vit
    return True


def import_official(root):
    """(the official models module from root/models.py, metadata)."""
    shimmed = _shim_timm()
    spec = importlib.util.spec_from_file_location("official_dit_models", Path(root) / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from importlib.metadata import version

    layers = importlib.import_module("timm.layers")
    meta = {
        "torch": str(torch.__version__),
        "timm": version("timm"),
        "timm_shimmed": shimmed,
        "timm_fused_attn": bool(layers.use_fused_attn()),
        "module": module.__file__,
    }
    try:
        meta["git_head"] = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return module, meta


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("official_root", help="directory holding the official DiT models.py")
    parser.add_argument("--out", default=str(GOLDEN_PATH))
    parser.add_argument("--commit", default=OFFICIAL_COMMIT, help="the official commit the file comes from")
    args = parser.parse_args()
    official, meta = import_official(args.official_root)
    meta["official_commit"] = args.commit
    cases = {name: run_case(official.DiT, name) for name in CONFIGS}
    torch.save({"meta": meta, "configs": CONFIGS, "cases": cases}, args.out)
    print(f"wrote {len(cases)} cases to {args.out}: {meta}")


if __name__ == "__main__":
    main()
