"""Emoji image-caption pairs: parsing emoji-test.txt, rendering with Noto Color Emoji, the checksummed cache."""
from __future__ import annotations

import time
import warnings

import pytest
import torch

from contrastive_repro.data import (CacheWarning, CorruptDatasetError, DatasetNotFoundError, EmojiDataset,
                                    EmojiRenderer, EmptyDatasetError, default_cache_dir, load_emoji, parse_emoji_test)
from contrastive_repro.data.cache import CACHE_ENV, load_checked, payload_checksum, save_checked
from contrastive_repro.data.emoji import EMOJI_TEST_PATH, NOTO_EMOJI_FONT

try:
    from fixtures.data_trees import EMOJI_SNIPPET
except ImportError:  # tests/ imported as a package
    from tests.fixtures.data_trees import EMOJI_SNIPPET

HAVE_FONT = NOTO_EMOJI_FONT.is_file()
HAVE_TEST_FILE = EMOJI_TEST_PATH.is_file()
needs_font = pytest.mark.skipif(not HAVE_FONT, reason=f"{NOTO_EMOJI_FONT} missing "
                                                      "(apt-get install fonts-noto-color-emoji)")
needs_both = pytest.mark.skipif(not (HAVE_FONT and HAVE_TEST_FILE),
                                reason="Noto Color Emoji font or emoji-test.txt missing "
                                       "(apt-get install fonts-noto-color-emoji unicode-data)")


@pytest.fixture
def snippet(tmp_path):
    p = tmp_path / "emoji-test.txt"
    p.write_text(EMOJI_SNIPPET, encoding="utf-8")
    return p


# ---- parsing ----------------------------------------------------------------------------------------------------

def test_parse_snippet_keeps_fully_qualified_with_groups(snippet):
    entries = parse_emoji_test(snippet)
    assert [e.name for e in entries] == ["grinning face", "grinning face with big eyes", "smiling face",
                                         "smiling face with hearts", "family: man, woman, girl",
                                         "flag: South Africa"]
    assert [e.subgroup for e in entries] == ["face-smiling", "face-smiling", "face-affection", "face-affection",
                                             "family", "country-flag"]
    assert [e.group for e in entries][::2] == ["Smileys & Emotion", "Smileys & Emotion", "People & Body"]
    assert entries[-1].group == "Flags"
    assert entries[2].codepoints == "263A FE0F" and entries[2].emoji == "\u263a\ufe0f"
    assert entries[4].emoji == "\U0001F468\u200d\U0001F469\u200d\U0001F467"
    assert entries[0].version == "1.0" and entries[3].version == "11.0"
    assert all(e.status == "fully-qualified" for e in entries)


def test_parse_other_statuses_and_text_argument():
    entries = parse_emoji_test(text=EMOJI_SNIPPET, statuses=("unqualified", "component"))
    assert [(e.name, e.status) for e in entries] == [("smiling face", "unqualified"),
                                                     ("light skin tone", "component")]


def test_parse_errors_name_the_line(tmp_path):
    bad = tmp_path / "emoji-test.txt"
    bad.write_text("# group: G\n# subgroup: s\n1F600 fully-qualified without semicolon\n", encoding="utf-8")
    with pytest.raises(CorruptDatasetError, match="line 3"):
        parse_emoji_test(bad)
    with pytest.raises(CorruptDatasetError, match="before a '# group:'"):
        parse_emoji_test(text="1F600 ; fully-qualified # 😀 E1.0 grinning face\n")


@pytest.mark.skipif(not HAVE_TEST_FILE, reason=f"{EMOJI_TEST_PATH} missing (apt-get install unicode-data)")
def test_parse_real_file():
    entries = parse_emoji_test()
    assert len(entries) > 3000  # 3,655 in Unicode 15.0
    assert entries[0].name == "grinning face" and entries[0].subgroup == "face-smiling"
    assert len({e.group for e in entries}) >= 9 and "Component" not in {e.group for e in entries}
    assert len({e.codepoints for e in entries}) == len(entries)


def test_missing_files_raise_with_apt_hint(tmp_path, snippet):
    with pytest.raises(DatasetNotFoundError) as ei:
        load_emoji(emoji_test_path=tmp_path / "nope.txt", font_path=tmp_path / "nofont.ttf", cache_dir=tmp_path)
    assert str(tmp_path / "nope.txt") in str(ei.value)
    assert "apt-get install fonts-noto-color-emoji unicode-data" in str(ei.value)
    with pytest.raises(DatasetNotFoundError) as ei:
        load_emoji(emoji_test_path=snippet, font_path=tmp_path / "nofont.ttf", cache_dir=tmp_path)
    assert str(tmp_path / "nofont.ttf") in str(ei.value)
    assert "apt-get install fonts-noto-color-emoji unicode-data" in str(ei.value)
    with pytest.raises(DatasetNotFoundError, match="nope.txt"):
        parse_emoji_test(tmp_path / "nope.txt")


# ---- rendering --------------------------------------------------------------------------------------------------

@needs_font
def test_render_snippet(snippet, tmp_path):
    ds = load_emoji(size=24, emoji_test_path=snippet, cache_dir=tmp_path / "cache")
    assert isinstance(ds, EmojiDataset) and len(ds) == 6
    assert ds.images.shape == (6, 3, 24, 24) and ds.images.dtype == torch.uint8
    assert ds.captions[0] == "grinning face" and ds.codepoints[-1] == "1F1FF 1F1E6"
    assert ds.subgroups == ["face-smiling", "face-affection", "family", "country-flag"]
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 3] and ds.classes == ds.subgroups
    assert ds.group_labels.tolist() == [0, 0, 0, 0, 1, 2]
    assert ds.dropped == {"blank": [], "multi_glyph": []}
    imgs = ds.images.float()
    for i in range(6):
        assert (imgs[i] < 200).float().mean() > 0.05, f"{ds.captions[i]} looks blank"
    for i in range(2):  # round faces: white background in the corners
        assert ds.images[i][:, :2, :2].min() >= 250
    # colour: the grinning face is yellow (R, G high, B low in its centre)
    r, g, b = ds.images[0][:, 10:14, 10:14].float().mean(dim=(1, 2)).tolist()
    assert r > 150 and g > 100 and b < 100
    # all pairwise different
    flat = ds.images.flatten(1).float()
    assert (torch.cdist(flat, flat) + torch.eye(6) * 1e9).min() > 100
    img, caption, label = ds[4]
    assert caption == "family: man, woman, girl" and label == 2 and img.shape == (3, 24, 24)
    ds.label_level = "group"
    assert ds.classes == ["Smileys & Emotion", "People & Body", "Flags"] and ds[4][2] == 1


@needs_font
def test_blank_and_multi_glyph_renders_are_dropped_and_reported(tmp_path):
    r = EmojiRenderer(size=16)
    assert r.render("\ue000")[1] == "blank"      # private use: no glyph in the font
    assert r.render("\U0001F600\U0001F600")[1] == "multi_glyph"
    arr, status = r.render("\U0001F600")
    assert status == "ok" and arr.shape == (16, 16, 3)
    text = EMOJI_SNIPPET.replace("#EOF", "# subgroup: odd\nE000 ; fully-qualified # \ue000 E0.0 private use\n"
                                         "1F600 1F600 ; fully-qualified # 😀😀 E0.0 two faces\n#EOF")
    p = tmp_path / "emoji-test.txt"
    p.write_text(text, encoding="utf-8")
    ds = load_emoji(size=16, emoji_test_path=p, cache_dir=tmp_path / "c")
    assert len(ds) == 6
    assert ds.dropped == {"blank": ["private use"], "multi_glyph": ["two faces"]}
    assert "odd" not in ds.subgroups
    kept = load_emoji(size=16, emoji_test_path=p, use_cache=False, drop_multi_glyph=False)
    assert len(kept) == 7 and "two faces" in kept.captions and kept.dropped["blank"] == ["private use"]


@needs_font
def test_all_blank_is_an_empty_dataset(tmp_path):
    p = tmp_path / "emoji-test.txt"
    p.write_text("# group: G\n# subgroup: s\nE000 ; fully-qualified # \ue000 E0.0 nothing\n", encoding="utf-8")
    with pytest.raises(EmptyDatasetError):
        load_emoji(size=8, emoji_test_path=p, use_cache=False)


# ---- cache ------------------------------------------------------------------------------------------------------

@needs_font
def test_cache_roundtrip_and_key(snippet, tmp_path):
    cache = tmp_path / "cache"
    first = load_emoji(size=16, emoji_test_path=snippet, cache_dir=cache)
    assert not first.from_cache and first.cache_path.is_file() and first.cache_path.parent == cache
    second = load_emoji(size=16, emoji_test_path=snippet, cache_dir=cache)
    assert second.from_cache and second.render_seconds is None
    assert torch.equal(first.images, second.images) and first.captions == second.captions
    # another size or different emoji-test.txt contents -> another cache entry
    assert load_emoji(size=8, emoji_test_path=snippet, cache_dir=cache).cache_path != first.cache_path
    snippet.write_text(EMOJI_SNIPPET.replace("grinning face with big eyes", "grinning face, big eyes"), "utf-8")
    changed = load_emoji(size=16, emoji_test_path=snippet, cache_dir=cache)
    assert not changed.from_cache and changed.cache_path != first.cache_path
    assert changed.captions[1] == "grinning face, big eyes"


@needs_font
@pytest.mark.parametrize("damage", ["flip_bytes", "truncate", "garbage"])
def test_corrupt_cache_is_detected_warned_and_rebuilt(snippet, tmp_path, damage):
    cache = tmp_path / "cache"
    good = load_emoji(size=16, emoji_test_path=snippet, cache_dir=cache)
    path = good.cache_path
    data = bytearray(path.read_bytes())
    if damage == "flip_bytes":  # flip bytes in the middle of the file (inside the tensor data)
        mid = len(data) // 2
        for k in range(mid, mid + 64):
            data[k] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 3]
    else:
        data = bytearray(b"not a torch file at all")
    path.write_bytes(bytes(data))
    with pytest.warns(CacheWarning, match=str(path.name)):
        rebuilt = load_emoji(size=16, emoji_test_path=snippet, cache_dir=cache)
    assert not rebuilt.from_cache and torch.equal(rebuilt.images, good.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # the rebuilt file is valid again
        assert load_emoji(size=16, emoji_test_path=snippet, cache_dir=cache).from_cache


def test_checksum_mismatch_and_stale_key(tmp_path):
    path = tmp_path / "x.pt"
    payload = {"images": torch.arange(12, dtype=torch.uint8).reshape(3, 4), "captions": ["a", "b", "c"]}
    save_checked(path, payload, {"v": 1})
    assert torch.equal(load_checked(path, {"v": 1})["images"], payload["images"])
    with pytest.warns(CacheWarning, match="different inputs"):
        assert load_checked(path, {"v": 2}) is None
    obj = torch.load(path, weights_only=True)
    obj["payload"]["images"][0, 0] = 99  # same structure, silently different contents
    torch.save(obj, path)
    with pytest.warns(CacheWarning, match="checksum"):
        assert load_checked(path, {"v": 1}) is None
    assert load_checked(tmp_path / "missing.pt", {"v": 1}) is None
    assert payload_checksum({"a": [1, 2]}) != payload_checksum({"a": [1, 3]})


def test_cache_dir_resolution(tmp_path, monkeypatch):
    assert default_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv(CACHE_ENV)
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "notebooks").mkdir()
    monkeypatch.chdir(repo / "notebooks")
    assert default_cache_dir() == repo.resolve() / ".cache" / "contrastive_repro"
    outside = tmp_path / "plain"
    outside.mkdir()
    monkeypatch.chdir(outside)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if not any((d / ".git").exists() for d in (outside, *outside.parents)):
        assert default_cache_dir() == tmp_path / "home" / ".cache" / "contrastive_repro"


# ---- splits -----------------------------------------------------------------------------------------------------

@needs_font
def test_split_helpers_on_emoji(snippet, tmp_path):
    ds = load_emoji(size=8, emoji_test_path=snippet, cache_dir=tmp_path)
    tr, te = ds.split("class", test_fraction=0.5, seed=3)
    assert set(tr.subgroup_names).isdisjoint(te.subgroup_names) and len(tr) + len(te) == len(ds)
    tr2, te2 = ds.split("class", test_fraction=0.5, seed=3)
    assert tr.captions == tr2.captions and te.captions == te2.captions
    assert tr.classes == ds.classes  # vocab kept, labels unchanged
    trr, ter = ds.split("class", test_fraction=0.5, seed=3, relabel=True)
    assert sorted(set(trr.labels.tolist())) == list(range(trr.num_classes))
    tri, tei = ds.split("item", test_fraction=0.5, seed=0)
    # classes with >= 2 emoji contribute to both sides; singletons stay in train
    assert set(tei.subgroup_names) == {"face-smiling", "face-affection"}
    assert set(tri.subgroup_names) == set(ds.subgroup_names)
    assert set(tri.captions).isdisjoint(tei.captions)


# ---- the full set (timed) ---------------------------------------------------------------------------------------

@needs_both
def test_render_all_emoji_and_cache_timing(tmp_path, capsys):
    t0 = time.perf_counter()
    ds = load_emoji(size=32, cache_dir=tmp_path)
    render_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    again = load_emoji(size=32, cache_dir=tmp_path)
    load_s = time.perf_counter() - t1
    n_entries = len(parse_emoji_test())
    assert len(ds) + len(ds.dropped["blank"]) + len(ds.dropped["multi_glyph"]) == n_entries
    assert len(ds) > 0.95 * n_entries
    assert ds.images.shape[1:] == (3, 32, 32) and again.from_cache and torch.equal(ds.images, again.images)
    assert ds.num_classes > 90 and len(ds.groups) == 9
    assert render_s < 120 and load_s < 10
    with capsys.disabled():
        print(f"\n[emoji] rendered {len(ds)} emoji at 32px in {render_s:.1f}s "
              f"(dropped blank={len(ds.dropped['blank'])}, multi_glyph={len(ds.dropped['multi_glyph'])}); "
              f"cache load {load_s:.3f}s")
