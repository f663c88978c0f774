"""Datasets, partitions and client splits; nothing here touches the network."""

import datasets
import numpy as np
import pytest
from PIL import Image

from fed_deq import data
from fed_deq.errors import InputError

# 300 MNIST-1D samples generate in ~0.05 s (20,000 take ~4 s), plenty for shape and split checks.
SMALL = 300


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
    data.load_dataset.cache_clear()


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits", seed=0, num_samples=0, test_fraction=0.2)


def label_skew(parts, labels, num_classes=10):
    """Mean total-variation distance between each partition's label histogram and the global one."""
    overall = np.bincount(labels, minlength=num_classes) / labels.size
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / p.size - overall).sum()
                          for p in parts if p.size]))


# --- datasets --------------------------------------------------------------------------------------------


def test_mnist1d_shapes_dtypes_and_split():
    bundle = data.load_dataset("mnist1d", seed=1, num_samples=SMALL, test_fraction=0.25)
    assert bundle.x_train.shape == (225, 40) and bundle.x_test.shape == (75, 40)
    assert bundle.x_train.dtype == np.float32 and bundle.y_train.dtype == np.int64
    assert bundle.input_shape == (40,) and bundle.num_classes == 10
    assert set(np.unique(np.concatenate([bundle.y_train, bundle.y_test]))) == set(range(10))
    assert not bundle.x_train.flags.writeable


def test_mnist1d_is_deterministic_and_seed_dependent():
    generate = data.load_dataset.__wrapped__  # bypass the memo so both calls really generate
    a = generate("mnist1d", seed=3, num_samples=SMALL, test_fraction=0.2)
    b = generate("mnist1d", seed=3, num_samples=SMALL, test_fraction=0.2)
    c = generate("mnist1d", seed=4, num_samples=SMALL, test_fraction=0.2)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)


def test_mnist1d_leaves_global_rngs_alone():
    import random

    np.random.seed(123)
    random.seed(123)
    expected = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    data.load_dataset.__wrapped__("mnist1d", seed=9, num_samples=SMALL, test_fraction=0.2)
    assert (np.random.random(), random.random()) == expected


def test_load_dataset_is_memoised():
    first = data.load_dataset("mnist1d", seed=2, num_samples=SMALL, test_fraction=0.2)
    assert data.load_dataset("mnist1d", seed=2, num_samples=SMALL, test_fraction=0.2) is first


def test_digits(digits):
    assert digits.x_train.shape[1:] == (64,) and digits.input_shape == (64,)
    assert digits.x_train.shape[0] + digits.x_test.shape[0] == 1797
    assert digits.x_test.shape[0] == round(1797 * 0.2)
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() <= 1.0 and digits.x_train.max() > 0.9
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int64


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_test_fraction_honoured(fraction):
    bundle = data.load_dataset("digits", seed=0, num_samples=0, test_fraction=fraction)
    assert bundle.x_test.shape[0] == round(1797 * fraction)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(test_fraction=0.0), "test_fraction"), (dict(test_fraction=1.0), "test_fraction"),
     (dict(num_samples=5), "num_samples"), (dict(seed=-1), "seed")],
)
def test_load_dataset_rejects_bad_arguments(kwargs, match):
    args = dict(seed=0, num_samples=SMALL, test_fraction=0.2) | kwargs
    with pytest.raises(InputError, match=match):
        data.load_dataset("mnist1d", **args)


def test_unknown_hub_dataset_offline_is_input_error(monkeypatch):
    def refuse(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nobody/nothing' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(InputError, match="cannot load hub dataset 'nobody/nothing'"):
        data.load_dataset("nobody/nothing", seed=0, num_samples=0, test_fraction=0.2)


def rgb_images(n, h=4, w=5):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    return pixels, [Image.fromarray(p, mode="RGB") for p in pixels]


def test_from_hf_dataset_pil_rgb_images():
    pixels, images = rgb_images(6)
    ds = datasets.Dataset.from_dict({"img": images, "fine_label": [0, 1, 2, 3, 4, 5]},
                                    features=datasets.Features({"img": datasets.Image(),
                                                                "fine_label": datasets.Value("int64")}))
    x, y = data.from_hf_dataset(ds)
    assert x.shape == (6, 3, 4, 5) and x.dtype == np.float32
    np.testing.assert_allclose(x[2, 1], pixels[2, :, :, 1] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y, np.arange(6))
    assert y.dtype == np.int64


def test_from_hf_dataset_grayscale_and_array_columns():
    gray = [Image.fromarray(np.full((3, 3), 51 * i, np.uint8), mode="L") for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": gray, "label": [2, 0, 1]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    x, y = data.from_hf_dataset(ds)
    assert x.shape == (3, 1, 3, 3)
    np.testing.assert_allclose(x[:, 0, 0, 0], [0.0, 0.2, 0.4], rtol=1e-6)
    features = datasets.Dataset.from_dict({"pixels": [[0.5, 1.0], [0.0, 0.25]], "target": [1, 0]})
    x, y = data.from_hf_dataset(features, image_key="pixels", label_key="target")
    np.testing.assert_allclose(x, [[0.5, 1.0], [0.0, 0.25]])
    np.testing.assert_array_equal(y, [1, 0])
    with pytest.raises(InputError, match="image_key"):
        data.from_hf_dataset(features)
    with pytest.raises(InputError, match="'nope' not found"):
        data.from_hf_dataset(features, image_key="nope", label_key="target")


def test_hub_path_pools_splits_and_reads_class_names(monkeypatch):
    _, images = rgb_images(10)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=12)})
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"img": images[:8], "label": list(range(8))}, features=features),
        "test": datasets.Dataset.from_dict({"img": images[8:], "label": [8, 9]}, features=features),
    })
    monkeypatch.setattr(datasets, "load_dataset", lambda name: splits)
    bundle = data.load_dataset("local/fake-cifar", seed=0, num_samples=0, test_fraction=0.2)
    assert bundle.input_shape == (3, 4, 5) and bundle.num_classes == 12
    assert bundle.x_train.shape == (8, 3, 4, 5) and bundle.x_test.shape == (2, 3, 4, 5)
    assert sorted(np.concatenate([bundle.y_train, bundle.y_test]).tolist()) == list(range(10))


# --- partitions ------------------------------------------------------------------------------------------


def test_iid_partitions_balanced_disjoint_and_complete(digits):
    parts = data.partition(digits.y_train, 7, kind="iid", seed=0)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    union = np.concatenate(parts)
    assert union.size == np.unique(union).size == digits.y_train.size
    # Shuffled, not contiguous blocks of the original order.
    assert not np.array_equal(np.sort(parts[0]), np.arange(parts[0].size))


def test_dirichlet_small_alpha_is_skewed_vs_iid(digits):
    y = digits.y_train
    iid = data.partition(y, 10, kind="iid", seed=0)
    skewed = data.partition(y, 10, kind="dirichlet", seed=0, alpha=0.1)
    union = np.concatenate(skewed)
    assert union.size == np.unique(union).size == y.size
    assert label_skew(iid, y) < 0.2
    assert label_skew(skewed, y) > 0.5


def test_dirichlet_min_partition_size(digits):
    parts = data.partition(digits.y_train, 10, kind="dirichlet", seed=1, alpha=1.0, min_partition_size=20)
    assert min(p.size for p in parts) >= 20


def test_pathological_classes_per_partition(digits):
    y = digits.y_train
    parts = data.partition(y, 10, kind="pathological", seed=0, classes_per_client=2)
    assert all(len(np.unique(y[p])) <= 2 for p in parts)
    union = np.concatenate(parts)
    assert union.size == np.unique(union).size


def test_partitions_deterministic_per_seed(digits):
    y = digits.y_train
    call = data._partition_cached.__wrapped__  # bypass the memo: the partitioner itself must be deterministic
    args = (y.astype(np.int64).tobytes(), 5, "dirichlet", 0, 0.5, None, 0)
    first, again = call(*args), call(*args)
    other = call(y.astype(np.int64).tobytes(), 5, "dirichlet", 1, 0.5, None, 0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    public = data.partition(y, 5, kind="dirichlet", seed=0, alpha=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(first, public))


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(kind="zipf"), "kind"), (dict(kind="dirichlet"), "alpha"), (dict(kind="dirichlet", alpha=-1.0), "alpha"),
     (dict(kind="pathological", classes_per_client=11), "classes_per_client"),
     (dict(kind="iid", num_partitions=0), "num_clients")],
)
def test_partition_rejects_bad_arguments(digits, kwargs, match):
    args = dict(num_partitions=4, seed=0) | kwargs
    with pytest.raises(InputError, match=match):
        data.partition(digits.y_train, **args)


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_impossible_dirichlet_is_input_error(digits):
    with pytest.raises(InputError, match="dirichlet partitioning failed"):
        data.partition(digits.y_train[:50], 10, kind="dirichlet", seed=0, alpha=0.05, min_partition_size=5)


# --- client data -----------------------------------------------------------------------------------------


def test_client_data_split_is_disjoint_and_covers_partition(digits):
    kwargs = dict(num_partitions=4, kind="iid", seed=0, validation_fraction=0.25)
    client = data.client_data(digits, 2, **kwargs)
    part = data.partition(digits.y_train, 4, kind="iid", seed=0)[2]
    assert client.x_val.shape[0] == part.size // 4
    assert client.x_train.shape[0] + client.x_val.shape[0] == part.size
    # Train + validation is exactly the partition's multiset of samples: disjoint and complete.
    def sorted_rows(x, y):
        table = np.column_stack([x, y])
        return table[np.lexsort(table.T[::-1])]

    np.testing.assert_array_equal(
        sorted_rows(np.concatenate([client.x_train, client.x_val]), np.concatenate([client.y_train, client.y_val])),
        sorted_rows(digits.x_train[part], digits.y_train[part]))
    assert client.y_train.dtype == np.int64 and client.x_train.flags.writeable
    again = data.client_data(digits, 2, **kwargs)
    np.testing.assert_array_equal(client.x_val, again.x_val)


def test_client_data_tiny_partition_keeps_a_training_sample(digits):
    client = data.client_data(digits, 0, num_partitions=1000, kind="iid", seed=0, validation_fraction=0.5)
    assert client.x_train.shape[0] >= 1
    assert client.x_train.shape[0] + client.x_val.shape[0] in (1, 2)


def test_client_data_rejects_bad_partition_id(digits):
    with pytest.raises(InputError, match="partition-id"):
        data.client_data(digits, 4, num_partitions=4, kind="iid", seed=0, validation_fraction=0.1)


def test_the_probe_set_is_disjoint_from_test_and_clients_and_leaves_the_test_set_alone():
    plain = data.load_dataset("mnist1d", seed=3, num_samples=SMALL, test_fraction=0.2)
    probed = data.load_dataset("mnist1d", seed=3, num_samples=SMALL, test_fraction=0.2, probe_samples=50)
    np.testing.assert_array_equal(probed.x_test, plain.x_test)
    assert len(probed.y_probe) == 50 and len(probed.y_train) == len(plain.y_train) - 50
    rows = lambda x: {r.tobytes() for r in x}  # noqa: E731 - MNIST-1D samples are continuous: no duplicates
    probe = rows(probed.x_probe)
    assert len(probe) == 50 and probe <= rows(plain.x_train)
    assert not probe & rows(probed.x_train) and not probe & rows(probed.x_test)
    assert not probed.x_probe.flags.writeable
    with pytest.raises(InputError, match="fusion.probe_samples"):
        data.load_dataset("digits", seed=0, num_samples=0, test_fraction=0.2, probe_samples=10_000)


def test_mnist1d_generated_in_two_threads_at_once_equals_one_at_a_time():
    """make_dataset draws from global RNGs: two threads at once must not interleave their streams (the runner
    generates the server's dataset in a thread while the server starts)."""
    import threading

    alone = [data._generate_mnist1d(seed, 400) for seed in (5, 6)]
    together: dict = {}
    start = threading.Barrier(2)

    def make(seed):
        start.wait()
        together[seed] = data._generate_mnist1d(seed, 400)

    threads = [threading.Thread(target=make, args=(seed,)) for seed in (5, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # The generator itself, not the disk cache (which would hand the second call the first one's file).
    for seed, arrays in zip((5, 6), alone):
        np.testing.assert_array_equal(together[seed]["x"], arrays["x"])
        np.testing.assert_array_equal(together[seed]["y"], arrays["y"])
