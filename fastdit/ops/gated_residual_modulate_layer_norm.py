"""gated_residual_modulate_layer_norm: a gated residual and the LayerNorm+modulate after it, in one pass."""
from .. import reference
from ._checks import check_eps, check_like, check_rows


def gated_residual_modulate_layer_norm(x, y, gate, shift, scale, eps=1e-6):
    """(r, modulate_layer_norm(r, shift, scale, eps)) with r = x + gate[:, None] * y."""
    check_rows(x, "x", {"gate": gate, "shift": shift, "scale": scale})
    check_like("y", y, x)
    check_eps(eps)
    return reference.gated_residual_modulate_layer_norm(x, y, gate, shift, scale, eps)
