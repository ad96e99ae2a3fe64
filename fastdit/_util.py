"""Small shared helpers of the training stack: bad-input errors, atomic file writes, image grids, memory."""
import contextlib
import io
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


class UsageError(ValueError):
    """Bad input from the user (a path, an option, a combination): the CLI prints it on one line, exit code 2."""


def atomic_write(path, write):
    """Write a file so that a crash never leaves a partial file under `path`.

    write(f) writes the content into a binary file object. It goes to a temporary file in the
    same directory (so the rename cannot cross file systems), is fsync'ed, then replaces `path`
    in one os.replace: readers see the old file or the new one, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if hasattr(os, "fchmod"):  # mkstemp's 0600 -> what open() would have given
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every OS)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj, path):
    """torch.save through atomic_write."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def load_plain(path, what):
    """A file fastdit wrote (tensors and plain containers only), read safely, with one-line errors."""
    from .checkpoint import CheckpointError, read_checkpoint

    if not os.path.isfile(path):
        raise UsageError(f"{what} {str(path)!r} does not exist or is not a file")
    try:
        return read_checkpoint(path)
    except (FileNotFoundError, CheckpointError) as e:
        raise UsageError(f"{what}: {e}") from e


PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def to_uint8(images):
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8 numpy array, as DiT's sample_ddp.py (and
    torchvision's save_image) round: floor(127.5 x + 128), clamped."""
    x = (127.5 * images.detach().float() + 128.0).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, path, nrow, min_cell=64, pad=2):
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid of `nrow` images per row.

    Small images (the 8x8 digits) are enlarged by an integer factor with nearest-neighbour so
    that each cell is at least `min_cell` pixels: the grid shows the real pixels, bigger.
    """
    from PIL import Image

    arr = to_uint8(images)  # (N, H, W, C)
    n, h, w, c = arr.shape
    ncol = max(1, min(nrow, n))
    nrows = -(-n // ncol)
    grid = np.zeros((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = arr[i]
    zoom = max(1, -(-min_cell // max(h, w)))
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if zoom > 1:
        img = img.resize((img.width * zoom, img.height * zoom), Image.NEAREST)
    return atomic_write(path, lambda f: img.save(f, format="PNG"))


def memory_bytes(device):
    """Peak memory of this process on `device`: CUDA max allocated, else the process's peak RSS."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB


def read_jsonl(path):
    """The records of a JSON-lines file; a line cut short by a crash is skipped."""
    records = []
    if os.path.isfile(path):
        for line in Path(path).read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def json_line(record):
    return json.dumps(record) + "\n"


def write_jsonl(path, records):
    atomic_write(path, lambda f: f.write("".join(map(json_line, records)).encode()))


def plain(value):
    """argparse values -> plain types that torch.load(weights_only=True) reads back."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)  # Path and the like


def loss_series(records):
    """(steps, losses) arrays of a metrics log's per-step records (skipped steps left out)."""
    pts = [(r["step"], r["loss"]) for r in records if "event" not in r and r.get("loss") is not None]
    return tuple(np.asarray(v) for v in zip(*pts)) if pts else (np.zeros(0), np.zeros(0))


def smoothing_window(n):
    """Moving-average window for a curve of n points: a tenth of it, between 1 and 50."""
    return max(1, min(50, n // 10))


def moving_average(values, k):
    """Means of every k consecutive values (len(values) - k + 1 of them)."""
    return np.convolve(values, np.ones(k) / k, mode="valid")


def save_figure(fig, path):
    """Save a matplotlib figure atomically as PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def amp_forward(fn, device_type, dtype):
    """fn run under torch.autocast(dtype) with a float32 result (so losses and sampler math stay fp32); dtype None: fn."""
    if dtype is None:
        return fn

    def forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            out = fn(*args, **kwargs)
        return out.float()

    return forward
