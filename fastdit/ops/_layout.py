"""The layout kernel behind patchify and unpatchify: images (B, C, H, W) <-> patch tokens (B, T, F).

Token t = (th, tw) of the (h, w) grid (row-major) holds the p x p patch at rows th*p + i,
columns tw*p + j, over all C channels: F = C*p*p features, ordered
  (c, i, j)  patchify's, a Conv2d weight's flattening   CHANNELS_LAST=False
  (i, j, c)  unpatchify's, DiT's final-layer output     CHANNELS_LAST=True
Both directions are the same permutation, so one kernel moves elements either way (TO_IMAGE),
and each op's backward is the other direction of its forward:
  patchify   = to_tokens(cij)   its backward to_image(cij)
  unpatchify = to_image(ijc)    its backward to_tokens(ijc)
Each specialisation compiles under its op's name (`patchify_fwd_kernel`, ...).
A program moves a tile of BLOCK_T tokens x BLOCK_F features of one image; images may have any
strides (no copy), tokens a unit feature stride.
"""

from . import _triton_utils as tu
from ._triton_utils import offset64, row_major, tl, triton

MAX_F = 16384  # features per token held by one tile row


KERNEL_NAMES = {  # (TO_IMAGE, CHANNELS_LAST) -> compiled name
    (False, False): "patchify_fwd_kernel",
    (True, False): "patchify_bwd_kernel",
    (True, True): "unpatchify_fwd_kernel",
    (False, True): "unpatchify_bwd_kernel",
}


def _kernel_name(specialization):
    """Triton `repr`: a specialisation's compiled name, from its constexpr flags."""
    flags = (specialization.constants["TO_IMAGE"], specialization.constants["CHANNELS_LAST"])
    return KERNEL_NAMES[tuple(bool(getattr(f, "value", f)) for f in flags)]


@triton.jit(repr=_kernel_name)
def layout_kernel(
    IMG, TOK,  # image (B, C, H, W), tokens (B, T, F)
    T, F, C, p, w, token_blocks,
    si_b, si_c, si_h, si_w, st_b, st_t,
    TO_IMAGE: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # one grid axis: B * token_blocks may exceed a CUDA grid's second axis
    b = pid // token_blocks
    t = (pid % token_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    f = tl.arange(0, BLOCK_F)
    mask = (t < T)[:, None] & (f < F)[None, :]
    if CHANNELS_LAST:
        c, i, j = f % C, f // (C * p), (f // C) % p
    else:
        c, i, j = f // (p * p), (f // p) % p, f % p
    row = (t // w)[:, None] * p + i[None, :]  # image row and column of each (token, feature)
    col = (t % w)[:, None] * p + j[None, :]
    img = offset64(b, si_b, c, si_c)[None, :] + offset64(row, si_h, col, si_w)
    tok = offset64(b, st_b, t, st_t)[:, None] + f[None, :]
    if TO_IMAGE:
        tl.store(IMG + img, tl.load(TOK + tok, mask=mask), mask=mask)
    else:
        tl.store(TOK + tok, tl.load(IMG + img, mask=mask), mask=mask)


def check_features(F):
    if F > MAX_F:
        raise ValueError(f"patch_size**2 * channels = {F} exceeds the Triton layout kernel's maximum of {MAX_F}")


def _launch(img, tok, p, channels_last, to_image):
    B, C, H, W = img.shape
    T, F = tok.shape[1:]
    block_f = triton.next_power_of_2(F)
    block_t = tu.tile_rows(T, block_f, img.device)
    token_blocks = triton.cdiv(T, block_t)
    layout_kernel[(B * token_blocks,)](
        img, tok, T, F, C, p, W // p, token_blocks, *img.stride(), *tok.stride()[:2],
        TO_IMAGE=to_image, CHANNELS_LAST=channels_last, BLOCK_T=block_t, BLOCK_F=block_f,
        **tu.launch_options(tu.num_warps(block_t * block_f)),
    )  # fmt: skip


def tokens_like(img, p):
    """The (B, T, C*p*p) buffer to_tokens fills (also the ops' fake implementation)."""
    B, C, H, W = img.shape
    return tu.empty((B, (H // p) * (W // p), C * p * p), img.dtype, img.device)


def image_like(tok, p, channels, h, w):
    """The (B, C, h*p, w*p) buffer to_image fills (also the ops' fake implementation)."""
    return tu.empty((tok.shape[0], channels, h * p, w * p), tok.dtype, tok.device)


def to_tokens(img, p, channels_last):
    """(B, C, H, W) -> (B, T, C*p*p), features (i, j, c) if channels_last else (c, i, j)."""
    tok = tokens_like(img, p)
    _launch(img, tok, p, channels_last, to_image=False)
    return tok


def to_image(tok, p, channels, h, w, channels_last):
    """(B, T = h*w, C*p*p) -> (B, C, h*p, w*p), features (i, j, c) if channels_last else (c, i, j)."""
    img = image_like(tok, p, channels, h, w)
    _launch(img, row_major(tok), p, channels_last, to_image=True)
    return img
