"""`fastdit fid`: FID, sFID, Inception Score, precision and recall of generated images, as ADM's evaluator
(guided-diffusion's evaluations/evaluator.py, which DiT's FID-50K numbers come from) computes them.

Features come from torch-fidelity's PyTorch port of the TensorFlow Inception-V3 graph that ADM's
evaluator runs (same weights, same TF1-style bilinear resize to 299x299): pool_3 (2048) for FID
and precision/recall, the unbiased logits for IS, and the first 7 channels of mixed_6/conv
(17 x 17 x 7 = 2023, in TF's NHWC order) for sFID. Its weights are torch-fidelity's own download
(into the torch hub cache) or a local file: --inception-weights FILE or $FASTDIT_INCEPTION_WEIGHTS.

Only torch-fidelity's Inception module is loaded, not its package __init__, which imports
torchvision for feature extractors and datasets fastdit does not use (and torchvision wheels often
do not match the installed torch). So torch-fidelity installs with `pip install --no-deps`.
"""

import argparse
import importlib
import importlib.util
import math
import os
import sys
import types
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from . import _args
from ._dist import pick_device
from ._util import UsageError, load_plain, to_uint8

INCEPTION_ENV = "FASTDIT_INCEPTION_WEIGHTS"
POOL_DIM = 2048  # pool_3's features
SPATIAL_CHANNELS = 7  # ADM: mixed_6/conv[..., :7]
IS_SPLIT = 5000  # ADM's split size for the Inception Score
PR_NEIGHBOURS = 3  # ADM's k for the precision / recall manifolds
METRICS = ("fid", "sfid", "is", "precision", "recall")


#################################################################################
#                       The Inception network (torch-fidelity)                  #
#################################################################################


def inception_class():
    """torch-fidelity's FeatureExtractorInceptionV3, imported without running torch_fidelity/__init__.py."""
    module = "torch_fidelity.feature_extractor_inceptionv3"
    if module not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None:
            raise UsageError("FID needs torch-fidelity's Inception-V3: pip install --no-deps torch-fidelity==0.4.0")
        shell = "torch_fidelity" not in sys.modules
        if shell:  # an empty package object: its submodules import, its __init__ (and torchvision) does not run
            package = types.ModuleType("torch_fidelity")
            package.__path__ = list(spec.submodule_search_locations)
            sys.modules["torch_fidelity"] = package
        try:
            importlib.import_module(module)
        finally:
            if shell:  # a later `import torch_fidelity` runs the real __init__, reusing the loaded submodules
                del sys.modules["torch_fidelity"]
    return sys.modules[module].FeatureExtractorInceptionV3


class Inception(torch.nn.Module):
    """uint8 images (N, 3, H, W) -> dict(pool (N, 2048), logits (N, 1008), spatial (N, 2023)), float32."""

    def __init__(self, weights=None):
        super().__init__()
        cls = inception_class()
        weights = weights or os.environ.get(INCEPTION_ENV) or None
        if weights is not None:
            load_plain(weights, "--inception-weights")  # refuses pickled objects before torch-fidelity's own torch.load
        try:
            self.net = cls("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights)
        except Exception as e:  # a failed download (offline), or a file whose weights do not fit
            raise UsageError(
                f"Inception-V3 weights: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Offline, give "
                f"the file torch-fidelity downloads (weights-inception-2015-12-05-6726825d.pth) with "
                f"--inception-weights FILE or ${INCEPTION_ENV}"
            ) from e
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)  # TF's mixed_6/conv
        self._spatial = None

    def _keep_spatial(self, module, inputs, output):
        # (N, 192, 17, 17) -> its first 7 channels in TF's (h, w, c) order, as ADM flattens them
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1).float()

    @torch.no_grad()
    def forward(self, images):
        pool, logits = self.net(images)
        return dict(pool=pool, logits=logits, spatial=self._spatial)


def features(images, net, batch_size, device, keys=("pool", "logits", "spatial"), progress=False, desc="inception"):
    """uint8 images (N, H, W, 3) (numpy) -> {key: float32 numpy (N, dim)}, batched on `device`."""
    from tqdm import tqdm

    out = {k: [] for k in keys}
    for lo in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, dynamic_ncols=True):
        x = torch.from_numpy(np.ascontiguousarray(images[lo : lo + batch_size])).to(device).permute(0, 3, 1, 2)
        feats = net(x)  # (B, 3, H, W) uint8 -> features
        for k in keys:
            out[k].append(feats[k].cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


#################################################################################
#                                  The metrics                                  #
#################################################################################


def statistics(feats):
    """(mean, covariance) in float64 of features (N, D), N >= 2: what ADM reference batches store as mu, sigma."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians, in float64.

    tr (S1 S2)^(1/2) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2),
    a symmetric PSD matrix with the same eigenvalues as S1 S2: no complex sqrtm is needed.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise UsageError(f"statistics of different shapes: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid_from_features(feats, mu, sigma):
    """The Frechet distance between features (N, D) and N(mu, sigma); the same as
    frechet_distance(*statistics(feats), mu, sigma).

    With N <= D (few samples: FID in the loop, tests) it avoids the D x D eigendecompositions:
    S^(1/2) sigma S^(1/2), with S = Xc^T Xc / (N - 1) of the centred features Xc, has the same
    nonzero eigenvalues as the N x N matrix Xc sigma Xc^T / (N - 1).
    """
    feats = np.asarray(feats, dtype=np.float64)
    n, d = feats.shape
    if n < 2:
        raise UsageError(f"FID needs at least 2 feature vectors, got {n}")
    if n > d:
        return frechet_distance(*statistics(feats), mu, sigma)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise UsageError(
            f"statistics of different shapes: features of dimension {d}, mu {mu.shape}, sigma {sigma.shape}"
        )
    mean = feats.mean(0)
    xc = feats - mean  # (N, D)
    gram = xc @ sigma @ xc.T / (n - 1)  # (N, N)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((gram + gram.T) / 2), 0, None)).sum()
    return float(np.sum((mean - mu) ** 2) + np.sum(xc**2) / (n - 1) + np.trace(sigma) - 2 * tr_covmean)


def inception_score(logits, split_size=IS_SPLIT):
    """ADM's (and improved-GAN's) Inception Score: exp(mean KL(p(y|x) || p(y))) per split of `split_size`, averaged."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    p = torch.softmax(logits, dim=1)
    scores = []
    for part in p.split(split_size):
        kl = (part * (part.clamp_min(1e-300).log() - part.mean(0, keepdim=True).log())).sum(1).mean()
        scores.append(math.exp(kl.item()))
    return float(np.mean(scores))


def _kth_radii(feats, k, block):
    """Distance of each row to its k-th nearest other row (ADM's manifold radius)."""
    radii = []
    for lo in range(0, len(feats), block):
        d = torch.cdist(feats[lo : lo + block], feats)  # (b, N)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the row itself is at distance 0
    return torch.cat(radii)


def _inside(points, centres, radii, block):
    """Whether each point lies within radius of some centre."""
    hit = []
    for lo in range(0, len(points), block):
        d = torch.cdist(points[lo : lo + block], centres)  # (b, M)
        hit.append((d <= radii[None, :]).any(1))
    return torch.cat(hit)


def precision_recall(ref, samples, k=PR_NEIGHBOURS, device="cpu", block=4096):
    """Improved precision and recall (Kynkäänniemi et al. 2019, as ADM): the share of samples inside the reference
    manifold (balls to each reference's k-th neighbour), and of references inside the samples' manifold."""
    ref = torch.as_tensor(np.asarray(ref), dtype=torch.float32, device=device)
    samples = torch.as_tensor(np.asarray(samples), dtype=torch.float32, device=device)
    if min(len(ref), len(samples)) <= k:
        raise UsageError(f"precision/recall need more than {k} images on each side, got {len(ref)} and {len(samples)}")
    r_ref, r_samples = _kth_radii(ref, k, block), _kth_radii(samples, k, block)
    precision = _inside(samples, ref, r_ref, block).double().mean().item()
    recall = _inside(ref, samples, r_samples, block).double().mean().item()
    return precision, recall


#################################################################################
#                             Samples and references                            #
#################################################################################


def check_images(arr, source):
    """ADM-format images: (N, H, W, 3) uint8 (or (N, H, W, 1), replicated to RGB; integers in 0..255 accepted)."""
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise UsageError(
            f"{source}: expected images (N, H, W, 3) (ADM's .npz format, as sample-ddp writes), got shape {arr.shape}"
        )
    if len(arr) < 2:
        raise UsageError(f"{source}: {len(arr)} image(s); FID needs at least 2")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer):
            lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0, 0)
            raise UsageError(
                f"{source}: expected uint8 pixels 0..255, got {arr.dtype} with values in [{lo:.3g}, "
                f"{hi:.3g}] (scale and round to uint8 first)"
            )
        if arr.min() < 0 or arr.max() > 255:
            raise UsageError(f"{source}: pixel values must be in 0..255, got [{arr.min()}, {arr.max()}] ({arr.dtype})")
        arr = arr.astype(np.uint8)
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


def _open_npz(path, what):
    with open(path, "rb") as f:  # np.load also unpickles, and reports any other bytes as a pickle
        if not f.read(6).startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")):
            raise UsageError(f"{what} {path}: not an .npz file (a zip of .npy arrays, as np.savez writes)")
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UsageError(f"{what} {path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    if not isinstance(f, np.lib.npyio.NpzFile):  # np.load reads a .npy file as one bare array
        raise UsageError(
            f"{what} {path}: a .npy array, not a .npz archive (ADM's format: np.savez(path, arr_0=images))"
        )
    return f


def _array(f, name, what, path):
    """Array `name` of an open .npz, read without unpickling: a missing, damaged or pickled one is a one-line error."""
    if name not in f.files:
        raise UsageError(f"{what} {path}: no {name} in it (its arrays: {', '.join(f.files) or 'none'})")
    try:
        return f[name]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UsageError(f"{what} {path}: its array {name} is not readable ({type(e).__name__}: {e})") from e


def load_npz_images(path, what="samples"):
    """arr_0 of an ADM-format .npz -> uint8 (N, H, W, 3)."""
    with _open_npz(path, what) as f:
        return check_images(_array(f, "arr_0", what, path), f"{what} {path} arr_0")


def load_folder_images(path, image_size):
    """Every image under a folder (any depth, any PIL mode), RGB, ADM center-cropped to image_size -> uint8
    (N, S, S, 3). Unreadable files are skipped with a warning naming each."""
    from .data import IMAGE_EXTENSIONS, UnreadableImage, read_uint8, warn_unreadable

    files = sorted(f for f in Path(path).rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
    images, skipped = [], 0
    for f in files:
        try:
            images.append(read_uint8(f, image_size, 3))
        except UnreadableImage as e:
            skipped += 1
            warn_unreadable(e, skipped)
    if len(images) < 2:
        raise UsageError(
            f"reference folder {path}: {len(images)} readable image(s) (extensions "
            f"{', '.join(IMAGE_EXTENSIONS)}); FID needs at least 2"
        )
    return np.stack(images)


STATS_SUFFIX = {"pool": "", "spatial": "_s"}  # ADM's reference batches: mu, sigma (pool_3); mu_s, sigma_s (spatial)


class Reference:
    """A reference for FID: an ADM reference batch .npz (its mu/sigma[, mu_s/sigma_s] statistics, and arr_0 images
    when present), an image .npz (arr_0), or a folder of images (center-cropped to image_size)."""

    def __init__(self, path, image_size=None):
        self.path, self.images, self.stats = str(path), None, {}
        p = Path(path)
        if p.is_dir():
            if image_size is None:
                raise UsageError(f"reference folder {path}: the image size to crop to is unknown")
            self.images = load_folder_images(p, image_size)
        elif p.is_file():
            self._read_npz(p)
        else:
            raise UsageError(
                f"reference {path!r} does not exist (give an ADM reference batch .npz, an image .npz or "
                f"a folder of images)"
            )

    def _read_npz(self, p):
        with _open_npz(p, "reference") as f:
            for dim, key in STATS_SUFFIX.items():
                if f"mu{key}" in f.files or f"sigma{key}" in f.files:
                    mu, sigma = (
                        np.asarray(_array(f, n, "reference", p), np.float64) for n in (f"mu{key}", f"sigma{key}")
                    )
                    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
                        raise UsageError(
                            f"reference {p}: mu{key} {mu.shape} and sigma{key} {sigma.shape} are not "
                            f"(D,) and (D, D) statistics"
                        )
                    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
                        raise UsageError(f"reference {p}: mu{key}/sigma{key} hold NaN or Inf")
                    self.stats[dim] = (mu, sigma)
            if "arr_0" in f.files:
                self.images = check_images(_array(f, "arr_0", "reference", p), f"reference {p} arr_0")
        if self.images is None and "pool" not in self.stats:
            raise UsageError(f"reference {p}: neither arr_0 images nor mu/sigma statistics in it")

    def stored_stats(self, feature, dim):
        """The stored (mu, sigma) of `feature` (pool | spatial), checked against the features' dimension `dim`."""
        mu, sigma = self.stats[feature]
        if len(mu) != dim:
            k = STATS_SUFFIX[feature]
            raise UsageError(
                f"reference {self.path}: mu{k}/sigma{k} are {len(mu)}-dimensional, but the Inception {feature} "
                f"features are {dim}-dimensional (ADM's reference batches: 2048 for mu, 2023 for mu_s)"
            )
        return mu, sigma


#################################################################################
#                                 fastdit fid                                   #
#################################################################################


FEATURE_OF = {"fid": "pool", "sfid": "spatial", "is": "logits", "precision": "pool", "recall": "pool"}


def evaluate(samples, reference, net, metrics=METRICS, batch_size=200, device="cpu", progress=False):
    """{metric: value} of uint8 sample images (N, H, W, 3) against a Reference, with the Inception `net`."""
    unknown = [m for m in metrics if m not in FEATURE_OF]
    if unknown or not metrics:
        raise UsageError(
            f"--metrics: unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METRICS)}"
        )
    pr = [m for m in metrics if m in ("precision", "recall")]
    # the metrics that need the reference's images: precision/recall, and FID/sFID without stored statistics
    need_images = pr + [m for m in ("fid", "sfid") if m in metrics and FEATURE_OF[m] not in reference.stats]
    if need_images and reference.images is None:
        possible = [m for m in ("fid", "sfid") if FEATURE_OF[m] in reference.stats]
        raise UsageError(
            f"reference {reference.path} holds statistics but no arr_0 images, which {', '.join(need_images)} "
            f"need: give --metrics {','.join(possible)}, or a reference with images"
        )
    stored = [FEATURE_OF[m] for m in ("fid", "sfid") if m in metrics and FEATURE_OF[m] in reference.stats]
    probe = features(samples[:2], net, 2, device, stored) if stored else {}  # a wrong D fails before the long pass
    ref_stats = {k: reference.stored_stats(k, probe[k].shape[1]) for k in stored}
    mine = features(
        samples, net, batch_size, device, sorted({FEATURE_OF[m] for m in metrics}), progress, desc="inception (samples)"
    )
    ref_keys = {FEATURE_OF[m] for m in need_images}
    theirs = (
        features(reference.images, net, batch_size, device, sorted(ref_keys), progress, desc="inception (reference)")
        if ref_keys
        else {}
    )
    out = {}
    for metric in ("fid", "sfid"):
        if metric in metrics:
            key = FEATURE_OF[metric]
            out[metric] = fid_from_features(
                mine[key], *(ref_stats[key] if key in ref_stats else statistics(theirs[key]))
            )
    if "is" in metrics:
        out["is"] = inception_score(mine["logits"])
    if pr:
        precision, recall = precision_recall(theirs["pool"], mine["pool"], device=device)
        out.update({m: v for m, v in (("precision", precision), ("recall", recall)) if m in pr})
    return out


def _metric_list(text):
    metrics = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in FEATURE_OF]
    if unknown or not metrics:
        raise argparse.ArgumentTypeError(
            f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METRICS)}"
        )
    return metrics


def add_arguments(p):
    p.add_argument("samples", help="sample .npz (arr_0: uint8 (N, H, W, 3), as `fastdit sample-ddp` writes)")
    p.add_argument(
        "ref",
        help="reference: an ADM reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz; its "
        "mu/sigma are used), an image .npz (arr_0), or a folder of images (center-cropped to "
        "the samples' size)",
    )
    p.add_argument(
        "--metrics",
        type=_metric_list,
        default=",".join(METRICS),
        help=f"comma-separated, from {', '.join(METRICS)} (default: all)",
    )
    p.add_argument("--batch-size", type=_args.positive, default=200, help="images per Inception forward; default 200")
    p.add_argument(
        "--inception-weights",
        help=f"local Inception-V3 weights file (default: ${INCEPTION_ENV}, else "
        f"torch-fidelity's download, cached in the torch hub folder)",
    )
    _args.add_device(p, per_rank=False)
    p.add_argument(
        "--out",
        type=_args.output_file((".json",), "the numbers"),
        help="also write the numbers to this .json file; default: print them only",
    )


def run(args):
    """fastdit fid: FID, sFID, Inception Score, precision and recall of a sample .npz against a reference, as ADM's
    evaluator computes them (the numbers DiT reports)."""
    import json

    from ._util import atomic_write

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not Path(args.samples).is_file():
        raise UsageError(f"samples {args.samples!r} is not a file (give the .npz `fastdit sample-ddp` wrote)")
    device = pick_device(args.device, 0)
    samples = load_npz_images(args.samples)
    reference = Reference(args.ref, image_size=samples.shape[1])
    net = Inception(args.inception_weights).to(device)
    results = evaluate(samples, reference, net, args.metrics, args.batch_size, device, progress=True)
    for name, value in results.items():
        print(f"{name:>9}: {value:.4f}")
    if args.out:
        record = dict(samples=str(args.samples), ref=str(args.ref), num_samples=len(samples), **results)
        atomic_write(args.out, lambda f: f.write(json.dumps(record, indent=1).encode()))
    return results


#################################################################################
#                         FID in the training loop                              #
#################################################################################


def gather_rows(rows, total, dist, device):
    """Rank r's rows (r, r + world, r + 2 world, ... of `total`) -> all `total` rows on every rank (a collective)."""
    full = torch.zeros(total, rows.shape[1], dtype=torch.float32, device=device)
    full[dist.rank :: dist.world_size] = rows.to(device, torch.float32)
    return dist.all_reduce_sum(full).cpu().numpy()


class FidMonitor:
    """FID of `num_samples` EMA samples against a reference, all ranks sampling and extracting features together.

    The reference statistics are computed once (or read from an ADM reference batch). Every call
    draws the same labels and noise (a fixed seed per rank), so successive FIDs differ by the
    model only.
    """

    def __init__(self, ref, num_samples, image_size, dist, device, seed=0, batch_size=64, weights=None):
        if num_samples < 2:
            raise UsageError(f"--fid-samples must be at least 2, got {num_samples}")
        self.num_samples, self.dist, self.device, self.seed, self.batch = num_samples, dist, device, seed, batch_size
        self.net = Inception(weights).to(device)
        reference = Reference(ref, image_size)
        if "pool" in reference.stats:
            self.ref_stats = reference.stored_stats("pool", POOL_DIM)
        else:
            mine = reference.images[dist.rank :: dist.world_size]  # each rank a share of the reference
            feats = [self._pool(mine[lo : lo + batch_size]) for lo in range(0, len(mine), batch_size)]
            self.ref_stats = statistics(gather_rows(torch.cat(feats), len(reference.images), dist, device))

    def _pool(self, images):
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        return self.net(x)["pool"]

    def __call__(self, sample, num_classes):
        """FID of the images sample(labels) makes ((N, C, H, W) in [-1, 1]); a collective call on every rank."""
        d = self.dist
        per_rank = -(-self.num_samples // d.world_size)
        mine = len(range(d.rank, self.num_samples, d.world_size))  # every rank samples per_rank, keeps `mine`
        feats = []
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            torch.manual_seed(self.seed * 1_000_003 + d.rank)
            for lo in range(0, per_rank, self.batch):
                n = min(self.batch, per_rank - lo)
                labels = torch.randint(0, num_classes, (n,), device=self.device)
                images = to_uint8(sample(labels))[: max(0, mine - lo)]  # (<= n, H, W, C)
                if len(images):
                    feats.append(self._pool(np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images))
        feats = torch.cat(feats) if feats else torch.zeros(0, 2048)
        return fid_from_features(gather_rows(feats, self.num_samples, d, self.device), *self.ref_stats)


def add_train_arguments(p):
    """`fastdit train`'s FID options."""
    p.add_argument(
        "--fid-every", type=_args.non_negative, help="FID of EMA samples every N steps and at the end; default 0 (off)"
    )
    p.add_argument(
        "--fid-ref",
        help="FID reference: an ADM reference batch .npz, an image .npz or a folder of "
        "images; required with --fid-every",
    )
    p.add_argument(
        "--fid-samples", type=_args.positive, help="EMA samples per FID, shared over the processes; default 10000"
    )


def fid_monitor(a, dist, device):
    """The FidMonitor of resolved `fastdit train` arguments, or None without --fid-every."""
    if not a.fid_every:
        return None
    if a.fid_ref is None:
        raise UsageError("--fid-every needs --fid-ref (an ADM reference batch .npz, an image .npz or a folder)")
    return FidMonitor(
        a.fid_ref, a.fid_samples, a.image_size, dist, device, a.seed, batch_size=a.global_batch_size // dist.world_size
    )
