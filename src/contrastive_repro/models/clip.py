"""open_clip two-tower (image ViT/ResNet + text transformer) models from named presets, and an offline tokenizer.

Presets (``CLIP_PRESETS``):

* ``"tiny"``  -- CPU smoke tests: ViT width 64, 2 layers, patch 8 on 32x32 images; text width 64, 2 layers,
  context 16; embed dim 64 (~3.3M parameters, 3.2M of them the 49408-token embedding table).
* ``"small"`` -- the ``cpu`` profile: ViT width 128, 4 layers, patch 4 on 32x32; text width 128, 4 layers,
  context 32; embed dim 128.
* ``"paper-rn50"`` -- open_clip's ``RN50`` config (ModifiedResNet-50 image tower at 224x224, 12-layer width-512
  text transformer, context 77, embed dim 1024), built with ``open_clip.create_model("RN50", pretrained=None)``.

All text towers use open_clip's default BPE vocabulary (``SimpleTokenizer``, 49408 tokens), which ships inside the
``open_clip_torch`` package: :func:`get_tokenizer` needs no network. ``open_clip`` is imported lazily.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CLIP_PRESETS", "clip_config", "build_clip", "get_tokenizer", "encode_image", "encode_text",
           "logit_scale", "similarity"]

VOCAB_SIZE = 49408

CLIP_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32,
                       "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 16, "vocab_size": VOCAB_SIZE, "width": 64, "heads": 2, "layers": 2,
                     "mlp_ratio": 2.0},
    },
    "small": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 128, "layers": 4, "head_width": 32,
                       "mlp_ratio": 4.0},
        "text_cfg": {"context_length": 32, "vocab_size": VOCAB_SIZE, "width": 128, "heads": 4, "layers": 4,
                     "mlp_ratio": 4.0},
    },
    "paper-rn50": {"open_clip_model": "RN50"},
}


def clip_config(preset: str) -> dict[str, Any]:
    """A deep copy of a preset's config (edit it and pass it to :func:`build_clip`)."""
    if preset not in CLIP_PRESETS:
        raise ValueError(f"unknown CLIP preset {preset!r}; choose one of {sorted(CLIP_PRESETS)}")
    cfg = copy.deepcopy(CLIP_PRESETS[preset])
    if "open_clip_model" in cfg:
        import open_clip

        cfg.update(copy.deepcopy(open_clip.get_model_config(cfg["open_clip_model"])))
    return cfg


def _merge(base: dict, overrides: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def build_clip(config: str | Mapping[str, Any] = "tiny", pretrained: str | os.PathLike | None = None,
               **overrides) -> nn.Module:
    """Build an ``open_clip.CLIP`` from a preset name or a config dict.

    ``config``: a key of :data:`CLIP_PRESETS` or ``{"embed_dim", "vision_cfg", "text_cfg"[, "quick_gelu",
    "init_logit_scale", "init_logit_bias"]}`` as in open_clip's model configs. ``overrides`` are merged into the
    config recursively, e.g. ``build_clip("tiny", vision_cfg={"layers": 3}, init_logit_scale=math.log(1/0.07))``.
    ``pretrained``: a local checkpoint file (open_clip state dict) to load; nothing is ever downloaded.
    The model is in train mode, float32, on CPU.
    """
    import open_clip

    if isinstance(config, str):
        if config not in CLIP_PRESETS:
            raise ValueError(f"unknown CLIP preset {config!r}; choose one of {sorted(CLIP_PRESETS)}")
        preset = CLIP_PRESETS[config]
        if "open_clip_model" in preset:
            if overrides:
                raise ValueError(f"preset {config!r} is open_clip's own config and takes no overrides; pass "
                                 f"clip_config({config!r}) edited as a dict instead")
            return _create_open_clip(preset["open_clip_model"], pretrained)
        config = preset
    cfg = _merge(dict(config), overrides)
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(cfg)
    if missing:
        raise ValueError(f"CLIP config is missing {sorted(missing)}")
    cfg.pop("open_clip_model", None)
    cfg.pop("custom_text", None)
    model = open_clip.CLIP(**cfg)
    if pretrained is not None:
        _load_state(model, pretrained)
    return model


def _check_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what}: weights file not found at {path} (nothing is downloaded at run time; "
                                "put the file there or pass another path)")
    return path


def _create_open_clip(name: str, pretrained: str | os.PathLike | None) -> nn.Module:
    import logging

    import open_clip

    if pretrained is not None:
        pretrained = str(_check_file(pretrained, f"open_clip {name}"))
    root = logging.getLogger()
    level = root.level
    if pretrained is None:  # open_clip warns on the root logger that the model is randomly initialized
        root.setLevel(max(level, logging.ERROR))
    try:
        return open_clip.create_model(name, pretrained=pretrained, device="cpu")
    finally:
        root.setLevel(level)


def _load_state(model: nn.Module, path: str | os.PathLike) -> None:
    path = _check_file(path, "CLIP")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    model.load_state_dict(state)


def get_tokenizer(context_length: int | None = None, model: nn.Module | None = None):
    """open_clip's BPE ``SimpleTokenizer`` (vocabulary bundled with the package; works offline).

    ``context_length`` defaults to ``model.context_length`` when a model is given, else 77. Calling the tokenizer
    on a string or list of strings returns a ``LongTensor [N, context_length]`` (start/end tokens, zero padding,
    truncation of long texts).
    """
    from open_clip.tokenizer import SimpleTokenizer

    if context_length is None:
        context_length = int(getattr(model, "context_length", 77)) if model is not None else 77
    return SimpleTokenizer(context_length=context_length)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def encode_image(model: nn.Module, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Image embeddings ``[B, embed_dim]``, L2-normalized unless ``normalize=False``."""
    return _unwrap(model).encode_image(images, normalize=normalize)


def encode_text(model: nn.Module, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Text embeddings ``[B, embed_dim]`` from token ids ``[B, context_length]``, L2-normalized by default."""
    return _unwrap(model).encode_text(tokens, normalize=normalize)


def logit_scale(model: nn.Module, exp: bool = True, max_scale: float | None = None) -> torch.Tensor:
    """The learned inverse temperature: ``exp(model.logit_scale)`` (or the raw log value with ``exp=False``),
    clamped to ``max_scale`` if given (CLIP clamps at 100). Keeps the autograd graph."""
    ls = _unwrap(model).logit_scale
    if not exp:
        return ls
    scale = ls.exp()
    return scale.clamp(max=max_scale) if max_scale is not None else scale


def similarity(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix ``[N_img, N_txt]`` of (re-)normalized features."""
    return F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
