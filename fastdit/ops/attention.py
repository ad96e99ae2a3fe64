"""attention: non-causal multi-head softmax attention on (B, T, H, Dh) tensors."""
from .. import reference
from ._checks import check_qkv


def attention(q, k, v, backend=None):
    """softmax(q k^T / sqrt(Dh)) v; q, k, v (B, T, H, Dh) -> (B, T, H, Dh)."""
    check_qkv(q, k, v)
    return reference.attention(q, k, v)
