"""fastdit: the DiT (Peebles & Xie) training and sampling stack on fused GPU kernels.

Drop-in for facebookresearch/DiT:  from fastdit import DiT_models, create_diffusion
"""

__version__ = "0.1.0"

from ._registry import load_model
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from .complexity import flops
from .diffusion import create_diffusion
from .models import DiT, DiT_models

__all__ = [
    "DiT",
    "DiT_models",
    "load_model",
    "load_checkpoint",
    "read_checkpoint",
    "CheckpointError",
    "create_diffusion",
    "flops",
    "__version__",
]
