"""Small shared helpers of the training stack: bad-input errors, atomic file writes, output locks, RNG states,
image grids, memory."""

import contextlib
import errno
import fcntl
import io
import json
import os
import random
import re
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, read_checkpoint


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
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # named after the file asked for, not the temporary one
        raise OSError(e.errno, e.strerror, str(path)) from e
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


def remove_stale_temporaries(folder):
    """Delete the temporary files atomic_write leaves in `folder` when its process is killed mid-write
    (.NAME.XXXXXXXX.tmp, mkstemp's 8 random characters), saying so for each. Returns their paths."""
    stale = [f for f in Path(folder).glob(".*.tmp") if re.fullmatch(r"\..+\.[a-z0-9_]{8}\.tmp", f.name) and f.is_file()]
    for f in stale:
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
        print(f"removed {f}, a file a killed run left half-written")
    return [str(f) for f in stale]


# The lock files of exclusive_output, one per rank: LOCK_PREFIX + the rank, in the folder written.
LOCK_PREFIX = ".lock-rank"


@contextlib.contextmanager
def exclusive_output(folder, what, dist, writes=True):
    """Run the block as the only fastdit command writing into `folder` (what: the output, as errors name it).

    Resumable outputs (sample-ddp's parts, latents' chunks, a training run's folder) are continued by the
    same command; a second one started while the first still runs (a relaunch, orphaned torchrun workers)
    would write and delete the first one's files. Every rank that writes into the folder (writes) holds an
    advisory lock, fcntl.flock on its file LOCK_PREFIX<rank> there, for the block's life: the OS releases it
    when the process ends, so a crash never leaves a stale lock and a rerun continues. The ranks agree: all
    go on, or all raise the UsageError. (On some network file systems flock does not guard against a
    process on another host.) dist: fastdit._dist.Dist.
    """
    folder, held, error = Path(folder), None, None
    if writes:
        path = folder / f"{LOCK_PREFIX}{dist.rank:05d}"
        try:  # an error on one rank is every rank's: none waits for the others
            folder.mkdir(parents=True, exist_ok=True)
            held = _lock(path)
        except OSError as e:
            error = f"{e.filename or path}: {e.strerror}"
        else:
            if held is None:
                error = (
                    f"{what}: another fastdit process is writing it (it holds {path}); wait for it to end, or "
                    f"stop it, then run the command again"
                )
    refused = [e for e in dist.all_gather_object(error) if e]
    try:
        if refused:
            raise UsageError(refused[0])
        yield
    finally:
        if held is not None:
            _unlock(held, path)


def _lock(path):
    """An open file of `path` holding an exclusive flock on it, or None while another process holds one."""
    while True:
        f = open(path, "ab")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                f.close()
                raise
            print(
                f"fastdit: warning: {path}: {e.strerror}: nothing keeps a second run from writing here", file=sys.stderr
            )
            return f
        if _is_file_at(f, path):
            return f
        f.close()  # its holder removed it between our open and our lock (_unlock): lock the file now there


def _unlock(f, path):
    """Remove the lock file while still holding it (a process that opened it before sees it gone and retries),
    unless it is no longer ours (the folder was removed and made again), then release it."""
    if _is_file_at(f, path):
        path.unlink()
    f.close()


def _is_file_at(f, path):
    try:
        return os.path.samestat(os.fstat(f.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def absolute_if_local(path):
    """A path that exists here, made absolute (a run stored with it resumes from any working directory);
    anything else (a hub id, a missing path, "", None) unchanged."""
    if not path or not Path(path).expanduser().exists():
        return path
    return str(Path(path).expanduser().resolve())


def find_checkpoint(path, flag):
    """A checkpoint file, or the latest NNNNNNN.pt of a run folder's checkpoints/ (or of that folder given itself);
    `flag` names the option in errors."""
    p = Path(path)
    if p.is_dir():
        found = _numbered_checkpoints(p / "checkpoints") or _numbered_checkpoints(p)
        if not found:
            raise UsageError(f"{flag} {path}: no checkpoints/NNNNNNN.pt in this folder")
        return found[-1]
    if not p.is_file():
        raise UsageError(f"{flag} {path}: no such checkpoint file or run folder")
    return p


def _numbered_checkpoints(folder):
    """folder's NNNNNNN.pt files, by step."""
    return sorted((f for f in folder.glob("*.pt") if re.fullmatch(r"\d+\.pt", f.name)), key=lambda f: int(f.stem))


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj, path):
    """torch.save through atomic_write."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def load_plain(path, what):
    """A file fastdit wrote (tensors and plain containers only), read safely, with one-line errors."""
    if not os.path.isfile(path):
        raise UsageError(f"{what} {str(path)!r} does not exist or is not a file")
    try:
        return read_checkpoint(path)
    except (FileNotFoundError, CheckpointError) as e:
        raise UsageError(f"{what}: {e}") from e


def rng_state(device):
    """This process's RNG states as tensors and plain values (torch.load(weights_only=True) reads them)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        numpy=[name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        python=[version, list(py_state), py_gauss],
    )


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))


PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def to_uint8(images):
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8 numpy array, as DiT's sample_ddp.py (and
    torchvision's save_image) round: floor(127.5 x + 128), clamped."""
    x = (127.5 * images.detach().float() + 128.0).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def as_rgb(images):
    """uint8 (..., C) images with a grayscale one (C = 1) as 3 identical channels, as FID tools want them."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


# The grid writers by file suffix (formats every Pillow build can write).
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}


# The largest side of a grid image: 65,500 pixels, what libjpeg (Pillow's JPEG writer) takes, the smallest limit
# of IMAGE_FORMATS' writers (PNG, BMP and TIFF take 2**31 - 1), so that a grid fastdit accepts is written in any
# of them. It also bounds the grid's memory: the grid is built whole, its images sampled in one batch (an
# unbounded `fastdit sample --per-class` had the OS kill the process).
MAX_GRID_SIDE = 65_500


def grid_limits(h, w, captions=(), min_cell=64, pad=2):
    """(rows, per row): the most rows, and images a row, that a save_grid grid of h x w images can have within
    MAX_GRID_SIDE pixels a side, each row captioned on its left with one of `captions` (none: no captions)."""
    zoom = _grid_zoom(h, w, min_cell)
    label = _text_box(captions)[0] + 2 * pad * zoom if len(captions) else 0
    # (rows * (h + pad) + pad) * zoom pixels high, (per_row * (w + pad) + pad) * zoom + label wide
    return (MAX_GRID_SIDE // zoom - pad) // (h + pad), ((MAX_GRID_SIDE - label) // zoom - pad) // (w + pad)


def _grid_zoom(h, w, min_cell):
    """The integer factor that enlarges h x w images to cells of at least min_cell pixels."""
    return max(1, -(-min_cell // max(h, w)))


def _text_box(texts):
    """(width, height) of a box that holds each of `texts` written in Pillow's default font."""
    from PIL import Image, ImageDraw, ImageFont

    font, measure = ImageFont.load_default(), ImageDraw.Draw(Image.new("L", (1, 1)))
    boxes = [measure.textbbox((0, 0), str(t), font=font) for t in texts]
    return max(b[2] for b in boxes), max(b[3] for b in boxes) + 4


def save_grid(images, path, nrow, labels=None, min_cell=64, pad=2):
    """Save (N, C, H, W) images in [-1, 1] as one grid of `nrow` images per row, in the format of
    path's suffix (IMAGE_FORMATS).

    Small images (the 8x8 digits) are enlarged by an integer factor with nearest-neighbour so
    that each cell is at least `min_cell` pixels: the grid shows the real pixels, bigger.
    labels: one caption per image (its class); a row of one class is captioned once, on its left.
    """
    from PIL import Image

    fmt = IMAGE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UsageError(f"{path}: images are written as {', '.join(IMAGE_FORMATS)}")
    arr = to_uint8(images)  # (N, H, W, C)
    n, h, w, c = arr.shape
    ncol = max(1, min(nrow, n))
    nrows = -(-n // ncol)
    grid = np.zeros((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = arr[i]
    zoom = _grid_zoom(h, w, min_cell)
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if zoom > 1:
        img = img.resize((img.width * zoom, img.height * zoom), Image.NEAREST)
    if labels is not None:
        img = _caption(
            img, [labels[i : i + ncol] for i in range(0, n, ncol)], (h + pad) * zoom, (w + pad) * zoom, pad * zoom
        )
    return atomic_write(path, lambda f: img.save(f, format=fmt, **({"quality": 95} if fmt == "JPEG" else {})))


def _caption(img, rows, cell_h, cell_w, pad):
    """The grid with class captions: a grid whose every row is one class gets a label column on
    the left; any other grid a caption strip under each row, each label under its image."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    fill = 255 if img.mode == "L" else (255, 255, 255)
    text_w, text_h = _text_box([t for r in rows for t in r])
    if all(len(set(map(str, r))) == 1 for r in rows):
        out = Image.new(img.mode, (img.width + text_w + 2 * pad, img.height))
        out.paste(img, (text_w + 2 * pad, 0))
        draw = ImageDraw.Draw(out)
        for i, r in enumerate(rows):
            draw.text((pad, pad + i * cell_h + (cell_h - pad - text_h) // 2), str(r[0]), fill=fill, font=font)
        return out
    out = Image.new(img.mode, (img.width, len(rows) * (cell_h + text_h)))
    draw = ImageDraw.Draw(out)
    for i, r in enumerate(rows):
        out.paste(img.crop((0, i * cell_h, img.width, (i + 1) * cell_h)), (0, i * (cell_h + text_h)))
        for j, t in enumerate(r):
            draw.text((pad + j * cell_w, (i + 1) * cell_h + i * text_h + 2), str(t), fill=fill, font=font)
    return out


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


@contextlib.contextmanager
def tf32(enabled, device):
    """On a CUDA `device`, float32 matmuls and convolutions on TF32 tensor cores inside the block, or
    not (enabled False), as DiT's scripts set them (both on), the previous settings restored after it.
    On other devices nothing changes: the CPU's float32 stays float32."""
    if torch.device(device).type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def amp_forward(fn, device_type, dtype):
    """fn run under torch.autocast(dtype) with a float32 result (so losses and sampler math stay fp32); dtype None: fn."""
    if dtype is None:
        return fn

    def forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            out = fn(*args, **kwargs)
        return out.float()

    return forward
