"""modulate_layer_norm: LayerNorm (no affine) then adaLN modulation, x * (1 + scale) + shift."""
from .. import reference
from ._checks import check_eps, check_rows


def modulate_layer_norm(x, shift, scale, eps=1e-6):
    """layer_norm(x) * (1 + scale[:, None]) + shift[:, None]; x (B, T, D), shift/scale (B, D)."""
    check_rows(x, "x", {"shift": shift, "scale": scale})
    check_eps(eps)
    return reference.modulate_layer_norm(x, shift, scale, eps)
