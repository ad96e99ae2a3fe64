"""Value types of the command line: every flag is checked as it is parsed, before any work starts.

A bad value ends the command with one line naming the flag, e.g.
`fastdit train: error: argument --lr: must be a finite number > 0, got 'inf'`.
"""

import argparse
import math
from pathlib import Path

MAX_SEED = 2**32 - 1


def integer(low, high=None):
    """An int in [low, high] (high None: no upper bound)."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    return parse


def number(low=None, high=None, low_open=False, high_open=False):
    """A finite float within the bounds given (open or closed)."""
    lo = None if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = None if high is None else f"{'<' if high_open else '<='} {high:g}"
    wanted = " and ".join(b for b in (lo, hi) if b)

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number{' ' + wanted if wanted else ''}, got {text!r}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be a finite number {wanted}, got {text!r}")
        return value

    return parse


positive = integer(1)
non_negative = integer(0)
seed = integer(0, MAX_SEED)
probability = number(0.0, 1.0, high_open=True)  # label dropout, EMA decay


def int_list(low, high=None):
    """Comma-separated ints, each in [low, high], at least one."""
    item = integer(low, high)

    def parse(text):
        parts = [p.strip() for p in text.split(",")]
        if not text.strip() or any(not p for p in parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated integers like 3,7, got {text!r}")
        return [item(p) for p in parts]

    return parse


def output_folder(text):
    """A folder to create or write into: refused when it is an existing file (or under one)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder, got an empty name")
    path = Path(text)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a folder to write into, but {str(p)!r} is a file")
    return text


def output_file(suffixes, what):
    """A file to write; suffixes (lower case, with the dot): the ones its writer honours, None: any."""

    def parse(text):
        if not text.strip():
            raise argparse.ArgumentTypeError("expected a file name, got an empty one")
        path = Path(text)
        if suffixes is not None and path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(
                f"{text!r}: {what} is written as {' or '.join(suffixes)}; end the file name with one of them"
            )
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is an existing folder; give a file name")
        output_folder(str(path.parent))
        return text

    return parse


def add_tf32(parser, default, when):
    """--tf32/--no-tf32: float32 matmuls and convolutions on TF32 tensor cores on CUDA (DiT's scripts' setting)."""
    parser.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=default,
        help="on CUDA, run float32 matmuls and convolutions on TF32 tensor cores (faster; products "
        f"rounded to TF32's 10-bit mantissa), as DiT's scripts do; default {when}",
    )


def add_device(parser, per_rank=True, default="auto"):
    """--device, the same in every command; per_rank: under torchrun each process takes its LOCAL_RANK's GPU."""
    gpu = "cuda:LOCAL_RANK" if per_rank else "cuda"
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=default,
        help=f"where to run; default auto: {gpu} if present, else cpu",
    )
