"""FID, sFID, IS, precision/recall (fastdit/fid.py), `fastdit fid`, and FID in the training loop.

The metrics are judged against ADM's evaluator itself (guided-diffusion's evaluations/evaluator.py, the code DiT's
numbers come from): tests/data/adm_evaluator_golden.json holds its outputs on inputs the cases of
tests/data/make_adm_evaluator_golden.py draw again here; and against closed forms. The Inception network
is torch-fidelity's, with random weights injected as a local weights file through
$FASTDIT_INCEPTION_WEIGHTS (nothing downloaded), run at 75x75 instead of 299x299 to keep the CPU
suite fast (the network is fully convolutional; only the spatial feature's size changes).
"""

import importlib.util
import json
import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from _train_helpers import FAST, one_thread  # noqa: F401 (an autouse fixture)
from PIL import Image

from fastdit import fid, train
from fastdit._util import UsageError
from fastdit.cli import main as cli
from tests.data import make_adm_evaluator_golden as adm

ADM = json.loads(adm.GOLDEN.read_text())

needs_inception = pytest.mark.skipif(
    importlib.util.find_spec("torch_fidelity") is None,
    reason="torch-fidelity is not installed (pip install --no-deps torch-fidelity==0.4.0)",
)


def gaussian_pair(d, seed):
    """Two Gaussians whose covariances do not commute, and their means."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    return rng.standard_normal(d), a @ a.T / d + 0.1 * np.eye(d), rng.standard_normal(d), b @ b.T / d + 0.1 * np.eye(d)


def adm_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """ADM's evaluator (guided-diffusion evaluations/evaluator.py): scipy's sqrtm of sigma1 sigma2, retried with
    eps on the diagonals when not finite; an imaginary diagonal above 1e-3 is an error, else the real part."""
    from scipy import linalg

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    return np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def test_frechet_distance_matches_the_closed_form_and_scipy():
    rng = np.random.default_rng(0)
    d = 7
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    # Covariances with the same eigenvectors: sum (sqrt a - sqrt b)^2 exactly.
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(closed, rel=1e-10)
    mu1, s1, mu2, s2 = gaussian_pair(d, 1)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(adm_frechet_distance(mu1, s1, mu2, s2), rel=1e-9)
    # Singular covariances (fewer float32 features than dimensions, as a small FID in the loop has): still ADM's number.
    f1 = (rng.standard_normal((20, 48)) @ rng.standard_normal((48, 48))).astype(np.float32)
    f2 = rng.standard_normal((30, 48)).astype(np.float32) + 0.5
    (m1, c1), (m2, c2) = fid.statistics(f1), fid.statistics(f2)
    adm = adm_frechet_distance(m1, c1, m2, c2)
    assert fid.frechet_distance(m1, c1, m2, c2) == pytest.approx(adm, rel=1e-6)
    assert fid.fid_from_features(f1, m2, c2) == pytest.approx(adm, rel=1e-6)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)
    with pytest.raises(UsageError, match="statistics of different shapes"):
        fid.frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def test_gaussian_feature_sets_give_the_closed_form_distance_and_identical_sets_zero():
    mu1, s1, mu2, s2 = gaussian_pair(5, 2)
    rng = np.random.default_rng(3)
    f1 = rng.multivariate_normal(mu1, s1, 40_000)
    f2 = rng.multivariate_normal(mu2, s2, 40_000)
    exact = fid.frechet_distance(mu1, s1, mu2, s2)
    assert fid.frechet_distance(*fid.statistics(f1), *fid.statistics(f2)) == pytest.approx(exact, rel=0.03)
    assert abs(fid.frechet_distance(*fid.statistics(f1), *fid.statistics(f1))) < 1e-9
    # Few samples (N <= D) take the N x N route: the same number as the D x D one.
    few = f1[:4] * np.array([1, 2, 3, 4, 5])
    assert fid.fid_from_features(few, mu2, s2) == pytest.approx(
        fid.frechet_distance(*fid.statistics(few), mu2, s2), rel=1e-9
    )
    assert fid.fid_from_features(f1[:6], mu2, s2) == pytest.approx(
        fid.frechet_distance(*fid.statistics(f1[:6]), mu2, s2), rel=1e-9
    )
    assert abs(fid.fid_from_features(f1[:3], *fid.statistics(f1[:3]))) < 1e-9


def adm_inputs(cases, section, name, *keys):
    """A golden case's inputs drawn again, checked to be the bits ADM's evaluator was given (all of them, or `keys`)."""
    case = adm.draw(cases, name)
    arrays = [case[k] for k in keys] if keys else list(case.values())
    assert adm.digest(*arrays) == ADM[section][name]["inputs"], (
        f"{name}: this numpy draws other numbers than the one {adm.GOLDEN.name} was made with"
    )
    return case


def fid_tolerance(mine, ref, ranks):
    """How far two sound computations of ADM's FID can be apart. The means' term |mu1 - mu2|^2: for float32 means a
    float32 dot, which another BLAS sums in another order, each within D u sum(diff^2) of the exact dot (u: the means'
    unit roundoff; seen: 1e-7 apart, numpy 1.23 against 2.4). The trace term, eigenvalues here against scipy's Schur
    sqrtm in ADM, in float64: 1e-9 of tr S1 + tr S2 where S1 S2 is full rank (seen: 2e-15), plus, for each direction
    where it is singular (D minus the lower rank), twice the square root of rounding's noise on a zero eigenvalue,
    sqrt(D u64 |S1| |S2|) (seen: at most 1.5e-6, against tolerances of 6e-5 to 2e-4)."""
    (mu1, s1), (mu2, s2) = mine, ref
    s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)
    d = len(s1)
    diff = (mu1 - mu2).astype(np.float64)
    means = 2 * d * np.finfo(np.result_type(mu1, mu2)).eps / 2 * diff.dot(diff)
    singular = d - min(min(r, d) for r in ranks)
    noise = np.sqrt(d * np.finfo(np.float64).eps / 2 * np.linalg.norm(s1, 2) * np.linalg.norm(s2, 2))
    return means + 1e-9 * (np.trace(s1) + np.trace(s2)) + 2 * singular * noise


def fid_case(name):
    """(features, their statistics, the reference's statistics, the ranks of the two covariances) of a golden case."""
    case = adm_inputs(adm.FID_CASES, "fid", name)
    feats = case["features"]
    mine = fid.statistics(feats)
    ref = fid.statistics(case["ref"]) if "ref" in case else (case["mu"], case["sigma"])
    ranks = (len(feats) - 1, len(case["ref"]) - 1 if "ref" in case else len(case["mu"]))
    return feats, mine, ref, ranks


@pytest.mark.parametrize("name", [n for n, g in ADM["fid"].items() if not g["eps_path"]])
def test_fid_matches_adms_evaluator(name):
    """Awkward sets (fewer samples than dimensions, identical and near-identical sets, float32 means far from zero,
    float64 features, reference statistics stored in float32 or float64, D = 1, N = 2) through both routes:
    statistics then frechet_distance, and fid_from_features (its N x N route where N <= D)."""
    golden = ADM["fid"][name]
    feats, mine, ref, ranks = fid_case(name)
    # compute_statistics' mean is the same numpy call: the same bits, and its dtype carries into |mu1 - mu2|^2
    assert adm.digest(mine[0]) == golden["mean"], f"{name}: the mean is not ADM's ({mine[0].dtype})"
    assert [str(mine[0].dtype), str(np.asarray(ref[0]).dtype)] == golden["mu_dtypes"]
    tol = fid_tolerance(mine, ref, ranks)
    for route, got in (
        ("statistics", fid.frechet_distance(*mine, *ref)),
        ("features", fid.fid_from_features(feats, *ref)),
    ):
        assert abs(got - golden["fid"]) <= tol, (
            f"{name} ({route}): FID {got!r}, ADM's {golden['fid']!r}: {got - golden['fid']:.3g} apart, tolerance {tol:.3g}"
        )


@pytest.mark.parametrize("name", [n for n, g in ADM["fid"].items() if g["eps_path"]])
def test_where_adm_adds_eps_its_fid_is_that_of_the_offset_covariances(name):
    """Where scipy < 1.16's sqrtm fails on S1 S2 (here: each set holds another feature constant, a dead unit), ADM
    warns and takes sqrtm((S1 + eps I)(S2 + eps I)) with eps = 1e-6, keeping tr S1 + tr S2 unshifted: its FID is then
    that of the offset covariances less 2 D eps. fastdit gives the exact FID (as ADM does with scipy >= 1.16's
    sqrtm), 5e-3 (eps_path) and 4e-2 (eps_path_singular, 35 singular directions) above ADM's number."""
    golden = ADM["fid"][name]
    _, (mu1, s1), (mu2, s2), _ = fid_case(name)
    eps, d = 1e-6, len(mu1)
    shifted = (mu1, s1 + eps * np.eye(d)), (mu2, s2 + eps * np.eye(d))
    got = fid.frechet_distance(*shifted[0], *shifted[1]) - 2 * d * eps
    assert got == pytest.approx(golden["fid"], abs=fid_tolerance(*shifted, ranks=(d, d)))


@pytest.mark.parametrize("name", list(ADM["inception_score"]))
def test_inception_score_matches_adms_evaluator(name):
    """Splits of 5000 with a short last one (5123 logits: 5000 + 123; 37 in one short split; a last split of one
    image), near-certain predictions, uniform ones, float64 logits (ADM's softmax takes float32)."""
    golden = ADM["inception_score"][name]
    case = adm_inputs(adm.IS_CASES, "inception_score", name, "logits")
    got = fid.inception_score(case["logits"], case["split_size"])
    # ADM's arithmetic is float32 and so is fastdit's: equal here; 1e-6 (8 float32 ulps) leaves room for exp's last
    # bit on other CPUs and numpy builds. The float64 arithmetic fastdit had was 2e-6 off on 5123 logits.
    assert got == pytest.approx(golden["inception_score"], rel=1e-6), f"{name}: IS {got!r}"


# Its dot products come within 3e-9 (relative) of a float16 rounding boundary, closer than float32 sums in another
# order (another BLAS) are sure to be: one half ulp on a radius, one point on precision or recall may differ there.
# The other cases' features are multiples of 1/8 whose float32 sums are exact in any order: equal bit for bit.
PR_ORDER_SENSITIVE = {"float32_inception_scale"}


@pytest.mark.parametrize("name", list(ADM["precision_recall"]))
def test_precision_recall_match_adms_evaluator(name):
    """ADM's k = 3 manifolds with its float16 distances: ties, duplicated points (a point repeated past k: radius 0),
    half's overflow falling back to float32 in some blocks only, k + 1 points a side, batches of rows and columns
    that do not divide the sets."""
    golden = ADM["precision_recall"][name]
    case = adm_inputs(adm.PR_CASES, "precision_recall", name, "ref", "samples")
    batches = dict(row_batch=golden["row_batch"], col_batch=golden["col_batch"])
    got = fid.precision_recall(case["ref"], case["samples"], **batches)
    for side, want in (("ref", golden["ref_radii"]), ("samples", golden["sample_radii"])):
        radii = fid.manifold_radii(torch.from_numpy(case[side]), **batches)
        slack = 2.0**-10 * torch.tensor(want) if name in PR_ORDER_SENSITIVE else 0
        assert (radii - torch.tensor(want)).abs().le(slack).all(), f"{name}: {side} radii are not ADM's"
    slack = 1 / min(len(case["ref"]), len(case["samples"])) if name in PR_ORDER_SENSITIVE else 0
    want = golden["precision"], golden["recall"]
    assert all(abs(g - w) <= slack for g, w in zip(got, want)), f"{name}: precision, recall {got}, ADM's {want}"


@pytest.mark.parametrize("name", list(ADM["reader"]))
def test_batches_are_read_as_adms_evaluator_reads_them(name, tmp_path):
    """ADM's read_activations (arr_0: plain, compressed, Fortran-ordered) and read_statistics (mu, sigma, mu_s, sigma_s
    in their stored dtypes; mu_s/sigma_s only beside mu; none: computed from the images), for a reference and for a
    sample batch (ADM reads both alike)."""
    golden = ADM["reader"][name]
    path = adm.write_batch(tmp_path / f"{name}.npz", adm.draw(adm.READER_CASES, name))
    for batch in (fid.Reference(path), fid.Reference(path, what="samples", require_images=True)):
        assert adm.digest(batch.images) == golden["images"]
        stored = [adm.digest(*batch.stats[k]) for k in ("pool", "spatial") if k in batch.stats]
        assert stored == (golden["stats"] or []), f"{name} ({batch.what}): statistics {sorted(batch.stats)}"


def test_statistics_stored_in_the_samples_file_are_used_as_adm_uses_them(tmp_path):
    """A sample .npz with mu/sigma (and mu_s/sigma_s) gets FID and sFID from them, as ADM's evaluator does: a
    reference batch given as its own samples is at distance 0, where its images' features are not."""
    path = adm.write_batch(tmp_path / "batch.npz", adm.draw(adm.READER_CASES, "reference_batch"))
    net = lambda x: dict(pool=x.flatten(1)[:, :16].float(), spatial=x.flatten(1)[:, 16:28].float())  # noqa: E731
    samples, ref = fid.Reference(path, what="samples", require_images=True), fid.Reference(path)
    assert fid.evaluate(samples, ref, net, metrics=("fid", "sfid")) == pytest.approx(dict(fid=0, sfid=0), abs=1e-9)
    assert fid.evaluate(samples.images, ref, net, metrics=("fid",))["fid"] > 1


def test_gather_rows_interleaves_the_ranks_shares():
    class Rank:  # rank r of 3; the all-reduce of a real group sums the three ranks' buffers
        def __init__(self, r):
            self.rank, self.world_size, self.parts = r, 3, []

    feats = torch.arange(7 * 2, dtype=torch.float32).view(7, 2)
    buffers = []
    for r in range(3):
        rank = Rank(r)
        rank.all_reduce_sum = lambda t: buffers.append(t.clone()) or t
        fid.gather_rows(feats[r::3], 7, rank, "cpu")
    assert torch.equal(sum(buffers), feats)


def test_inception_score_and_precision_recall_closed_forms():
    k = 4
    confident = np.eye(k)[np.arange(96) % k] * 60.0  # sure of one class each, classes balanced
    assert fid.inception_score(confident) == pytest.approx(k, rel=1e-6)
    assert fid.inception_score(np.zeros((100, 10))) == pytest.approx(1.0)  # every prediction uniform
    assert fid.inception_score(confident, split_size=48) == pytest.approx(k, rel=1e-6)
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((60, 8))
    assert fid.precision_recall(ref, ref) == (1.0, 1.0)
    assert fid.precision_recall(ref, ref + 100.0) == (0.0, 0.0)
    # Samples covering half the reference cluster: precise, but recalling only part of it.
    half = ref[ref[:, 0] > 0]
    precision, recall = fid.precision_recall(ref, half)
    assert precision == 1.0 and 0.3 < recall < 0.9


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def sample_batch(path):
    return fid.Reference(path, what="samples", require_images=True)


def test_image_and_reference_files_give_clear_errors(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    for arrays, message in [
        (dict(arr_0=imgs[..., 0]), r"expected images \(N, H, W, 3\)"),
        (dict(arr_0=imgs.astype(np.float32) / 255), r"expected uint8 pixels 0..255, got float32 with values in \[0"),
        (dict(arr_0=imgs.astype(np.int64) * 2), r"pixel values must be in 0..255, got \[0, 5"),
        (dict(arr_0=imgs[:1]), "1 image"),
        (dict(images=imgs), r"no arr_0 in it \(its arrays: images\)"),
        (dict(arr_0=np.array([1, "a"], dtype=object)), r"its array arr_0 is not readable \(ValueError: Object arrays"),
    ]:
        with pytest.raises(UsageError, match=message):
            sample_batch(write_npz(tmp_path / "x.npz", **arrays))
    assert sample_batch(write_npz(tmp_path / "g.npz", arr_0=imgs[..., :1])).images.shape == (4, 8, 8, 3)  # gray -> RGB
    for junk, message in [(b"junk", "not an .npz file"), (b"PK\x03\x04junk", "not a readable .npz file")]:
        (tmp_path / "junk.npz").write_bytes(junk)
        with pytest.raises(UsageError, match=message):
            sample_batch(tmp_path / "junk.npz")
    np.save(tmp_path / "bare.npy", imgs)
    for read in (sample_batch, fid.Reference):
        with pytest.raises(UsageError, match=r"bare.npy: a .npy array, not a .npz archive"):
            read(tmp_path / "bare.npy")
    with pytest.raises(UsageError, match="does not exist"):
        fid.Reference(tmp_path / "missing.npz")
    with pytest.raises(UsageError, match=r"mu \(5,\) and sigma \(4, 4\) are not"):
        fid.Reference(write_npz(tmp_path / "r.npz", mu=np.zeros(5), sigma=np.eye(4)))
    with pytest.raises(UsageError, match=r"r.npz: no sigma in it \(its arrays: mu\)"):
        fid.Reference(write_npz(tmp_path / "r.npz", mu=np.zeros(5)))
    damaged = write_npz(tmp_path / "d.npz", arr_0=imgs)  # inverted pixels: the zip's CRC check fails on reading
    Path(damaged).write_bytes(Path(damaged).read_bytes().replace(imgs.tobytes(), (~imgs).tobytes()))
    with pytest.raises(UsageError, match=r"d.npz: its array arr_0 is not readable \(BadZipFile: Bad CRC-32"):
        fid.Reference(damaged)
    with pytest.raises(UsageError, match="neither arr_0 images nor mu/sigma"):
        fid.Reference(write_npz(tmp_path / "r.npz", other=np.zeros(3)))
    # Statistics without images, or of another dimension than the features: the file and the way out, before the
    # long feature pass. (A stand-in network: only the features' dimensions matter here.)
    net = lambda x: dict(pool=torch.zeros(len(x), 2048), spatial=torch.zeros(len(x), 2023))  # noqa: E731
    stats_only = fid.Reference(write_npz(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048)))
    with pytest.raises(UsageError, match=r"stats.npz holds statistics but no arr_0 images, which precision, recall"):
        fid.evaluate(imgs, stats_only, net, metrics=("fid", "precision", "recall"))
    assert fid.evaluate(imgs, stats_only, net, metrics=("fid",))["fid"] == pytest.approx(2048)
    for arrays, message in [
        (dict(arr_0=imgs, mu=np.zeros(64), sigma=np.eye(64)), r"small.npz: mu/sigma are 64-dimensional, but the Incep"),
        (
            dict(arr_0=imgs, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(63), sigma_s=np.eye(63)),
            r"small.npz: mu_s/sigma_s are 63-dimensional",
        ),
    ]:
        with pytest.raises(UsageError, match=message):
            fid.evaluate(imgs, fid.Reference(write_npz(tmp_path / "small.npz", **arrays)), net, ("fid", "sfid"))


def test_the_adm_reference_batch_reader(tmp_path):
    """A file of ADM's reference-batch format (VIRTUAL_imagenet256_labeled.npz): arr_0 images, mu/sigma (pool_3),
    mu_s/sigma_s (spatial)."""
    rng = np.random.default_rng(1)  # (the real file: D = 2048 and 2023; smaller here, the reader takes any D)
    mu, s, mu_s, s_s = rng.standard_normal(64), np.diag(rng.uniform(1, 2, 64)), rng.standard_normal(63), np.eye(63)
    imgs = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    ref = fid.Reference(write_npz(tmp_path / "VIRTUAL_fake.npz", arr_0=imgs, mu=mu, sigma=s, mu_s=mu_s, sigma_s=s_s))
    assert np.array_equal(ref.images, imgs) and set(ref.stats) == {"pool", "spatial"}
    np.testing.assert_array_equal(ref.stats["pool"][1], s)
    np.testing.assert_array_equal(ref.stats["spatial"][0], mu_s)
    stats_only = fid.Reference(write_npz(tmp_path / "stats.npz", mu=mu, sigma=s))
    assert stats_only.images is None and set(stats_only.stats) == {"pool"}


def random_inception_weights(path):
    """Random Inception-V3 weights in torch-fidelity's layout (He-normal convolutions keep activations O(1))."""
    cls = fid.inception_class()
    module = __import__(cls.__module__, fromlist=["_"])
    with (
        mock.patch.object(cls, "load_state_dict", lambda self, sd: None),
        mock.patch.object(module, "load_state_dict_from_url", lambda *a, **k: None),
    ):
        net = cls("random", ["2048"])
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    return random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pt")


@pytest.fixture
def small_inception(inception_weights, monkeypatch):
    monkeypatch.setenv(fid.INCEPTION_ENV, inception_weights)
    monkeypatch.setattr(fid.inception_class(), "INPUT_IMAGE_SIZE", 75)
    return inception_weights


@needs_inception
def test_fastdit_fid_cli(small_inception, tmp_path, capsys):
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    other = np.clip(samples.astype(int) // 2 + 60, 0, 255).astype(np.uint8)
    s, o = write_npz(tmp_path / "s.npz", arr_0=samples), write_npz(tmp_path / "o.npz", arr_0=other)
    out = tmp_path / "fid.json"
    assert cli(["fid", s, s, "--batch-size", "3", "--out", str(out)]) == 0
    same = json.loads(out.read_text())
    assert set(same) >= set(fid.METRICS) and same["num_samples"] == 8
    assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6 and same["precision"] == same["recall"] == 1.0
    assert 1 <= same["is"] < 1008 and "fid:" in capsys.readouterr().out
    assert cli(["fid", s, o, "--metrics", "fid,is", "--out", str(out)]) == 0
    differ = json.loads(out.read_text())
    assert differ["fid"] > 1e-3 and math.isfinite(differ["fid"]) and "sfid" not in differ
    # A folder of the same images as PNGs is the same reference as the .npz.
    (tmp_path / "ref").mkdir()
    for i, img in enumerate(samples):
        Image.fromarray(img).save(tmp_path / "ref" / f"{i}.png")
    assert cli(["fid", s, str(tmp_path / "ref"), "--metrics", "fid", "--out", str(out)]) == 0
    assert abs(json.loads(out.read_text())["fid"]) < 1e-6
    # Statistics stored in the reference are used as they are (ADM's reference batches): the samples' own give 0.
    net = fid.Inception()
    feats = fid.features(samples, net, 4, "cpu", keys=("pool", "spatial"))
    # sFID's features: the first 7 channels of mixed_6/conv (Mixed_6d's 1x1 branch), flattened in TF's (h, w, c) order
    seen = []
    net.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.append(o[:, :7].permute(0, 2, 3, 1)))
    assert torch.equal(net(torch.from_numpy(samples[:2]).permute(0, 3, 1, 2))["spatial"], seen[0].reshape(2, -1))
    mu, sigma = fid.statistics(feats["pool"])
    ref = write_npz(tmp_path / "adm.npz", arr_0=other, mu=mu, sigma=sigma)
    assert fid.evaluate(samples, fid.Reference(ref), net, metrics=("fid",))["fid"] == pytest.approx(0, abs=1e-6)
    capsys.readouterr()
    for argv, message in [
        (["fid", s, ref, "--metrics", "fid,xyz"], "unknown metric(s) xyz"),
        (["fid", str(tmp_path / "none.npz"), ref], "is not a file"),
        (["fid", s, ref, "--inception-weights", str(tmp_path / "none.pt")], "--inception-weights"),
    ]:
        assert cli(argv) == 2
        assert message in capsys.readouterr().err


@needs_inception
def test_fid_in_the_training_loop_on_the_digits(small_inception, tmp_path):
    """--fid-every on the digits: FID of the EMA samples at steps 2 and 3 (the end) in metrics.jsonl, and a
    loss curve with the FID beside it."""
    from fastdit._util import to_uint8
    from fastdit.data import DigitsDataset

    ref = write_npz(tmp_path / "digits.npz", arr_0=to_uint8(DigitsDataset().images[:40]))
    run = train.main(
        FAST
        + ["--steps", "3", "--fid-every", "2", "--fid-ref", ref, "--fid-samples", "6", "--out", str(tmp_path / "run")]
    )
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    fids = [r for r in records if r.get("event") == "fid"]
    assert [r["step"] for r in fids] == [2, 3] and all(math.isfinite(r["fid"]) and r["fid"] > 0 for r in fids)
    assert fids[0]["samples"] == 6 and fids[0]["cfg_scale"] == train.FID_CFG_SCALE
    width = Image.open(run.curve).size[0]
    plain = train.plot_loss_curve([r for r in records if r.get("event") != "fid"], tmp_path / "plain.png", "x")
    assert width > 1.5 * Image.open(plain).size[0]  # the FID panel beside the loss
    assert cli(["train", "--fid-every", "2"]) == 2  # needs --fid-ref
