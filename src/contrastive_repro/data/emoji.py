"""Emoji image-caption pairs, rendered offline from Debian packages.

* ``/usr/share/unicode/emoji/emoji-test.txt`` (package ``unicode-data``) lists every emoji with its code points,
  qualification status, CLDR name, group and subgroup. Only ``fully-qualified`` entries are kept (3,655 in
  Unicode 15.0).
* ``/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf`` (package ``fonts-noto-color-emoji``) is a colour bitmap font
  whose only strike is 109 px; Pillow draws it with ``embedded_color=True`` (sequences such as ZWJ families need
  Pillow's raqm layout, which the wheels ship).

Each emoji is drawn black-on-white at 109 px, cropped to its ink, padded to a centred white square and resized with
Lanczos antialiasing to ``size x size``. Renders with no ink ("blank") are dropped, and so by default are sequences
the font lays out as several glyphs ("multi_glyph", i.e. wider than 1.5 emoji); both are reported in
``EmojiDataset.dropped``.

The rendered tensors are cached (see :mod:`contrastive_repro.data.cache`) under a name keyed by the size, the
SHA-256 of emoji-test.txt, the font file's size and mtime and :data:`EMOJI_CODE_VERSION`; the cache carries a
checksum of its contents and is rebuilt, with a warning, when it is corrupt or stale.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ._common import _LabelsMixin, as_label_tensor
from .cache import CacheWarning, default_cache_dir, file_sha256, load_checked, save_checked
from .errors import CorruptDatasetError, DatasetNotFoundError, EmptyDatasetError
from .splits import split_by_class, split_by_item

__all__ = ["EMOJI_TEST_PATH", "NOTO_EMOJI_FONT", "EMOJI_CODE_VERSION", "EmojiEntry", "parse_emoji_test",
           "EmojiRenderer", "EmojiDataset", "load_emoji", "render_emoji_payload"]

EMOJI_TEST_PATH = Path("/usr/share/unicode/emoji/emoji-test.txt")
NOTO_EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
#: Bump when the rendering or the cached payload changes, so old caches are not reused.
EMOJI_CODE_VERSION = 1
EMOJI_HINT = "install them with:  apt-get install fonts-noto-color-emoji unicode-data"
EMOJI_TEST_LAYOUT = """\
/usr/share/unicode/emoji/emoji-test.txt   (Debian package unicode-data), lines like
  # group: Smileys & Emotion
  # subgroup: face-smiling
  1F600 ; fully-qualified # 😀 E1.0 grinning face"""
FONT_LAYOUT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf   (Debian package fonts-noto-color-emoji)"

_LINE = re.compile(r"^(?P<cps>[0-9A-Fa-f]{4,6}(?:\s+[0-9A-Fa-f]{4,6})*)\s*;\s*(?P<status>[a-z-]+)\s*#(?P<comment>.*)$")
_VERSION = re.compile(r"^E(\d+\.\d+)$")


def _parse_comment(comment: str) -> tuple[str, str]:
    """``"😀 E1.0 grinning face"`` -> ``("1.0", "grinning face")``; the glyph and the version are optional."""
    tokens = comment.split()
    if tokens and not _VERSION.match(tokens[0]) and len(tokens) > 1:
        tokens = tokens[1:]  # drop the rendered glyph (the code points are authoritative)
    version = ""
    if tokens and _VERSION.match(tokens[0]):
        version = _VERSION.match(tokens[0]).group(1)
        tokens = tokens[1:]
    return version, " ".join(tokens)


@dataclass(frozen=True)
class EmojiEntry:
    """One line of emoji-test.txt."""

    codepoints: str   # "1F468 200D 1F469" (as written in the file)
    emoji: str        # the character sequence built from the code points
    name: str         # CLDR short name, e.g. "grinning face"
    group: str        # e.g. "Smileys & Emotion"
    subgroup: str     # e.g. "face-smiling"
    status: str       # "fully-qualified", ...
    version: str      # emoji version, e.g. "1.0" ("" if absent)


def parse_emoji_test(source: str | os.PathLike | None = None, *, text: str | None = None,
                     statuses: Sequence[str] = ("fully-qualified",)) -> list[EmojiEntry]:
    """Parse emoji-test.txt (``source`` path, default the Debian file) or its ``text``; keep the given statuses.

    Raises :class:`DatasetNotFoundError` when the file is missing and :class:`CorruptDatasetError` (with the line
    number) for a data line that does not parse or comes before any ``# group:`` header.
    """
    path = EMOJI_TEST_PATH if source is None else Path(source)
    if text is None:
        if not path.is_file():
            raise DatasetNotFoundError("emoji-test.txt", path, EMOJI_TEST_LAYOUT, EMOJI_HINT)
        text = path.read_text(encoding="utf-8")
    keep = set(statuses)
    group = subgroup = None
    out: list[EmojiEntry] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            body = line[1:].strip()
            if body.startswith("group:"):
                group, subgroup = body[len("group:"):].strip(), None
            elif body.startswith("subgroup:"):
                subgroup = body[len("subgroup:"):].strip()
            continue
        m = _LINE.match(line)
        if m is None:
            raise CorruptDatasetError("emoji-test.txt", path, f"line {lineno} does not parse: {raw!r}")
        if group is None or subgroup is None:
            raise CorruptDatasetError("emoji-test.txt", path, f"line {lineno} comes before a '# group:' / "
                                                              f"'# subgroup:' header")
        if m["status"] not in keep:
            continue
        version, name = _parse_comment(m["comment"])
        if not name:
            raise CorruptDatasetError("emoji-test.txt", path, f"line {lineno} has no emoji name: {raw!r}")
        cps = m["cps"].split()
        out.append(EmojiEntry(codepoints=" ".join(c.upper() for c in cps),
                              emoji="".join(chr(int(c, 16)) for c in cps), name=name, group=group,
                              subgroup=subgroup, status=m["status"], version=version))
    return out


class EmojiRenderer:
    """Draw emoji with a colour font and return ``size x size`` RGB uint8 arrays (or a reason for failure)."""

    def __init__(self, font_path: str | os.PathLike | None = None, font_size: int = 109, size: int = 32,
                 min_ink_pixels: int = 20, ink_threshold: int = 16, max_advance_ratio: float = 1.5):
        from PIL import ImageFont

        self.font_path = NOTO_EMOJI_FONT if font_path is None else Path(font_path)
        if not self.font_path.is_file():
            raise DatasetNotFoundError("Noto Color Emoji font", self.font_path, FONT_LAYOUT, EMOJI_HINT)
        try:
            self.font = ImageFont.truetype(str(self.font_path), font_size)
        except OSError as e:
            raise CorruptDatasetError("emoji font", self.font_path,
                                      f"Pillow cannot load it at {font_size} px ({e}); NotoColorEmoji.ttf only has "
                                      f"a 109 px bitmap strike") from e
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.font_size, self.size = font_size, size
        self.min_ink_pixels, self.ink_threshold, self.max_advance_ratio = min_ink_pixels, ink_threshold, max_advance_ratio
        self.reference_advance = self.font.getlength("\U0001F600") or 1.25 * font_size
        self.pad = max(8, font_size // 5)
        self._ink_lut = [255 if 255 - v > ink_threshold else 0 for v in range(256)] * 3

    def render_full(self, text: str):
        """The glyph(s) drawn on a white canvas (PIL RGB image), before cropping."""
        from PIL import Image, ImageDraw

        advance = self.font.getlength(text)
        w = int(math.ceil(max(advance, self.reference_advance))) + 2 * self.pad
        h = int(math.ceil(1.6 * self.font_size)) + 2 * self.pad
        canvas = Image.new("RGB", (w, h), (255, 255, 255))
        ImageDraw.Draw(canvas).text((self.pad, self.pad), text, font=self.font, embedded_color=True)
        return canvas, advance

    def render(self, text: str) -> tuple[np.ndarray | None, str]:
        """``(array [size,size,3] uint8, "ok")`` or ``(None, "blank" | "multi_glyph")``."""
        from PIL import Image, ImageChops

        canvas, advance = self.render_full(text)
        if advance > self.max_advance_ratio * self.reference_advance:
            return None, "multi_glyph"
        # ink = any channel darker than white by more than ink_threshold (computed in Pillow's C code: fast)
        r, g, b = canvas.point(self._ink_lut).split()
        ink = ImageChops.lighter(ImageChops.lighter(r, g), b)
        if ink.histogram()[255] < self.min_ink_pixels:
            return None, "blank"
        crop = canvas.crop(ink.getbbox())
        side = max(crop.width, crop.height)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(crop, ((side - crop.width) // 2, (side - crop.height) // 2))
        if side != self.size:
            square = square.resize((self.size, self.size), Image.Resampling.LANCZOS)
        return np.asarray(square, dtype=np.uint8), "ok"


class EmojiDataset(_LabelsMixin, Dataset):
    """Rendered emoji with captions: ``ds[i] -> (image, caption, label)``.

    Attributes:
        images: uint8 ``[N, 3, size, size]`` (white background).
        captions: CLDR names (``"grinning face"``); ``codepoints`` (``"1F600"``) and ``emoji`` (the characters).
        group_names / subgroup_names: per-item group and subgroup strings.
        groups / subgroups: the class vocabularies (file order); ``group_labels`` / ``subgroup_labels`` index them.
        labels / classes: the ``label_level`` ("subgroup" or "group") labels and names.
        dropped: ``{"blank": [...], "multi_glyph": [...]}`` captions removed at render time.
        from_cache, cache_path, render_seconds (``None`` when loaded from the cache), load_seconds.

    ``image`` is the ``[3,size,size]`` uint8 tensor, passed through ``transform`` when given.
    """

    def __init__(self, images: torch.Tensor, captions: Sequence[str], codepoints: Sequence[str],
                 group_names: Sequence[str], subgroup_names: Sequence[str], *, label_level: str = "subgroup",
                 transform: Callable | None = None, groups: Sequence[str] | None = None,
                 subgroups: Sequence[str] | None = None, dropped: dict[str, list[str]] | None = None):
        n = len(images)
        if n == 0:
            raise EmptyDatasetError("EmojiDataset: no emoji (all dropped, or the source lists none)")
        if not (len(captions) == len(codepoints) == len(group_names) == len(subgroup_names) == n):
            raise ValueError("EmojiDataset: images, captions, codepoints, groups and subgroups differ in length")
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 [N,3,H,W], got {images.dtype} {tuple(images.shape)}")
        if label_level not in ("subgroup", "group"):
            raise ValueError(f"label_level must be 'subgroup' or 'group', got {label_level!r}")
        self.images = images
        self.captions, self.codepoints = list(captions), list(codepoints)
        self.emoji = ["".join(chr(int(c, 16)) for c in cp.split()) for cp in self.codepoints]
        self.group_names, self.subgroup_names = list(group_names), list(subgroup_names)
        self.groups = list(groups) if groups is not None else list(dict.fromkeys(self.group_names))
        self.subgroups = list(subgroups) if subgroups is not None else list(dict.fromkeys(self.subgroup_names))
        gi, si = {g: i for i, g in enumerate(self.groups)}, {s: i for i, s in enumerate(self.subgroups)}
        self.group_labels = as_label_tensor([gi[g] for g in self.group_names])
        self.subgroup_labels = as_label_tensor([si[s] for s in self.subgroup_names])
        self.label_level, self.transform = label_level, transform
        self.dropped = dropped if dropped is not None else {"blank": [], "multi_glyph": []}
        self.from_cache, self.cache_path = False, None
        self.render_seconds: float | None = None
        self.load_seconds: float | None = None

    @property
    def _labels(self) -> torch.Tensor:  # type: ignore[override]
        return self.subgroup_labels if self.label_level == "subgroup" else self.group_labels

    @property
    def classes(self) -> list[str]:  # type: ignore[override]
        return self.subgroups if self.label_level == "subgroup" else self.groups

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.images[i]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.captions[i], int(self._labels[i])

    def subset(self, indices: Any, relabel: bool = False) -> "EmojiDataset":
        """The items at ``indices``. Class vocabularies are kept (labels unchanged) unless ``relabel=True``, which
        keeps only the classes present so labels are contiguous ``0..C'-1``."""
        idx = as_label_tensor(indices)
        pick = idx.tolist()
        groups = subgroups = None
        if not relabel:
            groups, subgroups = self.groups, self.subgroups
        out = EmojiDataset(self.images[idx], [self.captions[i] for i in pick], [self.codepoints[i] for i in pick],
                           [self.group_names[i] for i in pick], [self.subgroup_names[i] for i in pick],
                           label_level=self.label_level, transform=self.transform, groups=groups,
                           subgroups=subgroups, dropped=self.dropped)
        out.from_cache, out.cache_path = self.from_cache, self.cache_path
        return out

    def split(self, by: str = "class", test_fraction: float = 0.5, seed: int = 0,
              relabel: bool = False) -> tuple["EmojiDataset", "EmojiDataset"]:
        """``by="class"``: disjoint (sub)group class sets (:func:`split_by_class`); ``by="item"``: held-out emoji of
        every class, stratified (:func:`split_by_item`). Deterministic given ``seed``."""
        if by == "class":
            tr, te = split_by_class(self.labels, test_fraction, seed=seed)
        elif by == "item":
            tr, te = split_by_item(self.labels, test_fraction, seed=seed)
        else:
            raise ValueError(f"by must be 'class' or 'item', got {by!r}")
        return self.subset(tr, relabel), self.subset(te, relabel)

    def __repr__(self) -> str:
        return (f"EmojiDataset(n={len(self)}, size={self.size}, {self.label_level}s={self.num_classes}, "
                f"dropped={{blank: {len(self.dropped['blank'])}, multi_glyph: {len(self.dropped['multi_glyph'])}}})")


def _cache_key(size: int, font_size: int, emoji_test: Path, font: Path, drop_multi_glyph: bool) -> dict:
    st = font.stat()
    return {"kind": "emoji", "code_version": EMOJI_CODE_VERSION, "size": int(size), "font_size": int(font_size),
            "emoji_test_sha256": file_sha256(emoji_test), "font_bytes": int(st.st_size),
            "font_mtime_ns": int(st.st_mtime_ns), "drop_multi_glyph": bool(drop_multi_glyph)}


def render_emoji_payload(entries: Sequence[EmojiEntry], renderer: EmojiRenderer, drop_multi_glyph: bool = True) -> dict:
    """Render ``entries``; return the cache payload (images, per-item strings, dropped lists)."""
    arrays, keep, dropped = [], [], {"blank": [], "multi_glyph": []}
    for e in entries:
        arr, status = renderer.render(e.emoji)
        if status == "multi_glyph" and not drop_multi_glyph:
            saved, renderer.max_advance_ratio = renderer.max_advance_ratio, float("inf")
            try:
                arr, status = renderer.render(e.emoji)
            finally:
                renderer.max_advance_ratio = saved
        if arr is None:
            dropped[status].append(e.name)
            continue
        arrays.append(arr)
        keep.append(e)
    s = renderer.size
    images = (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous() if arrays
              else torch.zeros(0, 3, s, s, dtype=torch.uint8))
    return {"images": images, "captions": [e.name for e in keep], "codepoints": [e.codepoints for e in keep],
            "group_names": [e.group for e in keep], "subgroup_names": [e.subgroup for e in keep],
            "groups": list(dict.fromkeys(e.group for e in entries)),
            "subgroups": list(dict.fromkeys(e.subgroup for e in entries)),
            "dropped_blank": dropped["blank"], "dropped_multi_glyph": dropped["multi_glyph"]}


def load_emoji(size: int = 32, *, emoji_test_path: str | os.PathLike | None = None,
               font_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
               use_cache: bool = True, label_level: str = "subgroup", transform: Callable | None = None,
               drop_multi_glyph: bool = True, font_size: int = 109) -> EmojiDataset:
    """All fully-qualified emoji as an :class:`EmojiDataset` of ``size x size`` RGB images with captions.

    The first call renders them (a few seconds for ~3,650 emoji) and writes
    ``<cache_dir>/emoji_<size>px_<key hash>.pt``; later calls load that file. ``use_cache=False`` neither reads nor
    writes it. Missing font / emoji-test.txt raise :class:`DatasetNotFoundError` with the ``apt-get`` command.
    """
    t0 = time.perf_counter()
    emoji_test = EMOJI_TEST_PATH if emoji_test_path is None else Path(emoji_test_path)
    font = NOTO_EMOJI_FONT if font_path is None else Path(font_path)
    if not emoji_test.is_file():
        raise DatasetNotFoundError("emoji-test.txt", emoji_test, EMOJI_TEST_LAYOUT, EMOJI_HINT)
    if not font.is_file():
        raise DatasetNotFoundError("Noto Color Emoji font", font, FONT_LAYOUT, EMOJI_HINT)
    payload, cache_path, render_seconds = None, None, None
    if use_cache:
        key = _cache_key(size, font_size, emoji_test, font, drop_multi_glyph)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        cache_path = default_cache_dir(cache_dir) / f"emoji_{int(size)}px_{digest}.pt"
        payload = load_checked(cache_path, key)
    from_cache = payload is not None
    if payload is None:
        t_render = time.perf_counter()
        entries = parse_emoji_test(emoji_test)
        renderer = EmojiRenderer(font, font_size=font_size, size=size)
        payload = render_emoji_payload(entries, renderer, drop_multi_glyph)
        render_seconds = time.perf_counter() - t_render
        if use_cache:
            try:
                save_checked(cache_path, payload, key)
            except OSError as e:  # a read-only or full disk must not stop the experiment
                warnings.warn(f"could not write the emoji cache {cache_path}: {e}", CacheWarning, stacklevel=2)
    present_g, present_s = set(payload["group_names"]), set(payload["subgroup_names"])
    ds = EmojiDataset(payload["images"], payload["captions"], payload["codepoints"], payload["group_names"],
                      payload["subgroup_names"], label_level=label_level, transform=transform,
                      groups=[g for g in payload["groups"] if g in present_g],
                      subgroups=[s for s in payload["subgroups"] if s in present_s],
                      dropped={"blank": list(payload["dropped_blank"]),
                               "multi_glyph": list(payload["dropped_multi_glyph"])})
    ds.from_cache, ds.cache_path, ds.render_seconds = from_cache, cache_path, render_seconds
    ds.load_seconds = time.perf_counter() - t0
    return ds
