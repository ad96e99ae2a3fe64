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
PR_BATCH = 10000  # ADM's row and column batch sizes for the pairwise distances
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
    """(mean, covariance) of features (N, D), N >= 2, as ADM's evaluator computes them (and its reference batches store
    as mu, sigma): np.mean in the features' own dtype (float32 for Inception's), np.cov in float64."""
    feats = np.asarray(feats)
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def _mean_term(mu1, mu2):
    """|mu1 - mu2|^2 in the means' common dtype, as ADM takes it (float32 means: a float32 difference and dot)."""
    diff = mu1 - mu2
    return diff.dot(diff)


def _floating(a):
    a = np.asarray(a)
    return a if np.issubdtype(a.dtype, np.floating) else a.astype(np.float64)


def _tr_sqrt(m):
    """The sum of the square roots of the eigenvalues of a symmetric PSD matrix (rounding's negative ones as 0)."""
    return np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians, as ADM's FIDStatistics.frechet_distance
    (the means' term in their own dtype, the rest in float64).

    tr (S1 S2)^(1/2) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), a symmetric PSD
    matrix with the same eigenvalues as S1 S2: no complex sqrtm is needed. ADM takes scipy's sqrtm of S1 S2; the two
    agree to rounding (tests/test_fid.py), except where scipy < 1.16's sqrtm fails on a singular product (two sets
    holding different features constant) and ADM retries with 1e-6 added to both diagonals: its FID is then lower
    by about 2 sqrt(1e-6 v) for each direction one covariance lacks (v: the other's variance there), 5e-3 to 4e-2 in
    tests/test_fid.py. This is the exact distance, which ADM gives with scipy >= 1.16.
    """
    mu1, mu2 = np.atleast_1d(_floating(mu1)), np.atleast_1d(_floating(mu2))
    s1, s2 = np.atleast_2d(_floating(sigma1)), np.atleast_2d(_floating(sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise UsageError(f"statistics of different shapes: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    a, b = s1.astype(np.float64), s2.astype(np.float64)
    w, v = np.linalg.eigh((a + a.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return float(_mean_term(mu1, mu2) + np.trace(s1) + np.trace(s2) - 2 * _tr_sqrt(root1 @ b @ root1))


def fid_from_features(feats, mu, sigma):
    """The Frechet distance between features (N, D) and N(mu, sigma); the same as
    frechet_distance(*statistics(feats), mu, sigma).

    With N <= D (few samples: FID in the loop, tests) it avoids the D x D eigendecompositions:
    S^(1/2) sigma S^(1/2), with S = Xc^T Xc / (N - 1) of the centred features Xc, has the same
    nonzero eigenvalues as the N x N matrix Xc sigma Xc^T / (N - 1).
    """
    feats = _floating(feats)
    n, d = feats.shape
    if n < 2:
        raise UsageError(f"FID needs at least 2 feature vectors, got {n}")
    if n > d:
        return frechet_distance(*statistics(feats), mu, sigma)
    mu, sigma = _floating(mu), _floating(sigma)
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise UsageError(
            f"statistics of different shapes: features of dimension {d}, mu {mu.shape}, sigma {sigma.shape}"
        )
    x = feats.astype(np.float64)
    xc = x - x.mean(0)  # (N, D), centred as np.cov centres
    gram = xc @ sigma.astype(np.float64) @ xc.T / (n - 1)  # (N, N)
    return float(
        _mean_term(np.mean(feats, axis=0), mu) + np.sum(xc**2) / (n - 1) + np.trace(sigma) - 2 * _tr_sqrt(gram)
    )


def inception_score(logits, split_size=IS_SPLIT):
    """ADM's (and improved-GAN's) Inception Score: exp(mean KL(p(y|x) || p(y))) per split of `split_size` images (the
    last one shorter when N is not a multiple), averaged. In float32 throughout, as ADM's TensorFlow softmax and numpy
    arithmetic run; only where a probability underflows to 0 does ADM give NaN (log 0) and this 0 log 0 = 0."""
    x = np.asarray(logits, dtype=np.float32)
    if x.ndim != 2 or not x.size:
        raise UsageError(f"Inception Score: expected logits (N, classes) with N >= 1, got shape {x.shape}")
    e = np.exp(x - x.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)  # (N, classes) float32
    scores = []
    for lo in range(0, len(p), split_size):
        part = p[lo : lo + split_size]
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True))), 0)
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def squared_distances(u, v):
    """Squared Euclidean distances (len(u), len(v)), float32, as ADM's DistanceBlock computes them: in float16 (the
    features, their squares, norms, dot products and each sum rounded to half; sums and matmuls accumulating in
    float32, as TensorFlow runs them on a GPU), so that pairs closer than half's precision tie; in float32 when any
    half result of the block overflows."""
    d = _norm_expansion(u.half(), v.half())
    if not torch.isfinite(d).all():
        d = _norm_expansion(u.float(), v.float())
    return d.float()


def _norm_expansion(u, v):
    """max(|u|^2 - 2 u.v + |v|^2, 0) in u's dtype, every operation rounded to it."""
    norm_u = (u * u).sum(1, dtype=torch.float32).to(u.dtype)  # (b1,)
    norm_v = (v * v).sum(1, dtype=torch.float32).to(v.dtype)  # (b2,)
    uv = (u.float() @ v.float().T).to(u.dtype)  # (b1, b2); products of halves are exact in float32 (and in TF32)
    return (norm_u[:, None] - 2 * uv + norm_v[None, :]).clamp_min(0)


def manifold_radii(feats, k=PR_NEIGHBOURS, row_batch=PR_BATCH, col_batch=PR_BATCH):
    """Each row's squared distance to its k-th nearest row, itself the 0th (ADM's ManifoldEstimator.manifold_radii),
    over blocks of row_batch x col_batch distances (ADM's batch sizes, which decide where float32 takes over)."""
    radii = []
    for lo in range(0, len(feats), row_batch):
        rows = feats[lo : lo + row_batch]
        d = torch.cat([squared_distances(rows, feats[c : c + col_batch]) for c in range(0, len(feats), col_batch)], 1)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # (b,): the (k+1)-th smallest of the row, itself included
    return torch.cat(radii)


def precision_recall(ref, samples, k=PR_NEIGHBOURS, device="cpu", row_batch=PR_BATCH, col_batch=PR_BATCH):
    """Improved precision and recall (Kynkäänniemi et al. 2019) as ADM's evaluator computes them: the share of samples
    within some reference's k-th-neighbour ball, and of references within some sample's, the distances as ADM's
    DistanceBlock takes them (float16, see squared_distances) in its blocks of row_batch references x col_batch
    samples."""
    for name, size in (("row_batch", row_batch), ("col_batch", col_batch)):
        if size < 1:
            raise UsageError(f"precision/recall: {name} must be at least 1, got {size}")
    ref = torch.as_tensor(np.asarray(ref), dtype=torch.float32, device=device)
    samples = torch.as_tensor(np.asarray(samples), dtype=torch.float32, device=device)
    if min(len(ref), len(samples)) <= k:
        raise UsageError(f"precision/recall need more than {k} images on each side, got {len(ref)} and {len(samples)}")
    r_ref, r_samples = (manifold_radii(x, k, row_batch, col_batch) for x in (ref, samples))
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    samples_in = torch.zeros(len(samples), dtype=torch.bool, device=device)
    for lo in range(0, len(ref), row_batch):
        for c in range(0, len(samples), col_batch):
            d = squared_distances(ref[lo : lo + row_batch], samples[c : c + col_batch])  # (b1, b2)
            ref_in[lo : lo + row_batch] |= (d <= r_samples[None, c : c + col_batch]).any(1)
            samples_in[c : c + col_batch] |= (d <= r_ref[lo : lo + row_batch, None]).any(0)
    return samples_in.double().mean().item(), ref_in.double().mean().item()


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
    """An ADM-format batch, read as ADM's evaluator reads both of its batches (read_activations, read_statistics):
    arr_0 images, and stored statistics mu/sigma (pool_3) with mu_s/sigma_s (spatial) beside them, kept in their
    stored dtype (ADM reads mu_s/sigma_s only where mu is there, and ignores them otherwise). Or, as a reference only,
    a folder of images (center-cropped to image_size). `what` names the batch in errors; require_images: arr_0 must
    be there (a sample batch)."""

    def __init__(self, path, image_size=None, what="reference", require_images=False):
        self.path, self.what, self.images, self.stats = str(path), what, None, {}
        p = Path(path)
        if p.is_dir():
            if image_size is None:
                raise UsageError(f"{what} folder {path}: the image size to crop to is unknown")
            self.images = load_folder_images(p, image_size)
        elif p.is_file():
            self._read_npz(p, require_images)
        else:
            raise UsageError(
                f"{what} {path!r} does not exist (give an ADM reference batch .npz, an image .npz or "
                f"a folder of images)"
            )

    def _read_npz(self, p, require_images):
        what = self.what
        with _open_npz(p, what) as f:
            for dim, key in STATS_SUFFIX.items():
                if dim != "pool" and "pool" not in self.stats:
                    break  # ADM: no mu, no stored statistics at all
                if f"mu{key}" in f.files or f"sigma{key}" in f.files:
                    mu, sigma = (_floating(_array(f, n, what, p)) for n in (f"mu{key}", f"sigma{key}"))
                    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
                        raise UsageError(
                            f"{what} {p}: mu{key} {mu.shape} and sigma{key} {sigma.shape} are not "
                            f"(D,) and (D, D) statistics"
                        )
                    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
                        raise UsageError(f"{what} {p}: mu{key}/sigma{key} hold NaN or Inf")
                    self.stats[dim] = (mu, sigma)
            if require_images or "arr_0" in f.files:
                self.images = check_images(_array(f, "arr_0", what, p), f"{what} {p} arr_0")
        if self.images is None and "pool" not in self.stats:
            raise UsageError(f"{what} {p}: neither arr_0 images nor mu/sigma statistics in it")

    def stored_stats(self, feature, dim):
        """The stored (mu, sigma) of `feature` (pool | spatial), checked against the features' dimension `dim`."""
        mu, sigma = self.stats[feature]
        if len(mu) != dim:
            k = STATS_SUFFIX[feature]
            raise UsageError(
                f"{self.what} {self.path}: mu{k}/sigma{k} are {len(mu)}-dimensional, but the Inception {feature} "
                f"features are {dim}-dimensional (ADM's reference batches: 2048 for mu, 2023 for mu_s)"
            )
        return mu, sigma


#################################################################################
#                                 fastdit fid                                   #
#################################################################################


FEATURE_OF = {"fid": "pool", "sfid": "spatial", "is": "logits", "precision": "pool", "recall": "pool"}


def evaluate(samples, reference, net, metrics=METRICS, batch_size=200, device="cpu", progress=False):
    """{metric: value} of the samples against a Reference, with the Inception `net`. The samples: uint8 images
    (N, H, W, 3), or a Reference of them, whose stored statistics FID and sFID then take (as ADM's evaluator does)."""
    unknown = [m for m in metrics if m not in FEATURE_OF]
    if unknown or not metrics:
        raise UsageError(
            f"--metrics: unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METRICS)}"
        )
    own = samples if isinstance(samples, Reference) else None
    images = own.images if own else samples
    pr = [m for m in metrics if m in ("precision", "recall")]
    # the metrics that need the reference's images: precision/recall, and FID/sFID without stored statistics
    need_images = pr + [m for m in ("fid", "sfid") if m in metrics and FEATURE_OF[m] not in reference.stats]
    if need_images and reference.images is None:
        possible = [m for m in ("fid", "sfid") if FEATURE_OF[m] in reference.stats]
        raise UsageError(
            f"reference {reference.path} holds statistics but no arr_0 images, which {', '.join(need_images)} "
            f"need: give --metrics {','.join(possible)}, or a reference with images"
        )
    distances = [FEATURE_OF[m] for m in ("fid", "sfid") if m in metrics]
    ref_stored = [k for k in distances if k in reference.stats]
    own_stored = [k for k in distances if own and k in own.stats]
    probed = sorted(set(ref_stored + own_stored))
    probe = features(images[:2], net, 2, device, probed) if probed else {}  # a wrong D fails before the long pass
    ref_stats = {k: reference.stored_stats(k, probe[k].shape[1]) for k in ref_stored}
    own_stats = {k: own.stored_stats(k, probe[k].shape[1]) for k in own_stored}
    keys = sorted({FEATURE_OF[m] for m in metrics if m not in ("fid", "sfid") or FEATURE_OF[m] not in own_stats})
    mine = features(images, net, batch_size, device, keys, progress, desc="inception (samples)") if keys else {}
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
            ref = ref_stats[key] if key in ref_stats else statistics(theirs[key])
            out[metric] = (
                frechet_distance(*own_stats[key], *ref) if key in own_stats else fid_from_features(mine[key], *ref)
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
    p.add_argument(
        "samples",
        help="sample .npz (arr_0: uint8 (N, H, W, 3), as `fastdit sample-ddp` writes; mu/sigma stored in it are "
        "used for FID, as ADM's evaluator uses them)",
    )
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
    samples = Reference(args.samples, what="samples", require_images=True)
    reference = Reference(args.ref, image_size=samples.images.shape[1])
    net = Inception(args.inception_weights).to(device)
    results = evaluate(samples, reference, net, args.metrics, args.batch_size, device, progress=True)
    for name, value in results.items():
        print(f"{name:>9}: {value:.4f}")
    if args.out:
        record = dict(samples=str(args.samples), ref=str(args.ref), num_samples=len(samples.images), **results)
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
