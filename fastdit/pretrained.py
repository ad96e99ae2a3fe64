"""DiT's pretrained checkpoints, found as DiT's download.py finds them.

    fastdit sample                                   # DiT-XL/2 256x256, as DiT's `python sample.py`
    fastdit sample --image-size 512 --seed 1
    fastdit sample --ckpt DiT-XL-2-256x256.pt        # a pretrained name: fetched if not a file here

A pretrained name is read from pretrained_models/ in the working directory, where DiT's scripts keep
them (so their downloads are reused), after downloading it there from DiT's URL if it is absent. The
download goes to a temporary file first: a failed one leaves nothing behind.
"""

import sys
from pathlib import Path

from ._util import UsageError

URL = "https://dl.fbaipublicfiles.com/DiT/models/{}"
FOLDER = Path("pretrained_models")
PRETRAINED = {  # file name -> (model, image size)
    "DiT-XL-2-256x256.pt": ("DiT-XL/2", 256),
    "DiT-XL-2-512x512.pt": ("DiT-XL/2", 512),
}


def name_for(model, image_size):
    """The pretrained checkpoint of `model` at `image_size`, or a UsageError listing the ones there are."""
    for name, config in PRETRAINED.items():
        if config == (model, image_size):
            return name
    there = " and ".join(f"{m} at --image-size {s}" for m, s in PRETRAINED.values())
    raise UsageError(
        f"without --ckpt fastdit samples one of DiT's pretrained models, {there} (as DiT's sample.py); "
        f"there is none for {model} at --image-size {image_size}: give --ckpt"
    )


def named(path):
    """The pretrained checkpoint that `path` names, or None: one of PRETRAINED, as a bare name or as an
    existing file of that name."""
    p = Path(path)
    return p.name if p.name in PRETRAINED and (p.is_file() or p.name == str(path)) else None


def fetch(name, download=True):
    """The local path of pretrained checkpoint `name`: FOLDER/name, downloaded first if absent (with
    download=False, a UsageError instead: a rank that waits for another to download)."""
    path = FOLDER / name
    if path.is_file():
        return path
    url = URL.format(name)
    if not download:
        raise UsageError(f"{path} is missing: the download of {url} failed on the rank that made it")
    import torch.hub

    made_folder = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading DiT's pretrained {name} from {url} to {path}", file=sys.stderr)
    try:
        torch.hub.download_url_to_file(url, str(path), progress=True)  # via a temporary file: nothing partial
    except Exception as e:  # offline, refused, interrupted: say what to do instead
        if made_folder and not any(path.parent.iterdir()):
            path.parent.rmdir()
        raise UsageError(
            f"could not download {url} ({type(e).__name__}: {e}); put the file at {path} yourself, or give "
            f"--ckpt another checkpoint"
        ) from e
    return path
