"""unpatchify: DiT's final-layer tokens (B, T, p*p*C) -> image (B, C, H, W)."""
from .. import reference
from ._checks import check_tokens


def unpatchify(x, patch_size, channels, grid_size=None):
    """(B, T, p*p*C) -> (B, C, H, W), features (i, j, c); grid_size (h, w) defaults to square."""
    grid = check_tokens(x, patch_size, channels, grid_size)
    return reference.unpatchify(x, patch_size, channels, grid)
