"""patchify: image (B, C, H, W) -> patch tokens (B, T, C*p*p).

Triton: the layout kernel of _layout.py, features in (c, i, j) order; its gradient is the
inverse move through the same kernel.
"""
from .. import reference
from ._checks import check_image
from ._layout import check_features, image_to_tokens
from ._triton_utils import use_triton


def patchify(x, patch_size):
    """(B, C, H, W) -> (B, T, C*p*p); T = (H/p)(W/p) row-major, features (c, i, j) like a Conv2d weight."""
    check_image(x, patch_size)
    if not use_triton("x", x):
        return reference.patchify(x, patch_size)
    check_features(x.shape[1] * patch_size**2)
    return image_to_tokens(x, patch_size, False)
