"""tilted_priors.models.metrics: MSE, the Fréchet distance against the Gaussian closed form, the cached feature net, log-mean-exp."""
import os

import numpy as np
import pytest
import scipy.linalg

import sklearn.neural_network

from tilted_priors.models.metrics import (
    FeatureNet,
    frechet_distance,
    frechet_distance_from_features,
    log_mean_exp,
    reconstruction_mse,
    summarize_log_likelihood,
    train_feature_net,
)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------

def exact_frechet(m1, s1, m2, s2):
    """Closed form for Gaussians, computed independently of the module: Tr((S1 S2)^{1/2}) from the eigenvalues of
    the symmetric matrix S1^{1/2} S2 S1^{1/2} (same spectrum as S1 S2)."""
    val, vec = np.linalg.eigh(s1)
    r = (vec * np.sqrt(np.clip(val, 0.0, None))) @ vec.T
    lam = np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0.0, None)
    return float(np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * np.sum(np.sqrt(lam)))


def gaussian(rng, mean, cov, n):
    return rng.multivariate_normal(mean, cov, size=n)


def blob_images(n_per_class, seed, noise=0.3, size=8):
    """Three classes of 8x8 images in [-1, 1]: a bright 3x3 blob at a class-specific place on a dark background."""
    rng = np.random.default_rng(seed)
    centres = [(1, 1), (1, 6), (6, 3)]
    y = np.repeat(np.arange(3), n_per_class)
    x = np.full((len(y), size, size, 1), -1.0)
    for k, (r, c) in enumerate(centres):
        x[y == k, r - 1:r + 2, c - 1:c + 2, 0] = 1.0
    x = np.clip(x + noise * rng.normal(size=x.shape), -1.0, 1.0)
    perm = rng.permutation(len(y))
    return x[perm].astype(np.float32), y[perm]


SMALL = dict(hidden=(32, 8), max_iter=60)


@pytest.fixture(scope="module")
def blobs():
    x, y = blob_images(100, seed=0)
    return x, y


@pytest.fixture(scope="module")
def blob_net(blobs):
    x, y = blobs
    return train_feature_net(x, y, **SMALL)


# ---------------------------------------------------------------------------------------------------------------
# reconstruction MSE
# ---------------------------------------------------------------------------------------------------------------

def test_mse_known_values():
    x = np.arange(8.0).reshape(2, 2, 2, 1)
    assert reconstruction_mse(x, x) == 0.0
    assert reconstruction_mse(x, x + 0.5) == pytest.approx(0.25)
    x_hat = x.copy()
    x_hat[0, 0, 0, 0] += 4.0  # one pixel off by 4 out of 8: 16 / 8
    assert reconstruction_mse(x, x_hat) == pytest.approx(2.0)
    assert isinstance(reconstruction_mse(x.astype(np.float32), x_hat), float)


def test_mse_bad_inputs():
    x = np.zeros((2, 4, 4, 1))
    with pytest.raises(ValueError, match="same shape"):
        reconstruction_mse(x, np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        reconstruction_mse(x, np.full_like(x, np.nan))
    with pytest.raises(ValueError, match="non-finite"):
        reconstruction_mse(np.full_like(x, np.inf), x)
    with pytest.raises(ValueError, match="empty"):
        reconstruction_mse(np.zeros((0, 3)), np.zeros((0, 3)))


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance on feature clouds
# ---------------------------------------------------------------------------------------------------------------

M1, S1 = np.array([0.0, 1.0, -1.0]), np.diag([1.0, 2.0, 0.5])
M2 = np.array([1.0, 0.5, -1.0])
A = np.array([[1.0, 0.3, 0.0], [0.0, 0.8, 0.4], [0.2, 0.0, 1.1]])
S2 = A @ A.T  # a full (non-diagonal) covariance


def test_exact_formula_for_diagonal_covariances():
    """The independent closed form used below reduces to sum (sqrt(s1) - sqrt(s2))^2 for commuting covariances."""
    s2 = np.diag([4.0, 0.5, 0.5])
    expected = np.sum((M1 - M2) ** 2) + np.sum((np.sqrt(np.diag(S1)) - np.sqrt(np.diag(s2))) ** 2)
    assert exact_frechet(M1, S1, M2, s2) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("cov2", [np.diag([4.0, 0.5, 0.5]), S2], ids=["diagonal", "full"])
def test_frechet_matches_closed_form_with_shrinking_tolerance(cov2):
    """Sample estimates converge to the closed form; the tolerance is 5 Monte Carlo sd, estimated from replicates
    at a small N and scaled by 1 / sqrt(N) (plus the known O(1/N) bias of the mean term)."""
    rng = np.random.default_rng(1)
    exact = exact_frechet(M1, S1, M2, cov2)
    n_small, reps = 1_000, 40
    small = np.array([frechet_distance_from_features(gaussian(rng, M1, S1, n_small), gaussian(rng, M2, cov2, n_small))
                      for _ in range(reps)])
    sd_small = small.std(ddof=1)
    bias = lambda n: (np.trace(S1) + np.trace(cov2)) / n  # noqa: E731
    # the replicates' mean agrees with the closed form within its own MC error
    assert abs(small.mean() - exact) < 5 * sd_small / np.sqrt(reps) + 2 * bias(n_small)
    for n in (4_000, 40_000):
        sd_n = sd_small * np.sqrt(n_small / n)
        est = frechet_distance_from_features(gaussian(rng, M1, S1, n), gaussian(rng, M2, cov2, n))
        assert abs(est - exact) < 5 * sd_n + 2 * bias(n), (n, est, exact, sd_n)


def test_frechet_identical_inputs_zero_and_symmetry():
    rng = np.random.default_rng(2)
    a = gaussian(rng, M1, S1, 500)
    b = gaussian(rng, M2, S2, 700)  # different sizes are fine
    assert frechet_distance_from_features(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance_from_features(a, b) == pytest.approx(frechet_distance_from_features(b, a), rel=1e-8)
    # translation shifts only the mean term
    shift = np.array([3.0, 0.0, 4.0])
    assert frechet_distance_from_features(a, a + shift) == pytest.approx(25.0, rel=1e-9)


def test_frechet_singular_covariances_stay_finite():
    """Fewer samples than features (rank-deficient covariances) and constant features: finite, matches the
    eigenvalue form, and is 0 for identical inputs."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(12, 32))
    a[:, :5] = 0.0  # dead (ReLU) units
    b[:, :5] = 0.0
    got = frechet_distance_from_features(a, b)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert np.isfinite(got)
    assert got == pytest.approx(exact_frechet(a.mean(0), ca, b.mean(0), cb), rel=1e-4)
    assert frechet_distance_from_features(a, a) == pytest.approx(0.0, abs=1e-6 * np.trace(ca))
    # all-constant features: zero covariances
    assert frechet_distance_from_features(np.ones((5, 3)), np.ones((5, 3))) == 0.0
    assert frechet_distance_from_features(np.ones((5, 3)), np.zeros((5, 3))) == pytest.approx(3.0)


def test_frechet_regularises_when_sqrtm_fails(monkeypatch):
    """A non-finite or complex square root triggers a retry with a small ridge on both covariances; a root that
    stays bad gives a clear error."""
    rng = np.random.default_rng(8)
    a, b = gaussian(rng, M1, S1, 2_000), gaussian(rng, M2, S2, 2_000)
    plain = frechet_distance_from_features(a, b)
    real_sqrtm = scipy.linalg.sqrtm
    seen = []

    def flaky_sqrtm(m):
        seen.append(m.copy())
        return np.full_like(m, np.nan) if len(seen) == 1 else real_sqrtm(m)

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky_sqrtm)
    got = frechet_distance_from_features(a, b, eps=1e-6)
    assert len(seen) == 2 and 0 < np.max(np.abs(seen[1] - seen[0])) < 1e-4  # the retry saw the ridged product
    assert got == pytest.approx(plain, rel=1e-4)

    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: real_sqrtm(m) + 1j * np.eye(len(m)))
    with pytest.raises(ValueError, match="square root"):
        frechet_distance_from_features(a, b)


def test_frechet_one_feature():
    rng = np.random.default_rng(4)
    a, b = rng.normal(0, 1, size=(50_000, 1)), rng.normal(2, 3, size=(50_000, 1))
    assert frechet_distance_from_features(a, b) == pytest.approx(4.0 + (3.0 - 1.0) ** 2, rel=0.02)


def test_frechet_bad_inputs():
    good = np.zeros((10, 3)) + np.arange(10)[:, None]
    with pytest.raises(ValueError, match="same number of features"):
        frechet_distance_from_features(good, np.zeros((10, 4)))
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance_from_features(good.ravel(), good.ravel())
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance_from_features(good[:1], good)
    bad = good.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance_from_features(good, bad)


# ---------------------------------------------------------------------------------------------------------------
# the feature network
# ---------------------------------------------------------------------------------------------------------------

def test_feature_net_forward_by_hand():
    w1 = np.array([[1.0, -1.0], [2.0, 0.0]])
    w2 = np.array([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    net = FeatureNet([w1, w2], [np.array([0.0, 0.5]), np.zeros(3)], classes=[7, 8, 9], input_shape=(1, 2, 1))
    x = np.array([[1.0, 1.0], [-1.0, 0.0]]).reshape(2, 1, 2, 1)
    h = np.maximum(x.reshape(2, 2) @ w1 + [0.0, 0.5], 0.0)
    np.testing.assert_allclose(net.features(x), h)
    np.testing.assert_allclose(net.features(x.reshape(2, 2)), h)  # flattened input is accepted
    np.testing.assert_allclose(net.logits(x), h @ w2)
    assert net.predict(x).tolist() == [7, 8]
    assert net.accuracy(x, [7, 9]) == 0.5
    assert (net.input_size, net.feature_dim, net.layer_sizes) == (2, 2, (2, 2, 3))


def test_feature_net_binary_single_output_unit():
    """scikit-learn's binary case has one logistic output unit: positive logit -> classes[1]."""
    net = FeatureNet([np.eye(2), np.array([[1.0], [-1.0]])], [np.zeros(2), np.zeros(1)], classes=["a", "b"])
    assert net.predict(np.array([[1.0, 0.0], [0.0, 1.0]])).tolist() == ["b", "a"]


def test_feature_net_validates_construction():
    with pytest.raises(ValueError, match="hidden layer"):
        FeatureNet([np.eye(3)], [np.zeros(3)], classes=[0, 1, 2])
    with pytest.raises(ValueError, match="expects"):
        FeatureNet([np.eye(3), np.ones((4, 2))], [np.zeros(3), np.zeros(2)], classes=[0, 1])
    with pytest.raises(ValueError, match="input_shape"):
        FeatureNet([np.eye(3), np.ones((3, 2))], [np.zeros(3), np.zeros(2)], classes=[0, 1], input_shape=(2, 2))
    with pytest.raises(ValueError, match="classes"):
        FeatureNet([np.eye(3), np.ones((3, 2))], [np.zeros(3), np.zeros(2)], classes=[0, 1, 2])


def test_blob_classifier_accuracy_and_frechet(blobs, blob_net):
    x, y = blobs
    net = blob_net
    assert net.input_shape == (8, 8, 1) and net.feature_dim == 8
    x_test, y_test = blob_images(50, seed=1)
    assert net.accuracy(x_test, y_test) >= 0.95
    assert net.features(x_test).shape == (150, 8)

    real_a, real_b = x_test[:75], x_test[75:]
    noise = np.random.default_rng(5).uniform(-1, 1, size=x_test.shape)
    within = frechet_distance(real_a, real_b, net)
    to_noise = frechet_distance(x_test, noise, net)
    assert frechet_distance(x_test, x_test, net) == pytest.approx(0.0, abs=1e-6)
    assert within < 0.1 * to_noise, (within, to_noise)
    assert frechet_distance(real_a, real_b, net) == pytest.approx(frechet_distance(real_b, real_a, net), rel=1e-8)


def test_feature_net_rejects_wrong_images(blob_net):
    net = blob_net
    with pytest.raises(ValueError, match=r"\(N, 8, 8, 1\)"):
        net.features(np.zeros((4, 7, 7, 1)))
    with pytest.raises(ValueError, match=r"\(N, 8, 8, 1\)"):
        net.features(np.zeros((8, 8, 1)))  # a single image without the batch axis
    with pytest.raises(ValueError, match="non-finite"):
        net.features(np.full((2, 8, 8, 1), np.nan))
    with pytest.raises(ValueError, match=r"\(N, 8, 8, 1\)"):
        frechet_distance(np.zeros((4, 8, 8, 1)), np.zeros((4, 28, 28, 1)), net)
    with pytest.raises(TypeError, match="FeatureNet"):
        frechet_distance(np.zeros((4, 8, 8, 1)), np.zeros((4, 8, 8, 1)), net=None)
    with pytest.raises(ValueError, match="labels"):
        net.accuracy(np.zeros((4, 8, 8, 1)), [0, 1])


def test_train_is_deterministic(blobs, blob_net):
    x, y = blobs
    again = train_feature_net(x, y, **SMALL)
    for a, b in zip(blob_net.weights + blob_net.biases, again.weights + again.biases):
        np.testing.assert_array_equal(a, b)
    other = train_feature_net(x, y, hidden=SMALL["hidden"], max_iter=SMALL["max_iter"], seed=1)
    assert not np.array_equal(other.weights[0], blob_net.weights[0])


def test_train_bad_inputs(blobs):
    x, y = blobs
    with pytest.raises(ValueError, match="labels"):
        train_feature_net(x, y[:-1])
    with pytest.raises(ValueError, match="two classes"):
        train_feature_net(x, np.zeros(len(x), dtype=int))
    with pytest.raises(ValueError, match="non-finite"):
        train_feature_net(np.where(np.arange(x.size).reshape(x.shape) == 5, np.inf, x), y)
    with pytest.raises(ValueError, match="hidden"):
        train_feature_net(x, y, hidden=())
    with pytest.raises(ValueError, match="seed"):
        train_feature_net(x, y, seed=-1)


class _NoTraining:
    """Stands in for MLPClassifier where a test asserts that nothing is trained."""

    def __init__(self, *args, **kwargs):
        raise AssertionError("MLPClassifier was constructed: the cache was not used")


def test_cache_written_atomically_and_loaded_without_retraining(blobs, blob_net, tmp_path, monkeypatch):
    x, y = blobs
    replaced = []
    real_replace = os.replace

    def recording_replace(src, dst):
        replaced.append((os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    first = train_feature_net(x, y, **SMALL, cache_dir=tmp_path / "cache")
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].startswith("feature_net-") and files[0].endswith(".npz")
    path = tmp_path / "cache" / files[0]
    # written to a temporary file in the same folder, then moved into place
    assert len(replaced) == 1 and replaced[0][1] == os.fspath(path)
    assert os.path.dirname(replaced[0][0]) == os.fspath(path.parent) and replaced[0][0] != replaced[0][1]
    # a cache file of plain arrays: loads without pickle
    with np.load(path, allow_pickle=False) as data:
        assert {"weight_0", "bias_0", "classes", "input_shape", "format_version"} <= set(data.files)
        assert all(data[k].dtype != object for k in data.files)
    for a, b in zip(first.weights, blob_net.weights):
        np.testing.assert_array_equal(a, b)

    # second call: served from the cache, MLPClassifier never constructed
    monkeypatch.setattr(sklearn.neural_network, "MLPClassifier", _NoTraining)
    second = train_feature_net(x, y, **SMALL, cache_dir=tmp_path / "cache")
    for a, b in zip(first.weights + first.biases, second.weights + second.biases):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(first.classes, second.classes)
    assert second.input_shape == first.input_shape

    # the key covers the data, labels, hidden sizes and seed: each change misses the cache (and would train)
    for kwargs in (dict(x=x[::-1], y=y[::-1]), dict(x=x, y=(y + 1) % 3), dict(x=x, y=y, seed=1),
                   dict(x=x, y=y, hidden=(32, 4))):
        args = {**SMALL, **kwargs}
        with pytest.raises(AssertionError, match="cache was not used"):
            train_feature_net(args.pop("x"), args.pop("y"), **args, cache_dir=tmp_path / "cache")


def test_cache_recovers_from_corrupt_file_and_failed_write(blobs, blob_net, tmp_path, monkeypatch):
    x, y = blobs
    cache = tmp_path / "cache"
    train_feature_net(x, y, **SMALL, cache_dir=cache)
    (path,) = cache.iterdir()
    path.write_bytes(b"not a zip file")
    with pytest.warns(RuntimeWarning, match="could not read"):
        net = train_feature_net(x, y, **SMALL, cache_dir=cache)
    np.testing.assert_array_equal(net.weights[0], blob_net.weights[0])
    assert FeatureNet.load(path).layer_sizes == blob_net.layer_sizes  # replaced by a good file

    # a failing move leaves neither the final file nor the temporary file behind, and only warns
    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    other = tmp_path / "other"
    with pytest.warns(RuntimeWarning, match="could not write"):
        net = train_feature_net(x, y, **SMALL, cache_dir=other)
    assert list(other.iterdir()) == []
    np.testing.assert_array_equal(net.weights[0], blob_net.weights[0])


def test_save_load_roundtrip(blob_net, tmp_path):
    path = blob_net.save(tmp_path / "net.npz")
    loaded = FeatureNet.load(path)
    assert repr(loaded) == repr(blob_net)
    x, _ = blob_images(5, seed=9)
    np.testing.assert_array_equal(loaded.features(x), blob_net.features(x))
    np.savez(tmp_path / "future.npz", format_version=np.array(99), n_layers=np.array(0))
    with pytest.raises(ValueError, match="format"):
        FeatureNet.load(tmp_path / "future.npz")


# ---------------------------------------------------------------------------------------------------------------
# log-mean-exp and log-likelihood summaries
# ---------------------------------------------------------------------------------------------------------------

def test_log_mean_exp_lognormal_known_mean():
    """log w ~ N(mu, s^2): log E[w] = mu + s^2 / 2; the estimate is within 3 of its standard errors."""
    rng = np.random.default_rng(6)
    mu, s, k = -50.0, 1.0, 20_000
    est, se = log_mean_exp(rng.normal(mu, s, size=k))
    assert isinstance(est, float) and isinstance(se, float)
    # delta-method se for log-normal weights: sqrt((exp(s^2) - 1) / K)
    assert se == pytest.approx(np.sqrt(np.expm1(s**2) / k), rel=0.3)
    assert abs(est - (mu + s**2 / 2)) < 3 * se


def test_log_mean_exp_coverage_and_axis():
    """Over many independent replicates (along axis 1), about 95 % of the +-1.96 se intervals cover the truth."""
    rng = np.random.default_rng(7)
    mu, s, k, reps = 3.0, 0.5, 2_000, 400
    log_w = rng.normal(mu, s, size=(reps, k))
    est, se = log_mean_exp(log_w, axis=1)
    assert est.shape == se.shape == (reps,)
    covered = np.mean(np.abs(est - (mu + s**2 / 2)) < 1.96 * se)
    # binomial sd of the coverage with 400 replicates is about 0.011
    assert 0.90 <= covered <= 0.99, covered
    est_t, se_t = log_mean_exp(log_w.T, axis=0)
    np.testing.assert_allclose(est_t, est)
    np.testing.assert_allclose(se_t, se)
    est_neg, _ = log_mean_exp(log_w, axis=-1)
    np.testing.assert_allclose(est_neg, est)


def test_log_mean_exp_equal_weights_and_stability():
    est, se = log_mean_exp(np.full(7, -1234.5))
    assert est == -1234.5 and se == 0.0
    # huge log weights do not overflow; matches the shifted computation
    lw = np.array([1000.0, 1000.0 + np.log(3.0)])
    est, se = log_mean_exp(lw)
    assert est == pytest.approx(1000.0 + np.log(2.0), rel=1e-14)
    assert se == pytest.approx(0.5)  # weights (1, 3): sd sqrt(2), mean 2, K 2
    # zero weights (-inf) are fine; all zero gives -inf
    est, _ = log_mean_exp(np.array([0.0, -np.inf]))
    assert est == pytest.approx(np.log(0.5))
    est, se = log_mean_exp(np.array([-np.inf, -np.inf]))
    assert est == -np.inf and np.isnan(se)
    est, se = log_mean_exp(np.array([2.0]))
    assert est == 2.0 and np.isnan(se)


def test_log_mean_exp_bad_inputs():
    with pytest.raises(ValueError, match="nan"):
        log_mean_exp(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match=r"\+inf"):
        log_mean_exp(np.array([0.0, np.inf]))
    with pytest.raises(ValueError, match="axis"):
        log_mean_exp(np.zeros((3, 2)), axis=2)
    with pytest.raises(ValueError, match="no samples"):
        log_mean_exp(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="dimension"):
        log_mean_exp(1.0)


def test_summarize_log_likelihood():
    values = np.array([-90.0, -88.0, -89.0, -91.0])
    out = summarize_log_likelihood(values)
    assert out == {"mean": -89.5, "stderr": pytest.approx(values.std(ddof=1) / 2.0), "n": 4}
    assert isinstance(out["mean"], float) and isinstance(out["n"], int)
    single = summarize_log_likelihood([-3.0])
    assert single["mean"] == -3.0 and single["n"] == 1 and np.isnan(single["stderr"])
    with pytest.raises(ValueError, match="1-D"):
        summarize_log_likelihood(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        summarize_log_likelihood([-1.0, -np.inf])
    with pytest.raises(ValueError, match="empty"):
        summarize_log_likelihood([])
