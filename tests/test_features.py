"""Frozen offline encoders and their feature cache."""
import random
import warnings

import pytest
import torch

from contrastive_repro import features as feat
from contrastive_repro.data.cache import CacheWarning


@pytest.fixture()
def images():
    g = torch.Generator().manual_seed(0)
    return (torch.rand(5, 3, 40, 40, generator=g) * 255).to(torch.uint8)


def test_image_layers_shapes_views_and_cache(images, tmp_path):
    f = feat.image_features(images, "t", layers=("final", "mid", "grid"), resolution=64, views=2,
                            cache_dir=tmp_path, progress=False)
    assert f["final"].shape == (5, 1280) and f["mid"].shape == (5, 112) and f["grid"].shape == (5, 4, 320)
    assert f["view_final"].shape == (5, 2, 1280) and f["grid"].dtype == torch.float16
    # the clean features equal the encoder applied to the resized, normalized images (computed another way)
    enc = feat.load_image_encoder()
    x = torch.nn.functional.interpolate(images.float() / 255, size=(64, 64), mode="bilinear", antialias=True)
    mean, std = torch.tensor(feat.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(feat.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = enc.backbone((x - mean) / std)  # the backbone's own forward: pooled head features
    torch.testing.assert_close(f["final"], ref, rtol=1e-4, atol=1e-4)
    # views differ from the clean image and from each other
    assert not torch.allclose(f["view_final"][:, 0], f["view_final"][:, 1])
    # a second call is a cache hit with identical tensors
    files = list((tmp_path / "features").glob("image-t-*.pt"))
    assert len(files) == 1
    g = feat.image_features(images, "t", layers=("final", "mid", "grid"), resolution=64, views=2,
                            cache_dir=tmp_path, progress=False)
    assert g["_seconds"] == f["_seconds"] and torch.equal(g["view_final"], f["view_final"])
    # other inputs under the same name never share the entry
    other = images.clone()
    other[0, 0, 0, 0] ^= 1
    feat.image_features(other, "t", layers=("final", "mid", "grid"), resolution=64, views=2, cache_dir=tmp_path,
                        progress=False)
    assert len(list((tmp_path / "features").glob("image-t-*.pt"))) == 2


def test_corrupt_cache_is_rebuilt(images, tmp_path):
    f = feat.image_features(images, "c", resolution=32, cache_dir=tmp_path, progress=False)
    path = next((tmp_path / "features").glob("image-c-*.pt"))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(CacheWarning, match="unreadable"):
        g = feat.image_features(images, "c", resolution=32, cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(g["final"], f["final"])


def test_random_init_encoder_is_a_different_network(images, tmp_path):
    a = feat.image_features(images, "p", resolution=32, cache_dir=tmp_path, progress=False)
    b = feat.image_features(images, "p", resolution=32, cache_dir=tmp_path, progress=False, pretrained=False)
    assert not torch.allclose(a["final"], b["final"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers=("final", "pool5")), "layers must be"),
    (dict(resolution=16), "resolution"),
    (dict(views=-1), "views"),
])
def test_image_bad_arguments(images, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        feat.image_features(images, "b", cache_dir=tmp_path, progress=False, **kwargs)


def test_image_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        feat.image_features(torch.zeros(3, 32, 32), "b", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="NaN"):
        feat.image_features(torch.full((1, 3, 32, 32), float("nan")), "b", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="channels"):
        feat.image_features(torch.zeros(1, 2, 32, 32), "b", cache_dir=tmp_path)


def test_text_features_are_masked_mean_pooling(tmp_path):
    texts = ["a red apple", "grinning face with big eyes", "flag"]
    f = feat.text_features(texts, "t", tokens=True, max_length=16, views=3, cache_dir=tmp_path, progress=False)
    assert f["sentence"].shape == (3, 384) and f["tokens"].shape == (3, 16, 384) and f["mask"].shape == (3, 16)
    assert f["view_sentence"].shape == (3, 3, 384)
    tok, model, _ = feat.load_text_encoder()
    for i, t in enumerate(texts):  # one text at a time: no padding, a plain mean over its tokens
        with torch.no_grad():
            h = model(**tok([t], return_tensors="pt")).last_hidden_state[0]
        torch.testing.assert_close(f["sentence"][i], h.mean(0), rtol=1e-4, atol=1e-4)
        n = int(f["mask"][i].sum())
        assert n == h.shape[0]
    # paraphrase-level similarity: the sentence embedding is meaningful
    s = feat.text_features(["a happy smiling face", "a grinning face", "a railway locomotive"], "s",
                           cache_dir=tmp_path, progress=False)["sentence"]
    s = torch.nn.functional.normalize(s, dim=-1)
    assert s[0] @ s[1] > s[0] @ s[2] + 0.2


def test_text_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        feat.text_features([], "x", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        feat.text_features(["ok", ""], "x", cache_dir=tmp_path)


def test_eda_views_are_deterministic_and_keep_words():
    a = feat.eda_views("one two three four five", 4, random.Random(3))
    b = feat.eda_views("one two three four five", 4, random.Random(3))
    assert a == b and len(a) == 4
    for v in a:
        assert v and set(v.split()) <= {"one", "two", "three", "four", "five"}
    assert feat.eda_views("solo", 2, random.Random(0)) == ["solo", "solo"]
