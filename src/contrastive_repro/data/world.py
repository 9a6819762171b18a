"""A generated multimodal world for the latent-modality-structure (CVPR 2023) experiments.

Scenes of 1-3 coloured shapes on a dark background, rendered to small RGB images, with everything a vision-language
experiment needs and the ground truth to check it:

* ``captions`` -- templated English ("a picture of a large red circle at the top left and a small blue square at the
  bottom right"), where each attribute of each object is omitted with probability ``info_gap`` (the information gap
  between image and text is a parameter: 0 -> every attribute is mentioned, 1 -> none is, only "an object");
* ``class_labels`` / ``class_names`` -- the colour + shape of the scene's *main* object ("red circle"), for
  zero-shot classification by text prompts and linear probes. By default the main object is the only large object,
  so the label is visible in the image;
* ``vqa`` -- (scene, question, answer index) with a fixed ``answer_vocab`` ("what colour is the circle?" -> "red",
  "how many objects are there?" -> "2", "is there a square?" -> "yes");
* ``nlvr`` -- NLVR2-style (left scene, right scene, statement, bool) about an image *pair*;
* ``ve`` -- SNLI-VE-style (scene, hypothesis, label) with labels entailment / neutral / contradiction; a *neutral*
  hypothesis states a property that is never rendered and never captioned (material, weight, temperature,
  wetness, fragility of an object that is in the image), so the image can neither confirm nor refute it;
* ``balanced=True`` (:class:`WorldConfig`): every task needs the image -- VE is two-way and VE / NLVR labels are
  balanced true / false per exact text, VQA answers per question (counts, existence) or per question type, so a
  model that reads only the text is at chance (:func:`balance_by_key`; notebook 05);
* :class:`Vocab` -- a tiny word-level tokenizer; :func:`world_vocab` covers every word the generator can emit.

Geometry: the image is split into a ``grid x grid`` lattice of cells; each object occupies its own cell (so objects
never overlap and "position" is the cell's name: "top left", ..., or for a 3 x 3 grid also "top", "left",
"center", ...), with a random offset inside the cell. Coordinates are in pixels, x to the right and y down, pixel
``(r, c)`` covering ``[c, c+1) x [r, r+1)``; shapes are drawn anti-aliased (``supersample``) in the object's colour
plus a per-object colour jitter, and Gaussian pixel noise is added.

Determinism: everything is a function of ``(config, n_scenes, seed)``. Independent random streams (numpy
``SeedSequence(seed).spawn``) drive the scenes, the rendering, the captions, VQA, VE and NLVR, so changing e.g.
``info_gap`` changes the captions only -- same scenes, same images, same questions. The caption stream draws the
same numbers whatever ``info_gap`` is, so the omitted attributes are nested: what is omitted at a smaller gap is
omitted at every larger gap.

Speed (CPU time, one core): about 5,000 scenes per second with captions, VQA, VE and NLVR, about 8,000 with
images and captions only (``vqa_per_scene=ve_per_scene=nlvr_per_scene=0``); rendering alone about 11,000.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations
from typing import Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "SHAPES", "COLOURS", "SIZES", "ATTRIBUTES", "VQA_TYPES", "VE_LABELS", "NEUTRAL_PROPERTIES",
    "SceneObject", "WorldConfig", "World", "Vocab",
    "generate_world", "sample_scenes", "render_scenes", "make_caption", "position_names", "world_vocab",
    "answer_vocab", "balance_by_key", "VE_BALANCED_LABELS",
]

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "white": (240, 240, 240),
}
SIZES = ("small", "large")
ATTRIBUTES = ("size", "colour", "shape", "position")  # the per-object attributes a caption can mention
VQA_TYPES = ("count", "count_colour", "count_shape", "exist", "colour", "shape", "size", "position")
VE_LABELS = ("entailment", "neutral", "contradiction")
VE_BALANCED_LABELS = ("entailment", "contradiction")
MATERIALS = ("metal", "wood", "rubber", "glass", "plastic", "paper")
NEUTRAL_PROPERTIES = ("heavy", "hot", "cold", "wet", "fragile", "new", "old")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = ("{}", "a picture of {}", "an image of {}", "a scene with {}")
_PLURALS = {"cross": "crosses"}

# Size of each object relative to its cell, and the extent of each shape relative to the object radius.
_RADIUS = {"small": 0.22, "large": 0.40}
_EXTENT = 1.1

# Every fixed word of every template below (kept beside them; tests check that world_vocab covers a world's texts).
_TEMPLATE_TEXT = """
a an and , at the of picture image scene with object objects
how many are there is ? what colour shape size where yes
no one to left right above below made heavy
has have more than image images same number both contain contains neither exactly does not in total
top bottom center middle
"""


def _plural(noun: str) -> str:
    return _PLURALS.get(noun, noun + "s")


def _article(text: str) -> str:
    return ("an " if text[:1] in "aeiou" else "a ") + text


def _number(k: int) -> str:
    return NUMBER_WORDS[k] if 0 <= k < len(NUMBER_WORDS) else str(k)


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def position_names(grid: int) -> list[list[str]]:
    """``names[row][col]``: "top left", "top right", ... for a 2 x 2 grid; 3 x 3 adds "top", "left", "center"..."""
    if grid == 2:
        rows, cols = ("top", "bottom"), ("left", "right")
        return [[f"{r} {c}" for c in cols] for r in rows]
    if grid == 3:
        rows, cols = ("top", "", "bottom"), ("left", "", "right")
        return [[(f"{r} {c}".strip() or "center") for c in cols] for r in rows]
    raise ValueError(f"grid must be 2 or 3, got {grid}")


# ----------------------------------------------------------------------------------------------------------------
# configuration and scenes
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneObject:
    """One object. ``cx``, ``cy``: centre in pixels (x right, y down); ``radius`` in pixels; ``row``/``col``: cell."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    position: str
    cx: float
    cy: float
    radius: float

    @property
    def centre_pixel(self) -> tuple[int, int]:
        """``(row, col)`` of the pixel that contains the object's centre (always fully inside the shape)."""
        return int(self.cy), int(self.cx)

    def attr(self, name: str) -> str:
        return getattr(self, name)


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of the generated world (all have defaults; see :func:`generate_world`).

    ``main_object_large``: object 0 of every scene (the *main* object, whose colour + shape is the class label) is
    large and every other object small, so the label is identifiable in the image. With ``False`` sizes are random
    and the label is still object 0's (then it is not identifiable when several objects are large).
    ``nlvr_per_scene``: number of NLVR pairs = round(n_scenes * nlvr_per_scene).
    ``balanced``: every task needs the image (see :func:`balance_by_key`). ``oversample`` x as many candidate items
    are drawn and cut down so that the text alone cannot tell the answer: VE and NLVR labels are balanced per exact
    text (true / false equally often for every hypothesis / statement; VE is two-way, entailment / contradiction:
    a *neutral* hypothesis is recognisable from its words alone, so there are none), VQA answers are balanced per
    question text for the questions without a referring expression (counts, existence) and per question type for
    the others (answers of a type occurring less than ``min_share`` x as often as its most common one are dropped).
    The item counts then vary: about ``oversample x per_scene x`` the kept fraction per scene. The balance holds over
    all scenes, so on one split of them a text's labels lean slightly the other way than on the rest: a rule that
    memorises labels per text is a little *below* chance on held-out scenes (tests/test_world.py).
    """

    image_size: int = 32
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    colours: tuple[str, ...] = tuple(COLOURS)
    grid: int = 2
    min_objects: int = 1
    max_objects: int = 3
    main_object_large: bool = True
    info_gap: float = 0.0
    noise_std: float = 6.0
    colour_jitter: float = 12.0
    background: tuple[int, int, int] = (24, 24, 24)
    supersample: int = 2
    vqa_per_scene: int = 2
    ve_per_scene: int = 3
    nlvr_per_scene: float = 1.0
    caption_templates: tuple[str, ...] = CAPTION_TEMPLATES
    balanced: bool = False
    oversample: int = 3
    min_share: float = 0.25

    def __post_init__(self):
        object.__setattr__(self, "shapes", tuple(self.shapes))
        object.__setattr__(self, "colours", tuple(self.colours))
        object.__setattr__(self, "caption_templates", tuple(self.caption_templates))
        object.__setattr__(self, "background", tuple(int(v) for v in self.background))
        bad = [s for s in self.shapes if s not in SHAPES]
        if bad or len(set(self.shapes)) != len(self.shapes) or len(self.shapes) < 2:
            raise ValueError(f"shapes must be >= 2 distinct names from {SHAPES}, got {self.shapes}")
        bad = [c for c in self.colours if c not in COLOURS]
        if bad or len(set(self.colours)) != len(self.colours) or len(self.colours) < 2:
            raise ValueError(f"colours must be >= 2 distinct names from {tuple(COLOURS)}, got {self.colours}")
        if self.grid not in (2, 3):
            raise ValueError(f"grid must be 2 or 3, got {self.grid}")
        if not (1 <= self.min_objects <= self.max_objects <= min(self.grid ** 2, 9)):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= grid^2 ({self.grid ** 2}), "
                             f"got {self.min_objects}, {self.max_objects}")
        if self.image_size < 8 * self.grid:
            raise ValueError(f"image_size must be >= 8 * grid = {8 * self.grid}, got {self.image_size}")
        if not (0.0 <= float(self.info_gap) <= 1.0):
            raise ValueError(f"info_gap must lie in [0, 1], got {self.info_gap}")
        if self.supersample < 1 or self.noise_std < 0 or self.colour_jitter < 0:
            raise ValueError("supersample must be >= 1 and noise_std, colour_jitter >= 0")
        if self.vqa_per_scene < 0 or self.ve_per_scene < 0 or self.nlvr_per_scene < 0:
            raise ValueError("vqa_per_scene, ve_per_scene and nlvr_per_scene must be >= 0")
        if self.oversample < 1 or not (0.0 <= self.min_share <= 1.0):
            raise ValueError(f"oversample must be >= 1 and min_share in [0, 1], got {self.oversample}, "
                             f"{self.min_share}")
        if not self.caption_templates or any(t.count("{}") != 1 for t in self.caption_templates):
            raise ValueError("each caption template must contain exactly one '{}'")

    @property
    def positions(self) -> list[str]:
        return [name for row in position_names(self.grid) for name in row]

    @property
    def class_names(self) -> list[str]:
        """``f"{colour} {shape}"``, index ``colour_index * len(shapes) + shape_index``."""
        return [f"{c} {s}" for c in self.colours for s in self.shapes]


def sample_scenes(n_scenes: int, cfg: WorldConfig, rng: np.random.Generator) -> list[tuple[SceneObject, ...]]:
    """Draw ``n_scenes`` scenes: object count, distinct cells, shape / colour / size, offset inside the cell."""
    names = position_names(cfg.grid)
    cell = cfg.image_size / cfg.grid
    k_max = cfg.max_objects
    counts = rng.integers(cfg.min_objects, cfg.max_objects + 1, n_scenes).tolist()
    cells = np.argsort(rng.random((n_scenes, cfg.grid * cfg.grid)), axis=1)[:, :k_max].tolist()
    shapes = rng.integers(0, len(cfg.shapes), (n_scenes, k_max)).tolist()
    colours = rng.integers(0, len(cfg.colours), (n_scenes, k_max)).tolist()
    big = rng.integers(0, 2, (n_scenes, k_max)).tolist()
    offsets = (2 * rng.random((n_scenes, k_max, 2)) - 1).tolist()
    radius = {sz: _RADIUS[sz] * cell for sz in SIZES}
    slack = {sz: max(0.0, cell / 2 - _EXTENT * radius[sz] - 0.5) for sz in SIZES}
    scenes = []
    for i in range(n_scenes):
        objs = []
        for k in range(counts[i]):
            if cfg.main_object_large:
                size = "large" if k == 0 else "small"
            else:
                size = SIZES[big[i][k]]
            row, col = divmod(cells[i][k], cfg.grid)
            objs.append(SceneObject(cfg.shapes[shapes[i][k]], cfg.colours[colours[i][k]], size, row, col,
                                    names[row][col], (col + 0.5) * cell + offsets[i][k][0] * slack[size],
                                    (row + 0.5) * cell + offsets[i][k][1] * slack[size], radius[size]))
        scenes.append(tuple(objs))
    return scenes


# ----------------------------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------------------------
def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of the points (dx, dy) (offsets from the centre, y down) inside the shape of radius r."""
    adx, ady = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (adx <= 0.78 * r) & (ady <= 0.78 * r)
    if shape == "diamond":
        return adx + ady <= 1.05 * r
    if shape == "cross":
        arm, half = 1.0 * r, 0.32 * r
        return ((adx <= half) & (ady <= arm)) | ((ady <= half) & (adx <= arm))
    if shape == "triangle":
        # equilateral, pointing up, centroid at the centre, circumradius R = 1.1 r
        big_r = _EXTENT * r
        return (dy <= big_r / 2) & (adx <= (dy + big_r) / np.sqrt(3.0))
    raise ValueError(f"unknown shape {shape!r}")


def render_scenes(scenes: Sequence[Sequence[SceneObject]], cfg: WorldConfig, rng: np.random.Generator,
                  shift: float = 0.0, chunk: int = 1024) -> np.ndarray:
    """Render scenes to ``uint8 [N, 3, H, W]``: anti-aliased shapes, per-object colour jitter, Gaussian noise.

    ``shift`` > 0 moves each object by a uniform offset in ``[-shift, shift]`` pixels per axis (an augmentation
    that keeps the scene's description true for small shifts; objects are kept inside the image).

    Objects occupy distinct cells, so their covered areas are disjoint and the image is exactly
    ``background + sum_objects coverage * (colour - background)``: the coverage windows of all objects of one size
    in a chunk are computed at once (vectorised), then added to their scenes.
    """
    size, ss = cfg.image_size, cfg.supersample
    cell = size / cfg.grid
    bg = np.asarray(cfg.background, dtype=np.float32)
    palette = {name: np.asarray(rgb, dtype=np.float32) - bg for name, rgb in COLOURS.items()}
    wins = {sz: int(np.ceil(2 * _EXTENT * _RADIUS[sz] * cell)) + 3 for sz in SIZES}
    pad = max(wins.values()) // 2 + 2                     # canvas margin so that windows never leave it
    out = np.empty((len(scenes), 3, size, size), dtype=np.uint8)
    for start in range(0, len(scenes), chunk):
        part = scenes[start:start + chunk]
        canvas = np.empty((len(part), size + 2 * pad, size + 2 * pad, 3), dtype=np.float32)
        canvas[:] = bg
        for sz in SIZES:
            win = wins[sz]
            owners = [i for i, sc in enumerate(part) for o in sc if o.size == sz]
            objs = [o for sc in part for o in sc if o.size == sz]
            m = len(objs)
            if m == 0:
                continue
            cx = np.array([o.cx for o in objs], dtype=np.float32)
            cy = np.array([o.cy for o in objs], dtype=np.float32)
            r = np.array([o.radius for o in objs], dtype=np.float32)
            if shift > 0:
                dxy = rng.uniform(-shift, shift, (m, 2)).astype(np.float32)
                lo, hi = _EXTENT * r + 0.5, size - _EXTENT * r - 0.5
                cx = np.clip(cx + dxy[:, 0], lo, hi)
                cy = np.clip(cy + dxy[:, 1], lo, hi)
            x0 = np.floor(cx - win / 2).astype(np.int64)
            y0 = np.floor(cy - win / 2).astype(np.int64)
            sub = ((np.arange(win * ss) + 0.5) / ss).astype(np.float32)
            dx = (x0[:, None] + sub[None, :]) - cx[:, None]     # [m, win*ss] offsets of the sub-pixel centres
            dy = (y0[:, None] + sub[None, :]) - cy[:, None]
            mask = np.zeros((m, win * ss, win * ss), dtype=bool)
            shapes = np.array([o.shape for o in objs])
            for shape in sorted(set(shapes.tolist())):
                j = shapes == shape
                mask[j] = _inside(shape, dx[j][:, None, :], dy[j][:, :, None], r[j][:, None, None])
            cover = np.zeros((m, win, win), dtype=np.float32)
            for a in range(ss):
                for b in range(ss):
                    cover += mask[:, a::ss, b::ss]
            cover *= np.float32(1.0 / (ss * ss))
            colours = np.stack([palette[o.colour] for o in objs])
            if cfg.colour_jitter > 0:
                colours += rng.uniform(-cfg.colour_jitter, cfg.colour_jitter, (m, 3)).astype(np.float32)
            delta = cover[..., None] * colours[:, None, None, :]
            for t, (i, ya, xa) in enumerate(zip(owners, (y0 + pad).tolist(), (x0 + pad).tolist())):
                canvas[i, ya:ya + win, xa:xa + win] += delta[t]
        img = canvas[:, pad:pad + size, pad:pad + size]
        if cfg.noise_std > 0:
            img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(cfg.noise_std)
        img = np.clip(np.rint(img), 0, 255)
        out[start:start + len(part)] = img.astype(np.uint8).transpose(0, 3, 1, 2)
    return out


# ----------------------------------------------------------------------------------------------------------------
# language
# ----------------------------------------------------------------------------------------------------------------
def _phrase(desc: dict) -> str:
    """Noun phrase without article: "[size] [colour] (shape|object) [at the position]"."""
    words = [desc[k] for k in ("size", "colour") if k in desc]
    words.append(desc.get("shape", "object"))
    text = " ".join(words)
    if "position" in desc:
        text += f" at the {desc['position']}"
    return text


def _plural_phrase(desc: dict) -> str:
    words = [desc[k] for k in ("size", "colour") if k in desc]
    words.append(_plural(desc.get("shape", "object")))
    return " ".join(words)


def _matches(obj: SceneObject, desc: dict) -> bool:
    return all(getattr(obj, k) == v for k, v in desc.items())


def _count(scene, desc: dict) -> int:
    return sum(_matches(o, desc) for o in scene)


def _caption(scene, keys, u, template: str, info_gap: float) -> tuple[str, tuple[frozenset, ...]]:
    """Caption from pre-drawn numbers: ``keys`` (object order), ``u`` [n, 4] (omission draws), the template."""
    mentions = tuple(frozenset(a for a, x in zip(ATTRIBUTES, u[i]) if x >= info_gap) for i in range(len(scene)))
    order = sorted(range(len(scene)), key=lambda i: keys[i])
    phrases = [_article(_phrase({a: scene[i].attr(a) for a in ATTRIBUTES if a in mentions[i]})) for i in order]
    return template.format(_join(phrases)), mentions


def make_caption(scene: Sequence[SceneObject], rng: np.random.Generator, info_gap: float,
                 templates: Sequence[str] = CAPTION_TEMPLATES) -> tuple[str, tuple[frozenset, ...]]:
    """A caption of ``scene`` and, per object (scene order), the set of attributes it mentions.

    Each (object, attribute) pair is omitted independently with probability ``info_gap``; an object whose shape is
    omitted is called "object". Objects are listed in a random order. The random draws do not depend on
    ``info_gap`` (nested omissions across gaps for the same generator state).
    """
    n = len(scene)
    keys, u = rng.random(n).tolist(), rng.random((n, len(ATTRIBUTES))).tolist()
    return _caption(scene, keys, u, templates[int(rng.integers(len(templates)))], float(info_gap))


def _captions(scenes, rng: np.random.Generator, info_gap: float, templates: Sequence[str]):
    """Captions of many scenes with the numbers drawn in bulk (fast; same distribution as :func:`make_caption`)."""
    k = max(len(sc) for sc in scenes)
    keys = rng.random((len(scenes), k)).tolist()
    u = rng.random((len(scenes), k, len(ATTRIBUTES))).tolist()
    t = rng.integers(0, len(templates), len(scenes)).tolist()
    caps, ments = [], []
    for i, sc in enumerate(scenes):
        c, m = _caption(sc, keys[i], u[i], templates[t[i]], float(info_gap))
        caps.append(c)
        ments.append(m)
    return caps, ments


class _Stream:
    """Fast scalar draws for the text generators: uniforms of a numpy Generator consumed from a buffer."""

    def __init__(self, gen: np.random.Generator, block: int = 1 << 16):
        self.gen, self.block, self.buf, self.i = gen, block, [], 0

    def random(self) -> float:
        if self.i >= len(self.buf):
            self.buf, self.i = self.gen.random(self.block).tolist(), 0
        x = self.buf[self.i]
        self.i += 1
        return x

    def integers(self, lo: int, hi: int | None = None) -> int:
        if hi is None:
            lo, hi = 0, lo
        return lo + min(int(self.random() * (hi - lo)), hi - lo - 1)

    def pair(self, n: int) -> tuple[int, int]:
        """Two distinct indices in range(n), uniformly."""
        i = self.integers(n)
        j = self.integers(n - 1)
        return i, j + (j >= i)


def _refer(scene, i: int, exclude: Iterable[str], rng: np.random.Generator) -> dict | None:
    """A shortest attribute description (not using ``exclude``) that picks out object ``i`` alone, or None."""
    exclude = set(exclude)
    attrs = [a for a in ATTRIBUTES if a not in exclude]
    obj = scene[i]
    for k in range(len(attrs) + 1):
        found = []
        for combo in combinations(attrs, k):
            desc = {a: obj.attr(a) for a in combo}
            if all(not _matches(o, desc) for j, o in enumerate(scene) if j != i):
                found.append(desc)
        if found:
            return found[rng.integers(len(found))]
    return None


def _choice(rng, seq):
    return seq[rng.integers(len(seq))]


def _random_desc(rng, cfg: WorldConfig, scene=None, present: bool | None = None, kinds=None) -> dict | None:
    """A {colour}/{shape}/{colour, shape} description; ``present`` True/False forces (non)existence in ``scene``."""
    kinds = kinds or (("shape",), ("colour",), ("colour", "shape"))
    kind = _choice(rng, kinds)
    if present:
        obj = _choice(rng, scene)
        return {a: obj.attr(a) for a in kind}
    for _ in range(30):
        desc = {}
        if "colour" in kind:
            desc["colour"] = _choice(rng, cfg.colours)
        if "shape" in kind:
            desc["shape"] = _choice(rng, cfg.shapes)
        if present is None or _count(scene, desc) == 0:
            return desc
    return None


def answer_vocab(cfg: WorldConfig) -> list[str]:
    """The fixed VQA answer vocabulary: yes/no, counts, colours, shapes, sizes, positions."""
    return (["yes", "no"] + [str(k) for k in range(cfg.max_objects + 1)] + list(cfg.colours) + list(cfg.shapes)
            + list(SIZES) + cfg.positions)


def _question(typ: str, scene, rng, cfg: WorldConfig) -> tuple[str, str] | None:
    if typ == "count":
        return "how many objects are there?", str(len(scene))
    if typ == "count_colour":
        colour = _choice(rng, scene).colour if rng.random() < 0.6 else _choice(rng, cfg.colours)
        return f"how many {colour} objects are there?", str(_count(scene, {"colour": colour}))
    if typ == "count_shape":
        shape = _choice(rng, scene).shape if rng.random() < 0.6 else _choice(rng, cfg.shapes)
        return f"how many {_plural(shape)} are there?", str(_count(scene, {"shape": shape}))
    if typ == "exist":
        yes = bool(rng.random() < 0.5)
        desc = _random_desc(rng, cfg, scene, present=yes)
        if desc is None:
            return None
        return f"is there {_article(_phrase(desc))}?", "yes" if yes else "no"
    attr = typ
    i = rng.integers(len(scene))
    desc = _refer(scene, i, {attr}, rng)
    if desc is None:
        return None
    ref = _phrase(desc)
    question = {"colour": f"what colour is the {ref}?", "shape": f"what shape is the {ref}?",
                "size": f"what size is the {ref}?", "position": f"where is the {ref}?"}[attr]
    return question, scene[i].attr(attr)


def _other_value(rng, cfg: WorldConfig, attr: str, value: str) -> str:
    pool = {"colour": cfg.colours, "shape": cfg.shapes, "size": SIZES, "position": cfg.positions}[attr]
    return _choice(rng, [v for v in pool if v != value])


_RELATIONS = {"to the left of": lambda a, b: a.col < b.col, "to the right of": lambda a, b: a.col > b.col,
              "above": lambda a, b: a.row < b.row, "below": lambda a, b: a.row > b.row}


def _hypothesis(kind: str, truth: bool, scene, rng, cfg: WorldConfig) -> str | None:
    """An entailed (truth=True) or contradicted (truth=False) hypothesis of the given kind, or None."""
    if kind == "exist":
        desc = _random_desc(rng, cfg, scene, present=truth)
        return None if desc is None else f"there is {_article(_phrase(desc))}"
    if kind == "absent":
        desc = _random_desc(rng, cfg, scene, present=not truth)
        return None if desc is None else f"there is no {_phrase(desc)}"
    if kind == "count":
        n = len(scene)
        # balanced: only possible counts (an impossible one, e.g. "four objects" of at most three, is always false)
        lo, hi = (cfg.min_objects, cfg.max_objects) if cfg.balanced else (1, cfg.max_objects + 1)
        k = n if truth else _choice(rng, [m for m in range(lo, hi + 1) if m != n])
        return "there is one object" if k == 1 else f"there are {_number(k)} objects"
    if kind == "attr":
        attr = _choice(rng, ATTRIBUTES)
        i = rng.integers(len(scene))
        desc = _refer(scene, i, {attr}, rng)
        if desc is None:
            return None
        value = scene[i].attr(attr) if truth else _other_value(rng, cfg, attr, scene[i].attr(attr))
        ref = _phrase(desc)
        if attr == "shape":
            return f"the {ref} is {_article(value)}"
        if attr == "position":
            return f"the {ref} is at the {value}"
        return f"the {ref} is {value}"
    if kind == "relation":
        if len(scene) < 2:
            return None
        for _ in range(10):
            i, j = rng.pair(len(scene))
            rel = _choice(rng, list(_RELATIONS))
            if _RELATIONS[rel](scene[i], scene[j]) != truth:
                continue
            a, b = _refer(scene, i, {"position"}, rng), _refer(scene, j, {"position"}, rng)
            if a is None or b is None:
                return None
            return f"the {_phrase(a)} is {rel} the {_phrase(b)}"
        return None
    raise ValueError(kind)


def _neutral(scene, rng, cfg: WorldConfig) -> str:
    i = rng.integers(len(scene))
    ref = _phrase(_refer(scene, i, (), rng))  # position is unique, so a reference always exists
    if rng.random() < 0.5:
        return f"the {ref} is made of {_choice(rng, MATERIALS)}"
    return f"the {ref} is {_choice(rng, NEUTRAL_PROPERTIES)}"


_VE_KINDS = ("exist", "absent", "count", "attr", "relation")


def _nlvr_statement(rng, cfg: WorldConfig, a, b) -> tuple[str, bool] | None:
    template = rng.integers(8)
    if template == 0:
        return "the left image has more objects than the right image", len(a) > len(b)
    if template == 1:
        return "the right image has more objects than the left image", len(b) > len(a)
    if template == 2:
        return "the two images have the same number of objects", len(a) == len(b)
    pool = list(a) + list(b)
    desc = _random_desc(rng, cfg, pool, present=bool(rng.random() < 0.7))
    if desc is None:
        return None
    in_a, in_b = _count(a, desc) > 0, _count(b, desc) > 0
    ph = _phrase(desc)
    if template == 3:
        return f"both images contain {_article(ph)}", in_a and in_b
    if template == 4:
        return f"neither image contains {_article(ph)}", not in_a and not in_b
    if template == 5:
        return f"exactly one image contains {_article(ph)}", in_a != in_b
    if template == 6:
        left, right, has_l, has_r = ("left", "right", in_a, in_b) if rng.random() < 0.5 else \
            ("right", "left", in_b, in_a)
        return f"the {left} image contains {_article(ph)} and the {right} image does not", has_l and not has_r
    total = _count(a, desc) + _count(b, desc)
    k = max(1, total + rng.integers(-1, 2)) if rng.random() < 0.6 else rng.integers(1, 2 * cfg.max_objects + 1)
    noun = ph if k == 1 else _plural_phrase(desc)
    return f"the two images contain {_number(k)} {noun} in total", total == k


def balance_by_key(keys: Sequence, labels: Sequence, rng: np.random.Generator, label_set: Sequence | None = None,
                   min_share: float = 0.0) -> list[int]:
    """Indices (sorted) of a subset of items in which, within every key, each kept label occurs equally often.

    Per key: the kept labels are ``label_set`` (all of them must occur, else the key is dropped) or, without it,
    the labels occurring at least ``min_share`` x as often as the key's most common label; a key with fewer than
    two kept labels is dropped; every kept label is cut to the count of the rarest kept label (a random choice of
    its items, ``rng``). So a rule that sees only the key (e.g. the text of a question) is at chance on the subset.
    """
    if len(keys) != len(labels):
        raise ValueError(f"keys and labels differ in length: {len(keys)} vs {len(labels)}")
    groups: dict = {}
    for i, (k, y) in enumerate(zip(keys, labels)):
        groups.setdefault(k, {}).setdefault(y, []).append(i)
    keep: list[int] = []
    for k in sorted(groups, key=str):
        by = groups[k]
        if label_set is not None:
            kept = list(label_set)
            if any(y not in by for y in kept):
                continue
        else:
            top = max(len(v) for v in by.values())
            kept = sorted((y for y, v in by.items() if len(v) >= min_share * top), key=str)
        if len(kept) < 2:
            continue
        m = min(len(by[y]) for y in kept)
        for y in kept:
            items = by[y]
            pick = rng.permutation(len(items))[:m] if len(items) > m else range(m)
            keep.extend(items[j] for j in pick)
    return sorted(keep)


_TEXT_KEYED_VQA = ("count", "count_colour", "count_shape", "exist")


# ----------------------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------------------
class Vocab:
    """A word-level tokenizer: lower-case words / digits / punctuation marks, with pad, unk, bos and eos.

    ``vocab(texts, context_length)`` returns a ``LongTensor [B, context_length]``: ``<bos> tokens... <eos>`` then
    ``<pad>`` (id 0); too long texts are cut and keep their ``<eos>``. ``ids != vocab.pad_id`` is the attention
    mask. Unknown words map to ``<unk>``.
    """

    PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
    _TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")

    def __init__(self, words: Iterable[str]):
        self.itos: list[str] = [self.PAD, self.UNK, self.BOS, self.EOS]
        seen = set(self.itos)
        for w in words:
            if w not in seen:
                seen.add(w)
                self.itos.append(w)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = 0, 1, 2, 3

    @classmethod
    def tokenize(cls, text: str) -> list[str]:
        return cls._TOKEN.findall(text.lower())

    @classmethod
    def build(cls, texts: Iterable[str], min_freq: int = 1) -> "Vocab":
        """Words of ``texts`` seen at least ``min_freq`` times, sorted (deterministic)."""
        counts = Counter(tok for t in texts for tok in cls.tokenize(t))
        return cls(sorted(w for w, c in counts.items() if c >= min_freq))

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        ids = [self.stoi.get(tok, self.unk_id) for tok in self.tokenize(text)]
        return [self.bos_id] + ids + [self.eos_id] if add_special else ids

    def __call__(self, texts: str | Sequence[str], context_length: int = 32) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError("context_length must be >= 2 (bos + eos)")
        out = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > context_length:
                ids = ids[:context_length - 1] + [self.eos_id]
            out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        words = []
        for i in ids:
            i = int(i)
            if skip_special and i in (self.pad_id, self.bos_id, self.eos_id):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else self.UNK)
        return re.sub(r" ([?,.!])", r"\1", " ".join(words))

    def state_dict(self) -> dict:
        return {"itos": list(self.itos)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Vocab":
        itos = list(state["itos"])
        if itos[:4] != [cls.PAD, cls.UNK, cls.BOS, cls.EOS]:
            raise ValueError("not a Vocab state dict (special tokens missing)")
        return cls(itos[4:])


def world_vocab(config: WorldConfig | None = None) -> Vocab:
    """Every word the generator can emit for ``config`` (so train / test worlds share one vocabulary)."""
    cfg = config or WorldConfig()
    words = set(Vocab.tokenize(_TEMPLATE_TEXT))
    for t in cfg.caption_templates:
        words.update(Vocab.tokenize(t.replace("{}", " ")))
    words.update(cfg.colours)
    words.update(cfg.shapes)
    words.update(_plural(s) for s in cfg.shapes)
    words.update(SIZES)
    for p in cfg.positions:
        words.update(p.split())
    words.update(MATERIALS)
    words.update(NEUTRAL_PROPERTIES)
    words.update(NUMBER_WORDS)
    words.update(str(k) for k in range(10))
    return Vocab(sorted(words))


# ----------------------------------------------------------------------------------------------------------------
# the world
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class World:
    """A generated world (see the module docstring). Scene ``i`` is ``images[i]``, ``scene_attrs[i]``, ``captions[i]``.

    * ``images``: ``uint8 [N, 3, H, W]``; ``scene_attrs``: per scene a tuple of :class:`SceneObject` (object 0 is
      the main object); ``captions`` / ``caption_mentions`` (per object, the attributes the caption mentions);
    * ``class_labels`` ``long [N]`` into ``class_names`` ("red circle", ...); ``n_objects`` ``long [N]``;
      ``object_attrs`` ``long [N, max_objects, 5]`` = indices of (shape, colour, size, row, col), -1 padded;
    * ``vqa``: (scene, question, answer index into ``answer_vocab``) with ``vqa_types`` beside it;
    * ``nlvr``: (left scene, right scene, statement, label bool); ``ve``: (scene, hypothesis, label index into
      ``ve_label_names``).
    """

    config: WorldConfig
    seed: int
    images: torch.Tensor
    scene_attrs: list
    captions: list
    caption_mentions: list
    class_labels: torch.Tensor
    class_names: list
    n_objects: torch.Tensor
    object_attrs: torch.Tensor
    vqa: list
    vqa_types: list
    answer_vocab: list
    nlvr: list
    ve: list
    ve_label_names: tuple = field(default=VE_LABELS)

    def __len__(self) -> int:
        return len(self.scene_attrs)

    def __repr__(self) -> str:
        return (f"World(n_scenes={len(self)}, seed={self.seed}, image_size={self.config.image_size}, "
                f"info_gap={self.config.info_gap}, vqa={len(self.vqa)}, nlvr={len(self.nlvr)}, ve={len(self.ve)})")

    def recaption(self, seed: int, info_gap: float | None = None) -> tuple[list[str], list[tuple[frozenset, ...]]]:
        """Fresh captions of the same scenes (a text augmentation: other templates, order and omissions)."""
        gap = self.config.info_gap if info_gap is None else float(info_gap)
        if not 0.0 <= gap <= 1.0:
            raise ValueError(f"info_gap must lie in [0, 1], got {gap}")
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xCA97]))
        return _captions(self.scene_attrs, rng, gap, self.config.caption_templates)

    def rerender(self, seed: int, shift: float = 1.0) -> torch.Tensor:
        """The same scenes rendered again with new noise, colour jitter and object shifts (an image augmentation)."""
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1A6E]))
        return torch.from_numpy(render_scenes(self.scene_attrs, self.config, rng, shift=shift))

    def class_prompts(self, template: str = "a picture of {}") -> list[str]:
        """One text prompt per class, ``template`` filled with "a red circle" / "an orange square" ..."""
        return [template.format(_article(name)) for name in self.class_names]

    def texts(self) -> list[str]:
        """All captions, questions, answers, NLVR statements and VE hypotheses."""
        return (list(self.captions) + [q for _, q, _ in self.vqa] + list(self.answer_vocab)
                + [s for _, _, s, _ in self.nlvr] + [h for _, h, _ in self.ve])

    def vocab(self) -> Vocab:
        """:func:`world_vocab` of this world's config."""
        return world_vocab(self.config)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "World":
        """The scenes ``indices`` (re-numbered 0..k-1) with their VQA / VE items and the NLVR pairs inside them."""
        idx = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        if len(set(idx)) != len(idx):
            raise ValueError("subset indices must be distinct")
        new = {old: k for k, old in enumerate(idx)}
        t = torch.tensor(idx, dtype=torch.long)
        vqa = [(new[s], q, a, typ) for (s, q, a), typ in zip(self.vqa, self.vqa_types) if s in new]
        return dataclasses.replace(
            self, images=self.images[t], scene_attrs=[self.scene_attrs[i] for i in idx],
            captions=[self.captions[i] for i in idx], caption_mentions=[self.caption_mentions[i] for i in idx],
            class_labels=self.class_labels[t], n_objects=self.n_objects[t], object_attrs=self.object_attrs[t],
            vqa=[v[:3] for v in vqa], vqa_types=[v[3] for v in vqa],
            nlvr=[(new[a], new[b], s, y) for a, b, s, y in self.nlvr if a in new and b in new],
            ve=[(new[s], h, y) for s, h, y in self.ve if s in new])


def generate_world(n_scenes: int, seed: int = 0, image_size: int | None = None, info_gap: float | None = None, *,
                   config: WorldConfig | None = None, **overrides) -> World:
    """Generate ``n_scenes`` scenes with images, captions, labels, VQA, NLVR and VE items, deterministically.

    ``config`` (default :class:`WorldConfig()`) with ``image_size``, ``info_gap`` and any other ``WorldConfig``
    field given as keyword overriding it, e.g. ``generate_world(5000, seed=1, info_gap=0.5, grid=3)``.
    """
    if not isinstance(n_scenes, (int, np.integer)) or n_scenes < 1:
        raise ValueError(f"n_scenes must be a positive int, got {n_scenes!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    cfg = config or WorldConfig()
    if image_size is not None:
        overrides["image_size"] = image_size
    if info_gap is not None:
        overrides["info_gap"] = info_gap
    unknown = set(overrides) - {f.name for f in dataclasses.fields(WorldConfig)}
    if unknown:
        raise TypeError(f"unknown WorldConfig field(s): {sorted(unknown)}")
    cfg = dataclasses.replace(cfg, **overrides) if overrides else cfg
    r_scene, r_render, r_caption, r_vqa, r_ve, r_nlvr = (np.random.default_rng(s) for s in
                                                         np.random.SeedSequence(int(seed)).spawn(6))
    scenes = sample_scenes(int(n_scenes), cfg, r_scene)
    images = torch.from_numpy(render_scenes(scenes, cfg, r_render))
    captions, mentions = _captions(scenes, r_caption, float(cfg.info_gap), cfg.caption_templates)

    shape_ix = {s: i for i, s in enumerate(cfg.shapes)}
    colour_ix = {c: i for i, c in enumerate(cfg.colours)}
    attrs = np.full((len(scenes), cfg.max_objects, 5), -1, dtype=np.int64)
    for i, scene in enumerate(scenes):
        for k, o in enumerate(scene):
            attrs[i, k] = (shape_ix[o.shape], colour_ix[o.colour], SIZES.index(o.size), o.row, o.col)
    labels = torch.from_numpy(attrs[:, 0, 1] * len(cfg.shapes) + attrs[:, 0, 0])
    n_objects = torch.tensor([len(s) for s in scenes], dtype=torch.long)

    answers = answer_vocab(cfg)
    answer_ix = {a: i for i, a in enumerate(answers)}
    extra = cfg.oversample if cfg.balanced else 1
    rq = _Stream(r_vqa)
    vqa, vqa_types = [], []
    for i, scene in enumerate(scenes):
        for _ in range(cfg.vqa_per_scene * extra):
            for _attempt in range(20):
                typ = _choice(rq, VQA_TYPES)
                qa = _question(typ, scene, rq, cfg)
                if qa is not None:
                    vqa.append((i, qa[0], answer_ix[qa[1]]))
                    vqa_types.append(typ)
                    break

    re_ = _Stream(r_ve)
    ve = []
    for i, scene in enumerate(scenes):
        if cfg.balanced:  # two-way: entailment (0) / contradiction (1), target truth drawn at random
            for _ in range(cfg.ve_per_scene * extra):
                truth = re_.random() < 0.5
                for _attempt in range(20):
                    hyp = _hypothesis(_choice(re_, _VE_KINDS), truth, scene, re_, cfg)
                    if hyp is not None:
                        ve.append((i, hyp, 0 if truth else 1))
                        break
            continue
        start = re_.integers(3)
        for k in range(cfg.ve_per_scene):
            label = (start + k) % 3
            if label == 1:
                ve.append((i, _neutral(scene, re_, cfg), 1))
                continue
            for _attempt in range(20):
                hyp = _hypothesis(_choice(re_, _VE_KINDS), label == 0, scene, re_, cfg)
                if hyp is not None:
                    ve.append((i, hyp, label))
                    break

    rn = _Stream(r_nlvr)
    nlvr = []
    n_pairs = int(round(len(scenes) * cfg.nlvr_per_scene)) * extra if len(scenes) > 1 else 0
    for _ in range(n_pairs):
        a, b = rn.pair(len(scenes))
        target = rn.random() < 0.5
        got = None
        for _attempt in range(30):
            st = _nlvr_statement(rn, cfg, scenes[a], scenes[b])
            if st is None:
                continue
            got = st
            if st[1] == target:
                break
        if got is not None:
            nlvr.append((a, b, got[0], bool(got[1])))

    ve_names = VE_LABELS
    if cfg.balanced:
        r_bal = np.random.default_rng(np.random.SeedSequence([int(seed), 0xBA1]))
        keep = balance_by_key([q if t in _TEXT_KEYED_VQA else t for (_, q, _), t in zip(vqa, vqa_types)],
                              [a for _, _, a in vqa], r_bal, min_share=cfg.min_share)
        vqa, vqa_types = [vqa[j] for j in keep], [vqa_types[j] for j in keep]
        ve = [ve[j] for j in balance_by_key([h for _, h, _ in ve], [y for *_, y in ve], r_bal, label_set=(0, 1))]
        nlvr = [nlvr[j] for j in balance_by_key([s for _, _, s, _ in nlvr], [y for *_, y in nlvr], r_bal,
                                                label_set=(False, True))]
        ve_names = VE_BALANCED_LABELS

    return World(config=cfg, seed=int(seed), images=images, scene_attrs=scenes, captions=captions,
                 caption_mentions=mentions, class_labels=labels, class_names=cfg.class_names, n_objects=n_objects,
                 object_attrs=torch.from_numpy(attrs), vqa=vqa, vqa_types=vqa_types, answer_vocab=answers, nlvr=nlvr, ve=ve,
                 ve_label_names=ve_names)
