"""unpatchify: DiT's final-layer tokens (B, T, p*p*C) -> image (B, C, H, W).

Triton: the layout kernel of _layout.py, features in (i, j, c) order; its gradient is the
inverse move through the same kernel.
"""
from .. import reference
from ._checks import check_tokens
from ._layout import check_features, tokens_to_image
from ._triton_utils import use_triton


def unpatchify(x, patch_size, channels, grid_size=None):
    """(B, T, p*p*C) -> (B, C, H, W), features (i, j, c); grid_size (h, w) defaults to square."""
    h, w = check_tokens(x, patch_size, channels, grid_size)
    if not use_triton("x", x):
        return reference.unpatchify(x, patch_size, channels, (h, w))
    check_features(x.shape[-1])
    return tokens_to_image(x, patch_size, channels, h, w, True)
