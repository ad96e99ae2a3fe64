"""gated_residual: the adaLN-Zero residual update x + gate * y."""
from .. import reference
from ._checks import check_like, check_rows


def gated_residual(x, y, gate):
    """x + gate[:, None] * y; x, y (B, T, D), gate (B, D)."""
    check_rows(x, "x", {"gate": gate})
    check_like("y", y, x)
    return reference.gated_residual(x, y, gate)
