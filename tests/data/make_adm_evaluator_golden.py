"""Generate tests/data/adm_evaluator_golden.json from ADM's evaluator (openai/guided-diffusion
evaluations/evaluator.py, the code DiT's FID-50K, sFID, IS, precision and recall come from).

    python -m venv /tmp/adm && /tmp/adm/bin/pip install numpy==1.23.5 scipy==1.9.3
    /tmp/adm/bin/python tests/data/make_adm_evaluator_golden.py GUIDED_DIFFUSION [--out tests/data/adm_evaluator_golden.json]

GUIDED_DIFFUSION is a clone of openai/guided-diffusion, or its bare git directory (the `fetch`
tool's mirror); evaluations/evaluator.py is read from commit ADM_COMMIT (below) and never committed
here. numpy 1.23 and scipy 1.9 are what the evaluator ran with when DiT was evaluated (late 2022):
its evaluate_pr uses np.bool, gone in numpy 1.24, and scipy.linalg.sqrtm was rewritten in 1.16 (the
old one fails on some singular products, which is what sends ADM down its eps path; the new one
does not). The golden records the versions it was made with.

The evaluator imports TensorFlow at the top; it is loaded here with stub tensorflow, requests and
tqdm modules and only its numpy code runs. Two pieces of it are TensorFlow graphs and are written
here in numpy, line by line: the softmax that turns logits into class probabilities
(_create_softmax_graph's tf.nn.softmax; fed logits directly, so the pool-to-logits matmul, part of
the Inception network, stays out) and DistanceBlock's pairwise distances (float16 with a float32
fallback), as TensorFlow runs them on a GPU (half sums and matmuls accumulate in float32).

The inputs are not stored: every case below draws its features from a numpy Generator seeded by
the case's name (the test draws them again), and the golden keeps the SHA-256 of what was drawn, so
a numpy whose streams changed is caught rather than compared against the wrong numbers. The test
imports this module for the recipes; nothing from guided-diffusion is needed at test time.
"""

import argparse
import contextlib
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import types
import warnings
from pathlib import Path

import numpy as np

ADM_COMMIT = "22e0df8183507e13a7813f8d38d51b072ca1e67c"
GOLDEN = Path(__file__).with_name("adm_evaluator_golden.json")
f16, f32, f64 = np.float16, np.float32, np.float64


#################################################################################
#                     The cases (shared with tests/test_fid.py)                 #
#################################################################################


def case_rng(name):
    return np.random.default_rng(list(name.encode()))


def relu_features(rng, n, d, shift=0.0, scale=1.0, dtype=f32):
    """Correlated, non-negative features with exact zeros, like Inception's (averages of ReLUs). Elementwise arithmetic
    only, so that every machine draws the same bits (a matmul's rounding depends on the BLAS)."""
    z = rng.standard_normal((n, d))
    x = z + rng.standard_normal((n, 1)) * rng.uniform(-1, 1, d) + 0.6 * np.roll(z, 1, axis=1)
    return (np.maximum(x + shift, 0) * scale).astype(dtype)


def _dead(features, dims):
    features[:, dims] = 0  # a unit that never fires in this set: a constant feature, a zero row/column of sigma
    return features


def _cov(x):
    """The covariance of rows x (N, D), elementwise (the same bits everywhere, unlike np.cov's BLAS product)."""
    xc = x - x.mean(0)
    return (xc[:, :, None] * xc[:, None, :]).sum(0) / (len(x) - 1)


def _stored_stats(features, mean_dtype):
    """A reference batch's mu, sigma (as an .npz stores them) of some features."""
    x = features.astype(f64)
    return dict(mu=x.mean(0).astype(mean_dtype), sigma=_cov(x))


# FID: `features` against `ref` features (both through ADM's compute_statistics), or against stored mu/sigma.
FID_CASES = {
    "full_rank": lambda r: dict(features=relu_features(r, 600, 64, 0.3), ref=relu_features(r, 800, 64, 0.5, 1.2)),
    "fewer_samples_than_dims": lambda r: dict(features=relu_features(r, 24, 96), ref=relu_features(r, 400, 96, 0.2)),
    "both_singular": lambda r: dict(features=relu_features(r, 30, 80), ref=relu_features(r, 50, 80, 0.4)),
    "identical": lambda r: dict(features=(f := relu_features(r, 300, 48)), ref=f),
    "identical_singular": lambda r: dict(features=(f := relu_features(r, 20, 64)), ref=f),
    "near_identical": lambda r: dict(
        features=(f := relu_features(r, 300, 48)), ref=f + f32(1e-3) * r.standard_normal(f.shape).astype(f32)
    ),
    # Different dead units in the two sets: scipy 1.9's sqrtm fails on the product and ADM retries with eps.
    "eps_path": lambda r: dict(
        features=_dead(relu_features(r, 40, 48), [3]), ref=_dead(relu_features(r, 60, 48, 0.2), [17])
    ),
    "eps_path_singular": lambda r: dict(
        features=_dead(relu_features(r, 30, 64), [1, 5]), ref=_dead(relu_features(r, 500, 64, 0.1), [9])
    ),
    # Means far from zero with small spreads: float32 means and a float32 |mu1 - mu2|^2 are far from float64 ones.
    "float32_offset": lambda r: dict(
        features=(1000 + 0.05 * r.standard_normal((3000, 16))).astype(f32),
        ref=(1000.01 + 0.05 * r.standard_normal((2000, 16))).astype(f32),
    ),
    "float64_features": lambda r: dict(
        features=relu_features(r, 200, 32, dtype=f64), ref=relu_features(r, 300, 32, 0.3, dtype=f64)
    ),
    "stored_float32_mean": lambda r: dict(
        features=relu_features(r, 500, 32), **_stored_stats(relu_features(r, 900, 32, 0.3), f32)
    ),
    "stored_float64_mean": lambda r: dict(
        features=relu_features(r, 500, 32), **_stored_stats(relu_features(r, 900, 32, 0.3), f64)
    ),
    "one_dim": lambda r: dict(
        features=r.standard_normal((50, 1)).astype(f32), ref=(2 + 3 * r.standard_normal((70, 1))).astype(f32)
    ),
    "two_samples": lambda r: dict(features=relu_features(r, 2, 8), ref=relu_features(r, 50, 8, 0.3)),
}


def _logits(r, n, c, peak, spread=2.0):
    """Inception-like logits: noise plus a confident class per image."""
    x = spread * r.standard_normal((n, c))
    x[np.arange(n), r.integers(0, c, n)] += peak
    return x.astype(f32)


# Inception Score: ADM's compute_inception_score(logits, split_size) (ADM's default split: 5000).
IS_CASES = {
    "two_splits_remainder": lambda r: dict(logits=_logits(r, 5123, 1008, 12.0), split_size=5000),
    "one_short_split": lambda r: dict(logits=_logits(r, 37, 10, 3.0), split_size=5000),
    "last_split_of_one": lambda r: dict(logits=_logits(r, 33, 20, 5.0), split_size=16),
    "confident": lambda r: dict(logits=_logits(r, 400, 50, 40.0, spread=0.5), split_size=128),
    "uniform": lambda r: dict(logits=np.zeros((12, 7), f32), split_size=5),
    "float64_logits": lambda r: dict(logits=_logits(r, 300, 30, 6.0).astype(f64) / 3, split_size=100),
}


def _dyadic(r, n, d, top=40):
    """Features that are multiples of 1/8 (ReLU'd, so many zeros): exact in float16, their float32 sums exact whatever
    the order, so half precision rounds them identically on every machine; close pairs tie once rounded."""
    return (np.maximum(r.integers(-top // 2, top, (n, d)), 0) / 8).astype(f32)


def _with_copies(r, x, n_copies, source=None):
    """x with some rows replaced by copies of rows of `source` (default: x itself): duplicates and exact matches."""
    source = x if source is None else source
    x = x.copy()
    x[r.choice(len(x), n_copies, replace=False)] = source[r.choice(len(source), n_copies)]
    return x


def _outliers(r, x, n_out, value=64.0):
    """A few rows whose squared norms overflow float16 (> 65504): ADM computes their blocks in float32."""
    x = x.copy()
    rows = r.choice(len(x), n_out, replace=False)
    x[rows, :20] = value
    return x


# Precision/recall: ADM's ManifoldEstimator (k = 3) with the given row/column batch sizes (ADM's: 10000).
PR_CASES = {
    "ties_and_duplicates": lambda r: dict(
        ref=(ref := _with_copies(r, _dyadic(r, 45, 32), 8)),
        samples=_with_copies(r, _dyadic(r, 38, 32), 6, source=ref),
        row_batch=16,
        col_batch=12,
    ),
    "point_repeated_past_k": lambda r: dict(
        ref=np.concatenate([np.repeat(_dyadic(r, 1, 16), 5, 0), _dyadic(r, 20, 16)]),
        samples=np.concatenate([np.repeat(_dyadic(r, 1, 16), 2, 0), _dyadic(r, 15, 16)]),
        row_batch=10000,
        col_batch=10000,
    ),
    # Features around 2 (norms ~ 250 against squared distances ~ 10: half precision's cancellation, many ties) and
    # rows that overflow half: their blocks alone are float32; neither all-half nor all-float32 gives ADM's numbers.
    "half_overflow_fallback": lambda r: dict(
        ref=_outliers(r, 2 + _dyadic(r, 46, 32, top=24), 3),
        samples=_outliers(r, 2 + _dyadic(r, 38, 32, top=24), 2, value=60.0),
        row_batch=16,
        col_batch=12,
    ),
    "float32_inception_scale": lambda r: dict(
        ref=relu_features(r, 300, 64, 0.1, 3.2),
        samples=relu_features(r, 260, 64, 0.15, 3.2),
        row_batch=64,
        col_batch=100,
    ),
    "k_plus_one_each": lambda r: dict(ref=_dyadic(r, 4, 8), samples=_dyadic(r, 4, 8), row_batch=3, col_batch=2),
}


def _images(r, n, size=8):
    return r.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _stats_arrays(r, d, suffix="", dtype=f64):
    return {f"mu{suffix}": r.standard_normal(d).astype(dtype), f"sigma{suffix}": _cov(r.standard_normal((2 * d, d)))}


# ADM-format batches (.npz): what ADM's read_activations (arr_0) and read_statistics (mu, sigma, mu_s, sigma_s) read.
READER_CASES = {
    "reference_batch": lambda r: dict(
        arrays=dict(arr_0=_images(r, 7), **_stats_arrays(r, 16), **_stats_arrays(r, 12, "_s"))
    ),
    "compressed_float32_means": lambda r: dict(
        arrays=dict(arr_0=_images(r, 5), **_stats_arrays(r, 16, dtype=f32), **_stats_arrays(r, 12, "_s", f32)),
        compressed=True,
    ),
    "fortran_order_images": lambda r: dict(arrays=dict(arr_0=np.asfortranarray(_images(r, 6)))),
    "images_only": lambda r: dict(arrays=dict(arr_0=_images(r, 4))),
    "spatial_without_pool": lambda r: dict(arrays=dict(arr_0=_images(r, 4), **_stats_arrays(r, 12, "_s"))),
}


def draw(cases, name):
    """The case's inputs, drawn from its own seeded Generator."""
    return cases[name](case_rng(name))


def write_batch(path, case):
    """An ADM-format .npz of a READER_CASES case."""
    (np.savez_compressed if case.get("compressed") else np.savez)(path, **case["arrays"])
    return path


def digest(*arrays):
    """SHA-256 of arrays' dtypes, shapes and C-order bytes."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.asarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


#################################################################################
#                ADM's evaluator, loaded without TensorFlow                     #
#################################################################################


def load_adm(guided_diffusion):
    """evaluations/evaluator.py at ADM_COMMIT as a module, with stub tensorflow / requests / tqdm modules."""
    path = Path(guided_diffusion)
    git_dir = path if (path / "objects").is_dir() else path / ".git"
    src = subprocess.run(
        ["git", f"--git-dir={git_dir}", "show", f"{ADM_COMMIT}:evaluations/evaluator.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    stubs = {n: types.ModuleType(n) for n in ("tensorflow", "tensorflow.compat", "tensorflow.compat.v1", "requests")}
    stubs["tensorflow"].compat, stubs["tensorflow.compat"].v1 = (
        stubs["tensorflow.compat"],
        stubs["tensorflow.compat.v1"],
    )
    stubs["tqdm"], stubs["tqdm.auto"] = types.ModuleType("tqdm"), types.ModuleType("tqdm.auto")
    stubs["tqdm.auto"].tqdm = lambda it, **kw: it
    stubs["tqdm"].auto = stubs["tqdm.auto"]
    saved = {n: sys.modules.get(n) for n in stubs}
    sys.modules.update(stubs)
    try:
        module = types.ModuleType("adm_evaluator")
        exec(compile(src, "evaluations/evaluator.py", "exec"), module.__dict__)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n)
            else:
                sys.modules[n] = m
    return module


def tf_softmax(logits):
    """_create_softmax_graph's `tf.nn.softmax(logits)` on its tf.float32 placeholder: max-shifted exp, normalised."""
    x = np.asarray(logits, dtype=f32)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class SoftmaxSession:
    """Stands in for the tf.Session in Evaluator.compute_inception_score: `sess.run(self.softmax, feed_dict=
    {self.softmax_input: acts})` returns the numpy softmax of the fed logits."""

    def run(self, fetch, feed_dict):
        (acts,) = feed_dict.values()
        return tf_softmax(acts)


def _batch_pairwise_distances(U, V):
    """evaluator.py's _batch_pairwise_distances(U, V) in U's dtype, each op rounded to it, as TF runs it on a GPU:
    norm_u = tf.reduce_sum(tf.square(U), 1) (squares rounded, summed in float32 for halves), the same for V,
    D = tf.maximum(norm_u - 2 * tf.matmul(U, V, False, True) + norm_v, 0.0) (matmul accumulating in float32)."""
    norm_u = np.sum(np.square(U), axis=1, dtype=f32).astype(U.dtype)
    norm_v = np.sum(np.square(V), axis=1, dtype=f32).astype(V.dtype)
    norm_u = norm_u.reshape([-1, 1])
    norm_v = norm_v.reshape([1, -1])
    matmul = (U.astype(f32) @ V.astype(f32).T).astype(U.dtype)
    return np.maximum(norm_u - U.dtype.type(2) * matmul + norm_v, U.dtype.type(0))


class NumpyDistanceBlock:
    """DistanceBlock (evaluator.py) with its TensorFlow graph in numpy; the same methods ManifoldEstimator calls."""

    def __init__(self, session):
        self.session = session

    def _distance_block(self, U, V):
        # The placeholders are tf.float32: what is fed is float32 before the cast to float16.
        U, V = np.asarray(U, dtype=f32), np.asarray(V, dtype=f32)
        # distance_block_16 = _batch_pairwise_distances(tf.cast(U, tf.float16), tf.cast(V, tf.float16))
        with np.errstate(over="ignore", invalid="ignore"):  # silent in TF: inf, and NaN from inf - inf
            distance_block_16 = _batch_pairwise_distances(U.astype(f16), V.astype(f16))
        # tf.cond(tf.reduce_all(tf.math.is_finite(distance_block_16)), cast to float32, the float32 distances)
        if np.all(np.isfinite(distance_block_16)):
            return distance_block_16.astype(f32)
        return _batch_pairwise_distances(U, V)

    def pairwise_distances(self, U, V):
        return self._distance_block(U, V)

    def less_thans(self, batch_1, radii_1, batch_2, radii_2):
        # dist32 = tf.cast(self.distance_block, tf.float32)[..., None]
        dist32 = self._distance_block(batch_1, batch_2).astype(f32)[..., None]
        # self._batch_1_in = tf.math.reduce_any(dist32 <= self._radii2, axis=1)
        batch_1_in = np.any(dist32 <= np.asarray(radii_2, f32), axis=1)
        # self._batch_2_in = tf.math.reduce_any(dist32 <= self._radii1[:, None], axis=0)
        batch_2_in = np.any(dist32 <= np.asarray(radii_1, f32)[:, None], axis=0)
        return [batch_1_in, batch_2_in]


#################################################################################
#                                  The golden                                   #
#################################################################################


def fid_golden(adm):
    evaluator = object.__new__(adm.Evaluator)  # compute_statistics and frechet_distance are numpy only
    out = {}
    for name in FID_CASES:
        case = draw(FID_CASES, name)
        mine = evaluator.compute_statistics(case["features"])
        ref = (
            evaluator.compute_statistics(case["ref"]) if "ref" in case else adm.FIDStatistics(case["mu"], case["sigma"])
        )
        record = dict(
            seed=name,
            shapes={k: list(np.shape(v)) for k, v in case.items()},
            inputs=digest(*case.values()),
            mean=digest(mine.mu),  # compute_statistics' np.mean: the same bits wherever numpy sums rows in order
            mu_dtypes=[str(mine.mu.dtype), str(ref.mu.dtype)],
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                record["fid"] = float(mine.frechet_distance(ref))
            except ValueError as e:  # "Imaginary component ..."
                record["error"] = str(e)
        record["eps_path"] = any("singular product" in str(w.message) for w in caught)
        out[name] = record
    return out


def is_golden(adm):
    evaluator = object.__new__(adm.Evaluator)
    evaluator.sess, evaluator.softmax_batch_size = SoftmaxSession(), 512
    evaluator.softmax = evaluator.softmax_input = None  # the fetch and the placeholder: keys only
    out = {}
    for name in IS_CASES:
        case = draw(IS_CASES, name)
        with warnings.catch_warnings(record=True):  # log(0) of an underflowed probability: NaN, kept
            warnings.simplefilter("always")
            score = evaluator.compute_inception_score(case["logits"], split_size=case["split_size"])
        out[name] = dict(
            seed=name,
            shape=list(case["logits"].shape),
            inputs=digest(case["logits"]),
            split_size=case["split_size"],
            inception_score=score,
        )
    return out


def pr_golden(adm):
    adm.DistanceBlock = NumpyDistanceBlock  # ManifoldEstimator builds its DistanceBlock(session) in __init__
    out = {}
    for name in PR_CASES:
        case = draw(PR_CASES, name)
        estimator = adm.ManifoldEstimator(None, row_batch_size=case["row_batch"], col_batch_size=case["col_batch"])
        evaluator = object.__new__(adm.Evaluator)
        evaluator.manifold_estimator = estimator
        precision, recall = evaluator.compute_prec_recall(case["ref"], case["samples"])
        out[name] = dict(
            seed=name,
            shapes=[list(case["ref"].shape), list(case["samples"].shape)],
            inputs=digest(case["ref"], case["samples"]),
            row_batch=case["row_batch"],
            col_batch=case["col_batch"],
            precision=precision,
            recall=recall,
            # ADM's k-th neighbour (squared) distances, as float32 values
            ref_radii=[float(x) for x in estimator.manifold_radii(case["ref"])[:, 0]],
            sample_radii=[float(x) for x in estimator.manifold_radii(case["samples"])[:, 0]],
        )
    return out


def reader_golden(adm, folder):
    evaluator = object.__new__(adm.Evaluator)
    evaluator.batch_size = 3  # read_activations' batches: a short last one
    evaluator.compute_activations = lambda batches: [np.concatenate(list(batches))]  # the images it would feed
    evaluator.compute_statistics = lambda activations: None  # what read_statistics computes when nothing is stored
    out = {}
    for name in READER_CASES:
        case = draw(READER_CASES, name)
        path = write_batch(Path(folder) / f"{name}.npz", case)
        (images,) = evaluator.read_activations(str(path))
        stats = evaluator.read_statistics(str(path), (images, images))
        stored = None if stats == (None, None) else [(s.mu, s.sigma) for s in stats]
        out[name] = dict(
            seed=name,
            arrays={k: [str(v.dtype), list(v.shape)] for k, v in case["arrays"].items()},
            images=digest(images),
            # read_statistics: the stored (pool, spatial) statistics, or null where it computes them from the images
            stats=None if stored is None else [digest(mu, sigma) for mu, sigma in stored],
        )
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("guided_diffusion", help="a clone (or bare git directory) of openai/guided-diffusion")
    p.add_argument("--out", default=str(GOLDEN))
    args = p.parse_args()
    import scipy

    adm = load_adm(args.guided_diffusion)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        golden = dict(
            source=f"openai/guided-diffusion@{ADM_COMMIT} evaluations/evaluator.py",
            versions=dict(python=sys.version.split()[0], numpy=np.__version__, scipy=scipy.__version__),
            fid=fid_golden(adm),
            inception_score=is_golden(adm),
            precision_recall=pr_golden(adm),
            reader=reader_golden(adm, tmp),
        )
    Path(args.out).write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
