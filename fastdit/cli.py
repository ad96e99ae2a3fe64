"""The `fastdit` command: train, sample, sample-ddp, latents, fid, vae, info, ablate, bench.

Multi-GPU / multi-node: torchrun --nproc_per_node=8 -m fastdit.cli train --data DIR ...
Every flag is checked when parsed (fastdit/_args.py). Bad input ends with one line on stderr naming
the flag or file and exit code 2, before anything is written; a training run that cannot go on
(NaN/Inf losses or weights) with exit code 1, its last good checkpoint kept; so does a command that
runs out of memory (one line, no traceback).
"""

import argparse
import inspect
import subprocess
import sys
from pathlib import Path

from ._util import UsageError
from .checkpoint import CheckpointError

DESCRIPTION = """\
fastdit: DiT training and sampling on fused kernels.

  fastdit train          the main job: a small DiT trained in pixel space on the embedded
                         handwritten digits (scikit-learn, 8x8, 10 classes; no download), a few
                         minutes on a CPU -> runs/digits-.../ with a checkpoint, samples.png, loss.png
  fastdit train --data DIR [--vae VAE] | --latents DIR    your data (defaults follow its size: small
                                                          data DiT-Tiny, large data DiT's DiT-XL/2 recipe)
  fastdit sample --ckpt RUN                               a labelled grid of samples
  fastdit sample-ddp --ckpt CKPT --out samples.npz        sharded sampling into an ADM .npz (FID tools)
  fastdit vae                                             train the small VAE on the digits
  fastdit latents --vae VAE --out DIR                     encode a dataset once (chunked, resumable)
  fastdit fid SAMPLES.npz REF                             FID, sFID, IS, precision/recall of samples
  fastdit info --model DiT-XL/2 --image-size 256          parameters, Gflops (the paper's), training FLOPs
  fastdit ablate                                          the four block designs on the digits, one budget
  fastdit bench ...                                       the benchmarks (source checkout)

Under torchrun every command that samples or trains runs one process per device. Ctrl-C, SIGTERM or
SIGUSR1 (a cluster's notice before it kills a job): train (after writing the checkpoint of the step in
flight, on a signal), vae (its state after the step in flight), sample-ddp and latents keep what they
did and say how to go on; exit code 130 (Ctrl-C) or 128 + the signal's number (143: SIGTERM, 138: SIGUSR1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser():
    import torch

    from . import __version__, ablate, complexity, fid, latents, sample, train, vae

    p = _Parser(prog="fastdit", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"fastdit {__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="command", metavar="{train,sample,sample-ddp,latents,fid,vae,info,ablate,bench}")
    commands = [
        ("train", "train a DiT (no arguments: the digits main job)", train.add_arguments, train.run, train.__doc__),
        (
            "sample",
            "sample a labelled image grid from a checkpoint",
            sample.add_arguments,
            sample.sample,
            sample.__doc__,
        ),
        (
            "sample-ddp",
            "sample many images (torchrun-sharded) into an ADM .npz",
            sample.add_ddp_arguments,
            sample.sample_ddp,
            sample.__doc__,
        ),
        (
            "latents",
            "encode a dataset into a folder of latents",
            latents.add_arguments,
            latents.make_latents,
            latents.make_latents.__doc__,
        ),
        (
            "fid",
            "FID (and sFID, IS, precision, recall) of a sample .npz against a reference",
            fid.add_arguments,
            fid.run,
            fid.run.__doc__,
        ),
        (
            "vae",
            "train the small VAE on the digits or an image folder",
            vae.add_arguments,
            vae.train_vae,
            vae.DESCRIPTION,
        ),
        (
            "info",
            "parameters and FLOPs of the DiT configs (the paper's Gflops)",
            complexity.add_arguments,
            complexity.info,
            complexity.__doc__,
        ),
        (
            "ablate",
            "train the paper's four block designs with one budget: a table and a loss plot",
            ablate.add_arguments,
            ablate.ablate,
            ablate.__doc__,
        ),
    ]
    for name, help, add, func, doc in commands:
        sp = sub.add_parser(
            name,
            help=help,
            description=inspect.cleandoc(doc or ""),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add(sp)
        sp.set_defaults(func=func)
    sub.add_parser("bench", help="run the benchmarks (python -m benchmarks ARGS; needs a source checkout)")
    p.commands = sub.choices
    return p


def bench(args):
    """Forward to `python -m benchmarks` from the source checkout this fastdit was imported from."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "__main__.py").is_file():
        print(
            "fastdit bench: error: the benchmarks live in the source checkout (benchmarks/ next to fastdit/); "
            "this fastdit is installed without them. Clone the repository and pip install -e it",
            file=sys.stderr,
        )
        return 2
    # `python -m benchmarks` with the checkout first on sys.path (plain -m would prefer the current
    # folder), run from the user's folder so that relative paths in ARGS mean what they say.
    launcher = (
        "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
        "runpy.run_module('benchmarks', run_name='__main__', alter_sys=True)"
    )
    return subprocess.call([sys.executable, "-c", launcher, str(root), *args])


def main(argv=None):
    """Run one fastdit command; returns its exit code: 0, 1 (training stopped, out of memory), 2 (bad input),
    130 (Ctrl-C), 128 + the signal's number after a stop signal (143: SIGTERM, 138: SIGUSR1; _signals)."""
    program = argv is None  # the process ends when the command returns (in-process callers pass their argv)
    argv = sys.argv[1:] if program else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmarks, --help included
        return bench(argv[1:])
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # reported by the command's parser: "fastdit train: error: ...", its --help
            parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as e:  # --help, --version, or a bad flag (already reported on one line)
        return e.code
    if args.command is None:
        parser.print_help()
        return 2
    from . import ops
    from ._signals import Stopped, StopSignals
    from .train import TrainingError

    StopSignals.ignore_after_stop = program

    try:
        _check_environment()
        args.func(args)
    # bad input (a backend that cannot run here among it), or a file that cannot be read or written
    except (UsageError, CheckpointError, OSError, ops.BackendUnavailable) as e:
        print(f"fastdit {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"fastdit {args.command}: stopped: {_one_line(e)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        print(
            f"fastdit {args.command}: error: out of memory: {_one_line(e)}; smaller settings need less", file=sys.stderr
        )
        return 1
    except Stopped as e:  # as Ctrl-C: its message, if any, says what the command kept and how it goes on
        print(f"fastdit {args.command}: stopped by {e.name}" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # its message, if any: what the command left and how it goes on
        print(f"fastdit {args.command}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130
    return 0


def _check_environment():
    """FASTDIT_BACKEND and FASTDIT_ATTENTION, which the ops read when they first run: bad input, reported before any work."""
    from . import ops

    try:
        ops.get_backend()
        ops.requested_attention_backend()
    except ValueError as e:
        raise UsageError(str(e)) from e


def _out_of_memory(error):
    """Whether an allocation failed: Python's or numpy's MemoryError, CUDA's OutOfMemoryError, torch's CPU allocator."""
    import torch

    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(error)


def _one_line(error):
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.filename}: {error.strerror}"
    text = ""
    for line in filter(None, (line.strip() for line in str(error).splitlines())):
        text += line if not text else (" " if text.endswith(":") else "; ") + line
    return text


if __name__ == "__main__":
    sys.exit(main())
