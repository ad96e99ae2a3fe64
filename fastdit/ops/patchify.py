"""patchify: image (B, C, H, W) -> patch tokens (B, T, C*p*p)."""
from .. import reference
from ._checks import check_image


def patchify(x, patch_size):
    """(B, C, H, W) -> (B, T, C*p*p); T = (H/p)(W/p) row-major, features (c, i, j) like a Conv2d weight."""
    check_image(x, patch_size)
    return reference.patchify(x, patch_size)
