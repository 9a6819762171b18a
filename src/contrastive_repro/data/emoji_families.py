"""Emoji *families*: an emoji and its skin-tone variants as one class (open-set retrieval with many small classes).

Unicode writes a skin-tone variant as the base sequence with one or more Fitzpatrick modifiers
(U+1F3FB..U+1F3FF) inserted, e.g. ``1F44B`` "waving hand" and ``1F44B 1F3FD`` "waving hand: medium skin tone".
Removing the modifiers (and the emoji presentation selector U+FE0F, which some bases carry and their variants do
not) gives the family key. On Unicode 15.0's 3,655 fully-qualified emoji this gives 1,876 keys: 298 families of 6
(base + 5 tones), 13 of 20 or 26 (two-person emoji with two independent tones) and 1,565 singletons.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["SKIN_TONE_MODIFIERS", "emoji_family_key", "emoji_family_labels", "emoji_family_representatives"]

SKIN_TONE_MODIFIERS = frozenset({"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"})
_VS16 = "FE0F"


def emoji_family_key(codepoints: str) -> str:
    """``"1F44B 1F3FD"`` -> ``"1F44B"``: the code points without skin-tone modifiers and U+FE0F (upper case)."""
    cps = [c.upper() for c in str(codepoints).split()]
    if not cps:
        raise ValueError("emoji_family_key: empty code point string")
    return " ".join(c for c in cps if c not in SKIN_TONE_MODIFIERS and c != _VS16)


def emoji_family_labels(codepoints: Sequence[str], min_size: int = 2) -> torch.Tensor:
    """Dense family labels ``0..F-1`` (int64, numbered by first appearance); ``-1`` for emoji whose family has fewer
    than ``min_size`` members (singletons have no positive pair)."""
    if int(min_size) < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size!r}")
    keys = [emoji_family_key(c) for c in codepoints]
    uniq, inv, counts = np.unique(np.asarray(keys, dtype=object), return_inverse=True, return_counts=True)
    keep = counts >= int(min_size)
    first = {}
    out = np.full(len(keys), -1, dtype=np.int64)
    for i, k in enumerate(inv):
        if keep[k]:
            out[i] = first.setdefault(int(k), len(first))
    return torch.as_tensor(out)


def emoji_family_representatives(codepoints: Sequence[str]) -> torch.Tensor:
    """Boolean mask keeping one emoji per family (the first in file order, which is the base, tone-less emoji):
    labels built on it (e.g. sub-groups) carry no skin-tone near-duplicates."""
    seen, keep = set(), []
    for c in codepoints:
        k = emoji_family_key(c)
        keep.append(k not in seen)
        seen.add(k)
    return torch.as_tensor(keep, dtype=torch.bool)
