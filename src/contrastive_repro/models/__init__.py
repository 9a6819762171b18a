"""Models: a small CNN and projection head, open_clip two-towers from presets, and embedding backbones.

* :class:`SmallConvNet`, :class:`ProjectionHead` -- 28x28/32x32 encoders for the CPU experiments.
* :func:`build_clip`, :func:`get_tokenizer`, :func:`encode_image`, :func:`encode_text`, :func:`logit_scale` --
  open_clip ``CLIP`` models (presets ``tiny``, ``small``, ``paper-rn50``); open_clip is imported lazily.
* :class:`EmbeddingNet`, :func:`build_embedding_model` -- resnet50 / vit_b_16 / efficientnet_lite0 / small_cnn
  backbones with a linear embedding layer, weights only from local files (or the efficientnet package).
"""
from .backbones import BACKBONES, EmbeddingNet, build_backbone, build_embedding_model, efficientnet_lite0_weights_path
from .clip import CLIP_PRESETS, build_clip, clip_config, encode_image, encode_text, get_tokenizer, logit_scale, similarity
from .small_cnn import ProjectionHead, SmallConvNet

__all__ = ["SmallConvNet", "ProjectionHead", "CLIP_PRESETS", "clip_config", "build_clip", "get_tokenizer",
           "encode_image", "encode_text", "logit_scale", "similarity", "BACKBONES", "EmbeddingNet", "build_backbone",
           "build_embedding_model", "efficientnet_lite0_weights_path"]
