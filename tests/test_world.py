"""The generated multimodal world: determinism, captions vs info_gap, VQA / NLVR / VE ground truth, rendering, Vocab.

The question / statement / hypothesis checks parse the generated English back with regular expressions written
here, independently of the generator, and evaluate them on ``scene_attrs``.
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch

from contrastive_repro.data.world import (
    COLOURS,
    SHAPES,
    SIZES,
    Vocab,
    World,
    WorldConfig,
    generate_world,
    make_caption,
    world_vocab,
)

ALL_SHAPES = ("circle", "square", "triangle", "cross", "diamond")
NUMBERS = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                       "nine"))}
PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross",
          "diamonds": "diamond"}


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(600, seed=3)


@pytest.fixture(scope="module")
def world3() -> World:
    return generate_world(400, seed=5, grid=3, max_objects=4, shapes=ALL_SHAPES, main_object_large=False,
                          info_gap=0.4)


# ------------------------------------------------------------------------------------------------ parsing helpers
def parse_desc(text: str) -> dict:
    """ "[a|an] [size] [colour] (shape|shapes|object|objects) [at the <position>]" -> attribute dict."""
    desc = {}
    m = re.fullmatch(r"(?:an? )?(.+?)(?: at the (.+))?", text)
    words, pos = m.group(1).split(), m.group(2)
    if pos:
        desc["position"] = pos
    noun = words[-1]
    if noun in PLURAL:
        desc["shape"] = PLURAL[noun]
    elif noun in ALL_SHAPES:
        desc["shape"] = noun
    else:
        assert noun in ("object", "objects"), text
    for w in words[:-1]:
        if w in SIZES:
            desc["size"] = w
        elif w in COLOURS:
            desc["colour"] = w
        else:
            raise AssertionError(f"unexpected word {w!r} in {text!r}")
    return desc


def matching(scene, desc):
    return [o for o in scene if all(getattr(o, k) == v for k, v in desc.items())]


def the(scene, text):
    """The unique object a definite description refers to (fails if it is not unique)."""
    found = matching(scene, parse_desc(text))
    assert len(found) == 1, f"'the {text}' refers to {len(found)} objects in {scene}"
    return found[0]


def vqa_answer(scene, q: str) -> str:
    if q == "how many objects are there?":
        return str(len(scene))
    if m := re.fullmatch(r"how many (\w+) objects are there\?", q):
        return str(len(matching(scene, {"colour": m.group(1)})))
    if m := re.fullmatch(r"how many (\w+) are there\?", q):
        return str(len(matching(scene, {"shape": PLURAL[m.group(1)]})))
    if m := re.fullmatch(r"is there (.+)\?", q):
        return "yes" if matching(scene, parse_desc(m.group(1))) else "no"
    if m := re.fullmatch(r"what (colour|shape|size) is the (.+)\?", q):
        return getattr(the(scene, m.group(2)), m.group(1))
    if m := re.fullmatch(r"where is the (.+)\?", q):
        return the(scene, m.group(1)).position
    raise AssertionError(f"unparsed question {q!r}")


RELATIONS = {"to the left of": lambda a, b: a.col < b.col, "to the right of": lambda a, b: a.col > b.col,
             "above": lambda a, b: a.row < b.row, "below": lambda a, b: a.row > b.row}


def ve_label(scene, h: str) -> str:
    def tf(x):
        return "entailment" if x else "contradiction"

    if re.fullmatch(r"the (.+) is made of \w+", h) or re.fullmatch(
            r"the (.+) is (heavy|hot|cold|wet|fragile|new|old)", h):
        the(scene, re.fullmatch(r"the (.+?) is .+", h).group(1))  # refers to an object of the image
        return "neutral"
    if m := re.fullmatch(r"there is no (.+)", h):
        return tf(not matching(scene, parse_desc(m.group(1))))
    if h == "there is one object":
        return tf(len(scene) == 1)
    if m := re.fullmatch(r"there are (\w+) objects", h):
        return tf(len(scene) == NUMBERS[m.group(1)])
    if m := re.fullmatch(r"there is (an? .+)", h):
        return tf(bool(matching(scene, parse_desc(m.group(1)))))
    if m := re.fullmatch(r"the (.+) is (to the left of|to the right of|above|below) the (.+)", h):
        return tf(RELATIONS[m.group(2)](the(scene, m.group(1)), the(scene, m.group(3))))
    if m := re.fullmatch(r"the (.+?) is at the (.+)", h):
        return tf(the(scene, m.group(1)).position == m.group(2))
    if m := re.fullmatch(r"the (.+) is an? (\w+)", h):
        assert m.group(2) in ALL_SHAPES
        return tf(the(scene, m.group(1)).shape == m.group(2))
    if m := re.fullmatch(r"the (.+) is (\w+)", h):
        o, value = the(scene, m.group(1)), m.group(2)
        return tf(value == (o.colour if value in COLOURS else o.size))
    raise AssertionError(f"unparsed hypothesis {h!r}")


def nlvr_truth(a, b, s: str) -> bool:
    if s == "the left image has more objects than the right image":
        return len(a) > len(b)
    if s == "the right image has more objects than the left image":
        return len(b) > len(a)
    if s == "the two images have the same number of objects":
        return len(a) == len(b)
    if m := re.fullmatch(r"both images contain (.+)", s):
        d = parse_desc(m.group(1))
        return bool(matching(a, d)) and bool(matching(b, d))
    if m := re.fullmatch(r"neither image contains (.+)", s):
        d = parse_desc(m.group(1))
        return not matching(a, d) and not matching(b, d)
    if m := re.fullmatch(r"exactly one image contains (.+)", s):
        d = parse_desc(m.group(1))
        return bool(matching(a, d)) != bool(matching(b, d))
    if m := re.fullmatch(r"the (left|right) image contains (.+) and the (left|right) image does not", s):
        d = parse_desc(m.group(2))
        first, second = (a, b) if m.group(1) == "left" else (b, a)
        assert m.group(1) != m.group(3)
        return bool(matching(first, d)) and not matching(second, d)
    if m := re.fullmatch(r"the two images contain (\w+) (.+) in total", s):
        d = parse_desc(m.group(2))
        return len(matching(a, d)) + len(matching(b, d)) == NUMBERS[m.group(1)]
    raise AssertionError(f"unparsed statement {s!r}")


# ------------------------------------------------------------------------------------------------ tests
def test_shapes_types_and_labels(world):
    n = len(world)
    assert world.images.shape == (n, 3, 32, 32) and world.images.dtype == torch.uint8
    assert len(world.captions) == len(world.scene_attrs) == n
    assert world.class_labels.shape == (n,) and world.class_labels.dtype == torch.long
    assert len(world.class_names) == 8 * 4
    for i, scene in enumerate(world.scene_attrs):
        assert 1 <= len(scene) <= 3 == world.config.max_objects
        assert world.n_objects[i] == len(scene)
        main = scene[0]
        assert world.class_names[world.class_labels[i]] == f"{main.colour} {main.shape}"
        assert [o.size for o in scene] == ["large"] + ["small"] * (len(scene) - 1)  # main object identifiable
        assert len({(o.row, o.col) for o in scene}) == len(scene)
        assert world.object_attrs[i, len(scene):].eq(-1).all()
        assert world.config.shapes[world.object_attrs[i, 0, 0]] == main.shape
    # every class / shape / colour occurs
    assert len(set(world.class_labels.tolist())) > 25
    assert world.class_prompts()[0] == "a picture of a red circle"
    assert "a picture of an orange circle" in world.class_prompts()


def test_determinism_by_seed():
    a, b, c = generate_world(80, seed=11), generate_world(80, seed=11), generate_world(80, seed=12)
    assert torch.equal(a.images, b.images)
    assert a.captions == b.captions and a.vqa == b.vqa and a.nlvr == b.nlvr and a.ve == b.ve
    assert a.scene_attrs == b.scene_attrs
    assert not torch.equal(a.images, c.images) and a.captions != c.captions


def test_info_gap_changes_captions_only_and_nests():
    worlds = [generate_world(150, seed=4, info_gap=g) for g in (0.0, 0.3, 0.7, 1.0)]
    for w in worlds[1:]:
        assert torch.equal(w.images, worlds[0].images)
        assert w.vqa == worlds[0].vqa and w.ve == worlds[0].ve and w.nlvr == worlds[0].nlvr
    for lo, hi in zip(worlds, worlds[1:]):  # omitted at a smaller gap -> omitted at a larger one
        for ml, mh in zip(lo.caption_mentions, hi.caption_mentions):
            assert all(h <= l for l, h in zip(ml, mh))


def _caption_words(world):
    return [set(Vocab.tokenize(c)) for c in world.captions]


def test_caption_mentions_everything_at_gap_0_and_nothing_at_gap_1():
    full = generate_world(200, seed=8, info_gap=0.0)
    for scene, caption, ments in zip(full.scene_attrs, full.captions, full.caption_mentions):
        assert all(m == frozenset({"size", "colour", "shape", "position"}) for m in ments)
        for o in scene:
            assert f"{o.size} {o.colour} {o.shape} at the {o.position}" in caption
    empty = generate_world(200, seed=8, info_gap=1.0)
    attribute_words = set(COLOURS) | set(SHAPES) | set(SIZES) | {"top", "bottom", "left", "right", "center"}
    for scene, words, ments in zip(empty.scene_attrs, _caption_words(empty), empty.caption_mentions):
        assert all(m == frozenset() for m in ments)
        assert not words & attribute_words
        assert empty.captions[empty.scene_attrs.index(scene)].count("object") == len(scene)


def test_caption_text_matches_mentions(world3):
    gap = world3.config.info_gap
    total = mentioned = 0
    for scene, caption, ments in zip(world3.scene_attrs, world3.captions, world3.caption_mentions):
        body = caption
        for prefix in ("a picture of ", "an image of ", "a scene with "):
            if body.startswith(prefix):
                body = body[len(prefix):]
                break
        phrases = re.split(r", | and ", body)
        assert len(phrases) == len(scene)
        parsed = sorted((sorted(parse_desc(p).items()) for p in phrases))
        expected = sorted(sorted({a: getattr(o, a) for a in m}.items()) for o, m in zip(scene, ments))
        assert parsed == expected, caption
        total += 4 * len(scene)
        mentioned += sum(len(m) for m in ments)
    assert abs(mentioned / total - (1 - gap)) < 0.05


def test_vqa_answers_are_correct(world, world3):
    for w in (world, world3):
        assert len(w.vqa) == w.config.vqa_per_scene * len(w)
        for (i, q, a), typ in zip(w.vqa, w.vqa_types):
            assert w.answer_vocab[a] == vqa_answer(w.scene_attrs[i], q), (q, w.scene_attrs[i])
    types = Counter(world.vqa_types)
    assert set(types) == {"count", "count_colour", "count_shape", "exist", "colour", "shape", "size", "position"}
    yes_no = Counter(world.answer_vocab[a] for (_, _, a), t in zip(world.vqa, world.vqa_types) if t == "exist")
    assert 0.35 < yes_no["yes"] / (yes_no["yes"] + yes_no["no"]) < 0.65
    assert len(set(world.answer_vocab)) == len(world.answer_vocab)
    assert {"yes", "no", "0", "3", "red", "circle", "large", "top left"} <= set(world.answer_vocab)
    assert world.answer_vocab == generate_world(5, seed=0).answer_vocab  # fixed by the config, not the data


def test_question_forms_of_the_brief_occur():
    """The brief's example forms ("what colour is the circle?", "how many objects?", "is there a square?") occur;
    their answers are checked in test_vqa_answers_are_correct."""
    w = generate_world(300, seed=1)
    seen = set()
    for (i, q, a), typ in zip(w.vqa, w.vqa_types):
        seen.add(re.sub(r"\b(" + "|".join(list(COLOURS) + list(SHAPES) + ["circles", "squares", "triangles",
                                                                         "crosses"]) + r")\b", "X", q)[:18])
    assert any(s.startswith("what colour is the") for s in seen)
    assert any(s.startswith("how many objects") for s in seen)
    assert any(s.startswith("is there a") for s in seen)


def test_nlvr_labels_are_correct(world, world3):
    for w in (world, world3):
        assert len(w.nlvr) == len(w)
        for a, b, s, y in w.nlvr:
            assert a != b and isinstance(y, bool)
            assert nlvr_truth(w.scene_attrs[a], w.scene_attrs[b], s) == y, s
    frac = np.mean([y for *_, y in world.nlvr])
    assert 0.4 < frac < 0.6
    kinds = Counter(s.split(" ")[0] + " " + s.split(" ")[1] for _, _, s, _ in world.nlvr)
    assert len(kinds) >= 5


def test_ve_labels_are_correct(world, world3):
    for w in (world, world3):
        assert len(w.ve) == w.config.ve_per_scene * len(w)
        for i, h, y in w.ve:
            assert ve_label(w.scene_attrs[i], h) == w.ve_label_names[y], (h, w.scene_attrs[i])
    counts = Counter(y for *_, y in world.ve)
    assert counts[0] == counts[1] == counts[2] == len(world)
    # a mix of hypothesis kinds among entailments and contradictions
    starts = Counter(" ".join(h.split()[:2]) for _, h, y in world.ve if y != 1)
    assert {"there is", "there are"} <= set(starts) and len(starts) > 5


def _nearest_colour(rgb):
    return min(COLOURS, key=lambda c: sum((float(x) - y) ** 2 for x, y in zip(rgb, COLOURS[c])))


def test_rendering_centre_pixels_and_background(world, world3):
    for w in (world, world3):
        img = w.images.numpy().astype(np.int64)
        tol = w.config.colour_jitter + 6.5 * w.config.noise_std
        for i, scene in enumerate(w.scene_attrs[:200]):
            occupied = np.zeros((32, 32), dtype=bool)
            for o in scene:
                r, c = o.centre_pixel
                rgb = img[i, :, r, c]
                assert np.abs(rgb - np.array(COLOURS[o.colour])).max() <= tol, (o, rgb)
                assert _nearest_colour(rgb) == o.colour
                yy, xx = np.mgrid[0:32, 0:32]
                occupied |= (yy + 0.5 - o.cy) ** 2 + (xx + 0.5 - o.cx) ** 2 <= (1.2 * o.radius + 1.5) ** 2
            background = img[i][:, ~occupied]  # untouched pixels: background + N(0, noise_std^2) noise only
            assert np.abs(background - np.array(w.config.background)[:, None]).max() <= 6.5 * w.config.noise_std


def test_rendering_shapes_are_distinguishable(world):
    """Object-coloured pixel counts follow the shapes' areas: circle > square > cross > triangle; and at the
    diagonal 0.6 r from the centre a square is filled while a cross is not."""
    img = world.images.numpy().astype(np.int64)
    areas = {s: [] for s in world.config.shapes}
    corner = {"square": [], "cross": []}
    for i, scene in enumerate(world.scene_attrs):
        o = scene[0]  # the large main object
        col = np.array(COLOURS[o.colour])[:, None, None]
        close = np.abs(img[i] - col).max(0) <= 40
        yy, xx = np.mgrid[0:32, 0:32]
        near = (np.abs(yy + 0.5 - o.cy) <= 1.2 * o.radius + 1) & (np.abs(xx + 0.5 - o.cx) <= 1.2 * o.radius + 1)
        areas[o.shape].append((close & near).sum())
        if o.shape in corner:
            r, c = int(o.cy - 0.6 * o.radius), int(o.cx - 0.6 * o.radius)
            corner[o.shape].append(_nearest_colour(img[i, :, r, c]) == o.colour
                                   and np.abs(img[i, :, r, c] - col[:, 0, 0]).max() <= 40)
    mean = {s: np.mean(v) for s, v in areas.items()}
    assert mean["circle"] > mean["square"] > mean["cross"] > mean["triangle"] > 10, mean
    assert np.mean(corner["square"]) > 0.95 and np.mean(corner["cross"]) < 0.05


def test_augmentations_recaption_and_rerender(world):
    caps, ments = world.recaption(seed=1)
    caps2, _ = world.recaption(seed=1)
    assert caps == caps2 and caps != world.captions and len(caps) == len(world)
    gap1, m1 = world.recaption(seed=1, info_gap=1.0)
    assert all(m == frozenset() for ms in m1 for m in ms)
    imgs = world.rerender(seed=2, shift=0.0)
    assert imgs.shape == world.images.shape and not torch.equal(imgs, world.images)
    assert torch.equal(imgs, world.rerender(seed=2, shift=0.0))
    # no shift: the same objects at the same places, only noise and colour jitter differ
    diff = (imgs.float() - world.images.float()).abs().mean()
    assert diff < 2 * world.config.noise_std
    shifted = world.rerender(seed=2, shift=1.5)
    assert shifted.shape == world.images.shape


def test_make_caption_public_function():
    w = generate_world(3, seed=0)
    rng = np.random.default_rng(0)
    caption, ments = make_caption(w.scene_attrs[0], rng, 0.0)
    assert len(ments) == len(w.scene_attrs[0]) and caption.count("at the") == len(w.scene_attrs[0])


def test_subset_reindexes_everything(world):
    idx = list(range(100, 160))
    sub = world.subset(idx)
    assert len(sub) == 60 and torch.equal(sub.images, world.images[100:160])
    assert sub.captions == world.captions[100:160]
    assert len(sub.vqa) == len(sub.vqa_types) == 2 * 60
    for (i, q, a), (j, q2, a2) in zip(sub.vqa, [v for v in world.vqa if 100 <= v[0] < 160]):
        assert i == j - 100 and q == q2 and a == a2
    for a, b, s, y in sub.nlvr:
        assert nlvr_truth(sub.scene_attrs[a], sub.scene_attrs[b], s) == y
    for i, h, y in sub.ve:
        assert ve_label(sub.scene_attrs[i], h) == sub.ve_label_names[y]


def test_config_validation():
    with pytest.raises(ValueError, match="info_gap"):
        generate_world(5, seed=0, info_gap=1.5)
    with pytest.raises(ValueError, match="grid"):
        generate_world(5, seed=0, grid=4)
    with pytest.raises(ValueError, match="max_objects"):
        generate_world(5, seed=0, max_objects=5)
    with pytest.raises(ValueError, match="shapes"):
        generate_world(5, seed=0, shapes=("circle", "hexagon"))
    with pytest.raises(TypeError, match="unknown"):
        generate_world(5, seed=0, n_colours=3)
    with pytest.raises(ValueError):
        generate_world(0, seed=0)
    w = generate_world(20, seed=0, image_size=48, config=WorldConfig(grid=3, max_objects=2))
    assert w.images.shape[-1] == 48 and w.config.grid == 3


def test_vocab_covers_world_and_roundtrips(world, world3):
    for w in (world, world3):
        vocab = world_vocab(w.config)
        missing = {tok for t in w.texts() for tok in Vocab.tokenize(t) if tok not in vocab}
        assert not missing
    vocab = world.vocab()
    ids = vocab(world.captions[:4], context_length=40)
    assert ids.shape == (4, 40) and ids.dtype == torch.long
    assert (ids[:, 0] == vocab.bos_id).all()
    for row, text in zip(ids, world.captions[:4]):
        assert vocab.decode(row) == text
        n = int((row != vocab.pad_id).sum())
        assert row[n - 1] == vocab.eos_id
    short = vocab(["a large red circle at the top left"], context_length=4)
    assert short.tolist()[0][-1] == vocab.eos_id and short.shape == (1, 4)
    assert vocab.encode("a zebra", add_special=False)[1] == vocab.unk_id
    assert vocab.decode(vocab.encode("is there a red circle?")) == "is there a red circle?"
    again = Vocab.from_state_dict(vocab.state_dict())
    assert again.itos == vocab.itos
    built = Vocab.build(["b a", "a c"], min_freq=2)
    assert built.itos[4:] == ["a"]


# ------------------------------------------------------------------------------------------------ balanced world
def test_balance_by_key_by_hand():
    from contrastive_repro.data.world import balance_by_key

    keys = ["a", "a", "a", "a", "a", "b", "b", "c", "c", "c"]
    labels = [0, 0, 0, 1, 1, 0, 0, 0, 1, 2]
    rng = np.random.default_rng(0)
    # binary label set: "a" keeps 2 zeros + both ones, "b" lacks label 1 (dropped), "c" keeps one 0 and one 1
    keep = balance_by_key(keys, labels, rng, label_set=(0, 1))
    assert [i for i in keep if keys[i] == "a" and labels[i] == 1] == [3, 4]
    assert sum(1 for i in keep if keys[i] == "a" and labels[i] == 0) == 2
    assert {i for i in keep if keys[i] != "a"} == {7, 8}
    # no label set: labels with >= min_share x the top count; "c" keeps 0, 1 and 2 once each; "b" has one label
    keep = balance_by_key(keys, labels, rng, min_share=0.0)
    assert {i for i in keep if keys[i] == "c"} == {7, 8, 9} and not any(keys[i] == "b" for i in keep)
    # min_share 0.7 in "a": label 1 (2 items) < 0.7 x 3 -> only label 0 left -> "a" dropped
    keep = balance_by_key(keys, labels, rng, min_share=0.7)
    assert not any(keys[i] == "a" for i in keep)
    assert keep == sorted(keep)
    with pytest.raises(ValueError, match="length"):
        balance_by_key(["a"], [0, 1], rng)


@pytest.fixture(scope="module")
def bworld() -> World:
    return generate_world(500, seed=7, balanced=True, nlvr_per_scene=2)


def test_balanced_world_labels_are_correct(bworld):
    w = bworld
    assert w.ve_label_names == ("entailment", "contradiction")
    for i, h, y in w.ve:
        assert ve_label(w.scene_attrs[i], h) == w.ve_label_names[y], (h, w.scene_attrs[i])
    for a, b, s, y in w.nlvr:
        assert nlvr_truth(w.scene_attrs[a], w.scene_attrs[b], s) == y, s
    for (i, q, a), typ in zip(w.vqa, w.vqa_types):
        assert w.answer_vocab[a] == vqa_answer(w.scene_attrs[i], q), (q, w.scene_attrs[i])
    # the images and scenes are those of the unbalanced world of the same seed (only the items change)
    plain = generate_world(500, seed=7)
    assert torch.equal(plain.images, w.images) and plain.captions == w.captions


def test_balanced_world_text_alone_is_at_chance(bworld):
    w = bworld
    for items, text, label in ((w.ve, 1, 2), (w.nlvr, 2, 3)):
        per_text = Counter((it[text], it[label]) for it in items)
        texts = {it[text] for it in items}
        assert all(per_text[(t, True if label == 3 else 0)] == per_text[(t, False if label == 3 else 1)]
                   for t in texts)
        assert len(items) > 0.5 * len(w) * (w.config.ve_per_scene if label == 2 else w.config.nlvr_per_scene)
    # VQA: answers equally frequent within each question type (types with a referring expression) or question
    by_type = {}
    for (_, q, a), typ in zip(w.vqa, w.vqa_types):
        key = q if typ in ("count", "count_colour", "count_shape", "exist") else typ
        by_type.setdefault(key, Counter())[a] += 1
    assert all(len(set(c.values())) == 1 and len(c) >= 2 for c in by_type.values())
    assert set(w.vqa_types) == {"count", "count_colour", "count_shape", "exist", "colour", "shape", "size",
                                "position"}
    # a rule that answers from the text alone (majority per exact text on half the scenes) does not beat chance
    # (it falls below: the labels are balanced per text over all scenes, so a text's surplus of one label in one
    # half is a deficit in the other)
    half = len(w) // 2
    for items, text, label in ((w.ve, 1, 2), (w.nlvr, 2, 3)):
        train = Counter((it[text], it[label]) for it in items if it[0] < half)
        test = [it for it in items if it[0] >= half]
        pred = [max((0, 1) if label == 2 else (False, True), key=lambda y: (train[(it[text], y)], str(y)))
                for it in test]
        acc = np.mean([p == it[label] for p, it in zip(pred, test)])
        assert acc < 0.53, acc
