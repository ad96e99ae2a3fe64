"""Input validation shared by the ops: every error names the argument and what was expected."""

import torch

from .._validate import check_positive_int

# float64 runs on the reference backend only (the kernels compute in float32): see implementation().
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name, t, ndim, shape_doc):
    """`t` is a float32/float16/bfloat16/float64 tensor with `ndim` dimensions (`shape_doc` names them)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_doc}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_doc}, got shape {tuple(t.shape)}")


def check_shape(name, t, expected, expected_doc):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {expected_doc} = {tuple(expected)}, got {tuple(t.shape)}")


def check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all inputs must be on one device, got {where}")


FLOAT32_MAX = torch.finfo(torch.float32).max


def check_eps(eps):
    # The kernels take eps as a float32 scalar: a larger one (inf included) is not one.
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= FLOAT32_MAX:
        raise ValueError(f"eps must be a positive float at most float32's max ({FLOAT32_MAX:.4g}), got {eps!r}")


def check_rows(x, x_name, per_batch, doc="(B, T, D)"):
    """x is (B, T, D) and each of `per_batch` (name -> tensor) is (B, D); returns (B, T, D). B may be 0 (see
    implementation()), T and D may not: LayerNorm over no features is undefined (a mean of nothing), and no
    DiT input has no tokens (patchify and unpatchify refuse an empty grid)."""
    check_tensor(x_name, x, 3, doc)
    B, T, D = x.shape
    if T < 1 or D < 1:
        raise ValueError(f"{x_name} must have non-empty T and D, got shape {tuple(x.shape)}")
    for name, t in per_batch.items():
        check_tensor(name, t, 2, "(B, D)")
        check_shape(name, t, (B, D), "(B, D)")
    check_same_device(**{x_name: x}, **per_batch)
    return B, T, D


def check_like(name, t, x, x_name="x"):
    """`t` is a float tensor of x's shape on x's device."""
    check_tensor(name, t, x.dim(), "(B, T, D)")
    check_shape(name, t, x.shape, f"{x_name}.shape (B, T, D)")
    check_same_device(**{x_name: x, name: t})


def check_same_dtype(**tensors):
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        what = ", ".join(f"{name} is {dt}" for name, dt in dtypes.items())
        raise TypeError(f"inputs must share one dtype, got {what}")


def check_image(x, patch_size, name="x"):
    """x is (B, C, H, W), C >= 1 (tokens of no features are refused like an empty D), with H and W divisible
    by patch_size."""
    check_tensor(name, x, 4, "(B, C, H, W)")
    check_positive_int("patch_size", patch_size)
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one channel, got shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if H % patch_size or W % patch_size or H == 0 or W == 0:
        raise ValueError(
            f"{name}'s height and width must be positive multiples of patch_size={patch_size}, got {(H, W)}"
        )


def check_tokens(x, patch_size, channels, grid_size=None, name="x"):
    """x is (B, T, p*p*channels) with T = h*w; returns the grid (h, w), square unless given."""
    check_tensor(name, x, 3, "(B, T, p*p*C)")
    check_positive_int("patch_size", patch_size)
    check_positive_int("channels", channels)
    B, T, F = x.shape
    if F != patch_size * patch_size * channels:
        raise ValueError(
            f"{name}'s last dimension must be patch_size**2 * channels = {patch_size}**2 * {channels} = "
            f"{patch_size * patch_size * channels}, got {F}"
        )
    if grid_size is None:
        side = int(round(T**0.5))
        if side * side != T or T == 0:
            raise ValueError(f"{name} has T={T} tokens, not a square grid; pass grid_size=(h, w)")
        return side, side
    if (
        not isinstance(grid_size, (tuple, list))
        or len(grid_size) != 2
        or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid_size)
    ):
        raise ValueError(f"grid_size must be a pair of positive ints (h, w), got {grid_size!r}")
    if grid_size[0] * grid_size[1] != T:
        raise ValueError(
            f"grid_size {tuple(grid_size)} holds {grid_size[0] * grid_size[1]} tokens, but {name} has T={T}"
        )
    return tuple(grid_size)


def check_qkv(q, k, v):
    """q (B, Tq, H, Dh), k and v (B, Tk, H, Dh), one dtype and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 4, "(B, T, H, Dh)")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, T, H, Dh), got {tuple(k.shape)} and {tuple(v.shape)}")
    B, _, H, Dh = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, H, Dh):
        raise ValueError(f"k must match q in B, H and Dh: q is {tuple(q.shape)}, k is {tuple(k.shape)}")
    if min(q.shape[1:]) < 1 or min(k.shape[1:]) < 1:  # B may be 0; a softmax over no keys is undefined
        raise ValueError(f"q, k and v must have non-empty T, H and Dh, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    check_same_dtype(q=q, k=k, v=v)
    check_same_device(q=q, k=k, v=v)
