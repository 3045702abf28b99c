"""Data sources, file formats (written here, in their on-disk layouts), splits and validation."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from _extras import need
from rb_labelrefine.data import (
    DIGITS_MEAN, DIGITS_STD, FASHION_MNIST_ROOT, CorruptDatasetError, DataInfo, DatasetNotFoundError, IndexedDataset,
    RandomCropFlip, TensorImageDataset, UnsafePickleError, build_datasets, load_cifar,
    load_digits_data, load_fashion_mnist, load_synthetic, load_tiny_imagenet, read_idx,
    stratified_order, validate_batch,
)


# ---------------------------------------------------------------- digits / synthetic

@pytest.fixture(scope="module")
def digits():
    need("sklearn")
    return load_digits_data()


def test_digits_shapes_split_and_range(digits):
    train, test, info = digits
    assert (len(train), len(test)) == (1400, 397)
    x, y = train.tensors()
    assert x.shape == (1400, 1, 8, 8) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() == 1.0
    assert info == DataInfo("digits", 10, 1, 8, DIGITS_MEAN, DIGITS_STD, "sklearn.datasets.load_digits")
    # stratified: every class has 39 or 40 of the 397 test images
    assert set(torch.bincount(test.y).tolist()) <= {39, 40}
    # the documented constants are the statistics of this exact training split
    assert x.mean().item() == pytest.approx(DIGITS_MEAN[0], abs=1e-4)
    assert x.std().item() == pytest.approx(DIGITS_STD[0], abs=1e-4)


def test_digits_split_is_fixed(digits):
    train2, test2, _ = load_digits_data()
    assert torch.equal(digits[1].x, test2.x) and torch.equal(digits[1].y, test2.y)


def test_synthetic_is_deterministic_in_range_and_learnable():
    train, test, info = load_synthetic(n_train=200, n_test=50, num_classes=4, channels=3, image_size=8, seed=3)
    again, _, _ = load_synthetic(n_train=200, n_test=50, num_classes=4, channels=3, image_size=8, seed=3)
    assert torch.equal(train.x, again.x) and torch.equal(train.y, again.y)
    assert train.x.shape == (200, 3, 8, 8) and 0 <= train.x.min() and train.x.max() <= 1
    assert (info.num_classes, info.channels, info.image_size) == (4, 3, 8)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64, 4))
    for _ in range(30):  # plain gradient descent (torch.optim's first use costs seconds of imports)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(train.x - 0.5), train.y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
    acc = (model(test.x - 0.5).argmax(1) == test.y).float().mean()
    assert acc > 0.9


# ---------------------------------------------------------------- containers

def test_tensor_dataset_uint8_storage_and_transform_view():
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    ds = TensorImageDataset(x, torch.arange(5))
    img, label = ds[2]
    assert img.dtype == torch.float32 and torch.allclose(img, x[2].float() / 255) and label == 2
    flipped = ds.with_transform(lambda t: t.flip(-1))
    assert flipped.x is ds.x and ds.transform is None
    assert torch.equal(flipped[2][0], img.flip(-1))
    with pytest.raises(ValueError, match="rank|\\[N, C, H, W\\]"):
        TensorImageDataset(torch.rand(5, 4, 4), torch.arange(5))
    with pytest.raises(ValueError, match="integer"):
        TensorImageDataset(torch.rand(5, 1, 4, 4), torch.rand(5))


def test_random_crop_flip_deterministic_given_seed():
    x = torch.rand(3, 8, 8)
    aug = RandomCropFlip(padding=2)
    torch.manual_seed(1)
    a = [aug(x) for _ in range(10)]
    torch.manual_seed(1)
    b = [aug(x) for _ in range(10)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert all(u.shape == x.shape for u in a)
    assert any(not torch.equal(u, x) for u in a)
    # a crop is a shifted copy: every value is either from the image or zero padding
    assert all(torch.isin(u, torch.cat([x.flatten(), torch.zeros(1)])).all() for u in a)
    assert torch.equal(RandomCropFlip(padding=0, flip=False)(x), x)


def test_indexed_dataset_returns_positions_also_for_subsets():
    base = TensorImageDataset(torch.rand(10, 1, 2, 2), torch.arange(10) % 3)
    ds = IndexedDataset(base)
    x, y, i = ds[7]
    assert i == 7 and y == 1 and torch.equal(x, base.x[7])
    sub = IndexedDataset(torch.utils.data.Subset(base, [9, 4, 2]))
    assert [sub[k][2] for k in range(3)] == [0, 1, 2]
    assert [int(sub[k][1]) for k in range(3)] == [0, 1, 2]
    assert torch.equal(sub.targets, torch.tensor([0, 1, 2]))
    xb, yb, ib = next(iter(DataLoader(sub, batch_size=3)))
    assert ib.tolist() == [0, 1, 2] and xb.shape == (3, 1, 2, 2)


# ---------------------------------------------------------------- Fashion-MNIST IDX files

def _idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_fmnist(root, gz: bool, n_train=12, n_test=6):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) + 3) % 10,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        data = _idx_bytes(arr)
        if gz:
            (root / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_idx_loads(tmp_path, gz):
    arrays = _write_fmnist(tmp_path, gz)
    train, test, info = load_fashion_mnist(tmp_path)
    assert (len(train), len(test)) == (12, 6)
    x, y = test.tensors()
    assert x.shape == (6, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    assert torch.allclose(x[:, 0] * 255, torch.as_tensor(arrays["t10k-images-idx3-ubyte"], dtype=torch.float32))
    assert y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert (info.name, info.num_classes, info.channels, info.image_size) == ("fashion_mnist", 10, 1, 28)


def test_fashion_mnist_torchvision_layout(tmp_path):
    _write_fmnist(tmp_path / "FashionMNIST" / "raw", gz=False)
    assert len(load_fashion_mnist(tmp_path)[0]) == 12


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_ROOT), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist():
    train, test, info = load_fashion_mnist()
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.bincount(test.y).tolist() == [1000] * 10
    x = train.tensors()[0]
    assert x.mean().item() == pytest.approx(info.mean[0], abs=1e-4)
    assert x.std().item() == pytest.approx(info.std[0], abs=1e-4)


def test_fashion_mnist_missing_names_every_path(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_fashion_mnist(tmp_path / "nowhere")
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert "apt-get install dataset-fashion-mnist" in msg and "root=" in msg
    for stem in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        for p in (tmp_path / "nowhere" / stem, tmp_path / "nowhere" / (stem + ".gz"),
                  tmp_path / "nowhere" / "FashionMNIST" / "raw" / stem):
            assert str(p) in msg


def test_fashion_mnist_truncated_file(tmp_path):
    _write_fmnist(tmp_path, gz=False)
    f = tmp_path / "t10k-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CorruptDatasetError, match="t10k-images-idx3-ubyte.*truncated") as e:
        load_fashion_mnist(tmp_path)
    assert isinstance(e.value, ValueError)


def test_fashion_mnist_truncated_gzip(tmp_path):
    _write_fmnist(tmp_path, gz=True)
    f = tmp_path / "train-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(CorruptDatasetError, match="train-labels-idx1-ubyte.gz.*gzip"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_wrong_magic_and_count(tmp_path):
    _write_fmnist(tmp_path, gz=False)
    # labels where images belong: caught by the magic number, not by a reshape later
    (tmp_path / "train-images-idx3-ubyte").write_bytes((tmp_path / "train-labels-idx1-ubyte").read_bytes())
    with pytest.raises(CorruptDatasetError, match="train-images-idx3-ubyte: magic number 0x00000801"):
        load_fashion_mnist(tmp_path)
    _write_fmnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(5)))
    with pytest.raises(CorruptDatasetError, match="5 labels for 6 images"):
        load_fashion_mnist(tmp_path)
    (tmp_path / "x").write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(CorruptDatasetError, match="bad IDX magic"):
        read_idx(tmp_path / "x")


# ---------------------------------------------------------------- CIFAR pickles

def _cifar_batch(n, label_key, num_classes, seed, str_keys=False):
    rng = np.random.default_rng(seed)
    d = {b"batch_label": b"training batch", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         label_key.encode(): [int(v) for v in rng.integers(0, num_classes, n)],
         b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    return {k.decode(): v for k, v in d.items()} if str_keys else d


def _write_cifar10(parent, n=3, protocol=4):
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = _cifar_batch(n, "labels", 10, i)
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f, protocol=protocol)
    return folder, batches


@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar10_loads_from_folder_or_parent(tmp_path, point_at_folder):
    folder, batches = _write_cifar10(tmp_path)
    train, test, info = load_cifar(folder if point_at_folder else tmp_path, "cifar10")
    assert (len(train), len(test)) == (15, 3)
    x, y = train.tensors()
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    raw = batches["data_batch_2"][b"data"][0]
    # rows are 1024 R, 1024 G, 1024 B values: channel 1 of image 3 (first of batch 2) is green
    assert torch.allclose(x[3, 1].flatten() * 255, torch.as_tensor(raw[1024:2048], dtype=torch.float32))
    assert y[3:6].tolist() == batches["data_batch_2"][b"labels"]
    assert (info.num_classes, info.mean) == (10, (0.4914, 0.4822, 0.4465))


def test_cifar100_fine_labels_and_str_keys(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 4), ("test", 2)):
        with open(folder / name, "wb") as f:
            pickle.dump(_cifar_batch(n, "fine_labels", 100, 0, str_keys=(name == "test")), f, protocol=4)
    train, test, info = load_cifar(tmp_path, "cifar100")
    assert (len(train), len(test), info.num_classes) == (4, 2, 100)


def _py2_cifar_pickle(data: np.ndarray, labels) -> bytes:
    """The opcodes Python 2's cPickle (protocol 2) + numpy 1.x wrote for the genuine CIFAR batches:
    str as SHORT_BINSTRING/BINSTRING and the global spelt ``numpy.core.multiarray._reconstruct``.
    Python 3 cannot produce these itself (it writes bytes via ``_codecs.encode``), so spell them out."""
    def s(b):
        return b"U" + bytes([len(b)]) + b
    dtype = (b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"                     # dtype('u1', 0, 1)
             + b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")  # __setstate__
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + b"K\x00\x85" + s(b"b") + b"\x87R"
             + b"(K\x01M" + struct.pack("<H", len(data)) + b"M\x00\x0c\x86" + dtype + b"\x89"
             + b"T" + struct.pack("<i", data.nbytes) + data.tobytes() + b"tb")
    label_list = b"(" + b"".join(b"K" + bytes([v]) for v in labels) + b"l"
    return b"\x80\x02}q\x00(" + s(b"data") + array + s(b"labels") + label_list + b"u."


def test_cifar_python2_pickle_loads(tmp_path):
    folder, _ = _write_cifar10(tmp_path)
    data = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
    raw = _py2_cifar_pickle(data, [3, 7, 1, 0])
    assert b"numpy._core" not in raw and b"_codecs" not in raw
    (folder / "test_batch").write_bytes(raw)
    test = load_cifar(folder)[1]
    x, y = test.tensors()
    assert y.tolist() == [3, 7, 1, 0]
    assert torch.equal((x * 255).round().to(torch.uint8).reshape(4, 3072), torch.from_numpy(data))


def test_cifar_missing_gives_paths_and_url(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_cifar(tmp_path, "cifar10")
    msg = str(e.value)
    assert str(tmp_path / "data_batch_1") in msg and str(tmp_path / "cifar-10-batches-py") in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in msg and "load_cifar10(data_dir=" in msg
    with pytest.raises(ValueError, match="cifar10"):
        load_cifar(tmp_path, "cifar1000")


class _Payload:
    """What an attacker would put in a tampered batch: code that runs at unpickling time."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _ExecPayload(_Payload):
    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("payload", [_Payload, _ExecPayload])
def test_malicious_cifar_pickle_is_refused_and_never_runs(tmp_path, payload):
    folder, _ = _write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = _cifar_batch(3, "labels", 10, 0)
    batch[b"labels"] = payload(marker)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump(batch, f, protocol=4)
    with pytest.raises(UnsafePickleError, match=r"data_batch_3.*refusing to load global '(posix|os|builtins)\.(system|exec)'"):
        load_cifar(tmp_path)
    assert not marker.exists()


def test_corrupt_cifar_batches(tmp_path):
    folder, _ = _write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:50])
    with pytest.raises(CorruptDatasetError, match="test_batch: not a valid pickle"):
        load_cifar(tmp_path)
    bad = _cifar_batch(3, "labels", 10, 0)
    bad[b"data"] = bad[b"data"][:, :100]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(bad, f, protocol=4)
    with pytest.raises(CorruptDatasetError, match=r"\[N, 3072\]"):
        load_cifar(tmp_path)


# ---------------------------------------------------------------- Tiny ImageNet folder

def test_tiny_imagenet_folder_layout(tmp_path):
    Image = need("PIL.Image")

    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(0)
    for w in wnids:
        (root / "train" / w / "images").mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "train" / w / "images" / f"{w}_{k}.JPEG")
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(root / "val" / "images" / "val_0.JPEG")  # greyscale
    (root / "val" / "val_annotations.txt").write_text(f"val_0.JPEG\t{wnids[1]}\t0\t0\t63\t63\n")
    train, test, info = load_tiny_imagenet(tmp_path)
    assert (len(train), len(test), info.num_classes, info.image_size) == (4, 1, 2, 64)
    assert train.tensors()[0].shape == (4, 3, 64, 64) and train.y.tolist() == [0, 0, 1, 1]
    assert test.y.tolist() == [1]
    with pytest.raises(DatasetNotFoundError, match="val_annotations.txt"):
        load_tiny_imagenet(tmp_path / "missing")


# ---------------------------------------------------------------- build_datasets

def _indices(ds):
    return ds.dataset.indices


def test_build_datasets_splits_are_disjoint_stratified_and_deterministic():
    need("sklearn")
    train, val, test, info = build_datasets("digits", val_fraction=0.1, seed=0)
    assert (len(train), len(val), len(test)) == (1260, 140, 397)
    assert not set(_indices(train)) & set(_indices(val))
    assert len(set(_indices(train)) | set(_indices(val))) == 1400
    assert torch.bincount(val.targets).tolist() == [14] * 10
    again = build_datasets("digits", val_fraction=0.1, seed=0)
    other = build_datasets("digits", val_fraction=0.1, seed=1)
    assert _indices(again[0]) == _indices(train) and _indices(again[1]) == _indices(val)
    assert _indices(other[1]) != _indices(val)
    assert info.name == "digits"


def test_build_datasets_subsets_and_indices():
    need("sklearn")
    train, val, test, _ = build_datasets("digits", train_subset=500, test_subset=100, seed=0)
    full_val = build_datasets("digits", seed=0)[1]
    assert (len(train), len(test)) == (500, 100)
    assert _indices(val) == _indices(full_val)  # the validation split ignores train_subset
    assert torch.bincount(train.targets, minlength=10).min() >= 48
    assert _indices(test) == _indices(build_datasets("digits", test_subset=100, seed=5)[2])
    xb, yb, ib = next(iter(DataLoader(train, batch_size=len(train))))
    assert sorted(ib.tolist()) == list(range(500))
    validate_batch(xb, yb, 10)
    with pytest.raises(ValueError, match="train_subset"):
        build_datasets("digits", train_subset=5000)


def test_build_datasets_augments_only_train():
    train, val, test, _ = build_datasets("synthetic", augment=True, n_train=40, n_test=10)
    assert isinstance(train.dataset.dataset.transform, RandomCropFlip)
    assert val.dataset.dataset.transform is None and test.dataset.transform is None
    assert all(len(item) == 3 for item in (train[0], val[0], test[0]))
    plain = build_datasets("synthetic", n_train=40, n_test=10)[0]
    assert plain.dataset.dataset.transform is None
    zero_val = build_datasets("synthetic", val_fraction=0.0, n_train=40, n_test=10)[1]
    assert len(zero_val) == 0


def test_build_datasets_unknown_name():
    with pytest.raises(ValueError, match="unknown data set 'mnist'.*cifar10.*tiny_imagenet"):
        build_datasets("mnist")


def test_stratified_order_prefixes_are_balanced():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    order = stratified_order(labels, seed=0)
    assert sorted(order.tolist()) == list(range(100))
    assert torch.bincount(labels[order[:10]]).tolist() == [6, 3, 1]


# ---------------------------------------------------------------- validate_batch

@pytest.mark.parametrize("x, y, match", [
    (torch.rand(2, 3, 4, 4), torch.tensor([0, 10]), r"labels must be in \[0, 10\), got values in \[0, 10\]"),
    (torch.rand(2, 3, 4, 4), torch.tensor([-1, 2]), r"labels must be in \[0, 10\)"),
    (torch.rand(2, 3, 4, 4), torch.tensor([0.0, 1.0]), "integer class indices"),
    (torch.rand(2, 3, 4, 4) * 255, torch.tensor([0, 1]), r"pixels in \[0, 1\]"),
    (torch.rand(2, 3, 4, 4) - 0.5, torch.tensor([0, 1]), r"pixels in \[0, 1\]"),
    (torch.full((2, 3, 4, 4), float("nan")), torch.tensor([0, 1]), "NaN"),
    (torch.full((2, 3, 4, 4), float("inf")), torch.tensor([0, 1]), "Inf"),
    (torch.rand(3, 4, 4), torch.tensor([0, 1, 2]), "rank 4"),
    (torch.rand(2, 3, 4, 4), torch.tensor([[0], [1]]), "rank 1"),
    (torch.rand(2, 3, 4, 4), torch.tensor([0, 1, 2]), "batch size mismatch"),
])
def test_validate_batch_errors(x, y, match):
    with pytest.raises(ValueError, match=match):
        validate_batch(x, y, num_classes=10)


def test_validate_batch_accepts_good_batch():
    x = torch.rand(4, 3, 4, 4)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 0.0, 1.0
    validate_batch(x, torch.tensor([0, 9, 3, 3]), num_classes=10)
