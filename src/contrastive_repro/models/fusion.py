"""Building blocks of the ALBEF-style fusion model (:mod:`contrastive_repro.models.albef`).

* :class:`ViTImageEncoder` -- a randomly initialised ``timm`` VisionTransformer that returns ``[CLS] + patch`` tokens.
* :class:`TextEncoder` -- word + position embeddings and pre-norm self-attention layers over caller-given token ids.
* :class:`FusionEncoder` -- pre-norm layers of self-attention over text tokens followed by cross-attention to the
  image tokens (``nn.MultiheadAttention`` with ``kdim = vdim = vision width``) and an MLP.
* :func:`mask_tokens` -- BERT/ALBEF masked-language-modelling corruption (15 %, 80/10/10 rule, ``ignore_index=-100``).
* :func:`sample_hard_negatives` -- ALBEF's ITM hard-negative sampling from in-batch contrastive similarities.
* :func:`encode_batch` -- ``[CLS] w1 .. wn [SEP] [PAD] ..`` id/mask tensors from lists of word ids.

Design notes (differences from ALBEF's BERT, on purpose): all text and fusion layers are *pre-norm* (a final
LayerNorm closes each stack) rather than BERT's post-norm, which trains stably from scratch at small sizes without a
warm-up; ALBEF initialises from BERT-base / DeiT weights, which we do not have offline.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["IGNORE_INDEX", "ViTImageEncoder", "TransformerBlock", "TextEncoder", "FusionEncoder", "mask_tokens",
           "sample_hard_negatives", "encode_batch", "init_bert_weights"]

IGNORE_INDEX = -100


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT-style initialisation: Linear/Embedding weights ~ N(0, std), zero biases, LayerNorm = identity."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            nn.init.normal_(module.in_proj_weight, std=std)
        else:
            for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight):
                nn.init.normal_(w, std=std)
        if module.in_proj_bias is not None:
            nn.init.zeros_(module.in_proj_bias)


class ViTImageEncoder(nn.Module):
    """A ViT built with ``timm.models.vision_transformer.VisionTransformer`` and random weights (nothing downloads).

    ``forward(images [B, C, H, W]) -> tokens [B, 1 + (H/p)(W/p), width]``; token 0 is [CLS]. The tokens are the
    output of the ViT's final LayerNorm (``forward_features``), as the ALBEF image encoder returns them.
    """

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, width: int = 128, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer  # lazy: timm's import is slow

        self.width = width
        self.img_size = img_size
        self.vit = VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                                     embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
                                     qkv_bias=True, class_token=True, global_pool="token",
                                     drop_path_rate=drop_path_rate)
        self.num_tokens = 1 + (img_size // patch_size) ** 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(images)


class TransformerBlock(nn.Module):
    """Pre-norm transformer layer: ``x += SA(LN x)``; optionally ``x += CA(LN x, context)``; ``x += MLP(LN x)``.

    Masks follow ``nn.MultiheadAttention``: ``pad_mask`` / ``context_pad_mask`` are boolean, ``True`` = ignore.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 cross_width: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.has_cross = cross_width is not None
        if self.has_cross:
            self.norm_cross = nn.LayerNorm(width)
            self.cross_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True,
                                                    kdim=cross_width, vdim=cross_width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.self_attn(h, h, h, key_padding_mask=pad_mask, need_weights=False)[0])
        if self.has_cross:
            if context is None:
                raise ValueError("this layer has cross-attention: pass the image tokens as `context`")
            h = self.norm_cross(x)
            x = x + self.drop(self.cross_attn(h, context, context, key_padding_mask=context_pad_mask,
                                              need_weights=False)[0])
        return x + self.drop(self.mlp(self.norm2(x)))


def _pad_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Attention mask (1/True = token) -> key padding mask (True = ignore)."""
    return None if attention_mask is None else ~attention_mask.bool()


class TextEncoder(nn.Module):
    """Token ids ``[B, L]`` (+ attention mask, 1 = token) -> states ``[B, L, width]``; state 0 is the [CLS] token.

    Embeddings: word + learned absolute position, LayerNorm, dropout (as BERT, without token-type embeddings);
    then ``depth`` pre-norm self-attention layers and a final LayerNorm. Every row must keep at least one token
    (the [CLS] at position 0); a fully padded row would give NaN attention.
    """

    def __init__(self, vocab_size: int, width: int = 128, depth: int = 2, heads: int = 4, max_len: int = 32,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, pad_id: int = 0):
        super().__init__()
        self.width, self.max_len = width, max_len
        self.word_embeddings = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.position_embeddings = nn.Embedding(max_len, width)
        self.emb_norm = nn.LayerNorm(width)
        self.emb_drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.apply(init_bert_weights)

    def forward(self, text_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        length = text_ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"text length {length} exceeds max_text_len={self.max_len}")
        pos = torch.arange(length, device=text_ids.device)
        x = self.emb_drop(self.emb_norm(self.word_embeddings(text_ids) + self.position_embeddings(pos)[None]))
        pad = _pad_mask(attention_mask)
        for layer in self.layers:
            x = layer(x, pad)
        return self.norm(x)


class FusionEncoder(nn.Module):
    """Multimodal encoder: ``depth`` pre-norm layers of [self-attention over text, cross-attention to image, MLP].

    ``forward(text_states [B, L, Dt], text_mask [B, L], image_states [B, N, Dv], image_mask=None) -> [B, L, Dt]``;
    the fused [CLS] state (position 0) drives the ITM / VQA / NLVR / VE heads, every position the MLM head.
    """

    def __init__(self, width: int = 128, depth: int = 2, heads: int = 4, vision_width: int = 128,
                 mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.width = width
        self.layers = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio, dropout, cross_width=vision_width)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.apply(init_bert_weights)

    def forward(self, text_states: torch.Tensor, text_mask: torch.Tensor | None, image_states: torch.Tensor,
                image_mask: torch.Tensor | None = None) -> torch.Tensor:
        pad, img_pad = _pad_mask(text_mask), _pad_mask(image_mask)
        x = text_states
        for layer in self.layers:
            x = layer(x, pad, image_states, img_pad)
        return self.norm(x)


def mask_tokens(text_ids: torch.Tensor, attention_mask: torch.Tensor | None, *, vocab_size: int, mask_id: int,
                special_ids: Sequence[int], mlm_probability: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT / ALBEF masked-LM corruption.

    Each *eligible* token (inside ``attention_mask`` and not one of ``special_ids``: [CLS], [SEP], [PAD], [MASK],
    ...) is selected with probability ``mlm_probability``. A selected token is replaced by ``mask_id`` with
    probability 0.8, by a uniformly drawn non-special vocabulary id with probability 0.1, and kept with probability
    0.1. Returns ``(input_ids, labels)``: ``labels`` holds the original id at selected positions and
    ``IGNORE_INDEX`` (-100) elsewhere. ``generator`` (on the ids' device) makes the draw reproducible.
    (ALBEF draws the random replacement from the whole vocabulary; we exclude special ids.)
    """
    if not 0.0 <= mlm_probability <= 1.0:
        raise ValueError(f"mlm_probability must be in [0, 1], got {mlm_probability}")
    device = text_ids.device
    special = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    special[torch.as_tensor(list(special_ids), dtype=torch.long, device=device)] = True
    eligible = ~special[text_ids]
    if attention_mask is not None:
        eligible &= attention_mask.bool()

    def _u() -> torch.Tensor:
        return torch.rand(text_ids.shape, device=device, generator=generator)

    selected = eligible & (_u() < mlm_probability)
    labels = torch.where(selected, text_ids, torch.full_like(text_ids, IGNORE_INDEX))
    u = _u()
    to_mask = selected & (u < 0.8)
    to_random = selected & (u >= 0.8) & (u < 0.9)
    regular = (~special).nonzero().squeeze(1)
    if regular.numel() == 0:
        raise ValueError("every vocabulary id is special: nothing to draw random replacements from")
    random_ids = regular[torch.randint(regular.numel(), text_ids.shape, device=device, generator=generator)]
    input_ids = torch.where(to_mask, torch.full_like(text_ids, mask_id), text_ids)
    input_ids = torch.where(to_random, random_ids.to(text_ids.dtype), input_ids)
    return input_ids, labels


@torch.no_grad()
def sample_hard_negatives(sim: torch.Tensor, positive_mask: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF's ITM hard-negative sampling: for each row ``i`` draw one column ``j`` with probability
    ``softmax_j(sim[i, j])`` restricted to the negatives (``positive_mask[i, j] == False``; the diagonal when
    ``positive_mask`` is None). A positive is never drawn (its weight is exactly 0).

    Returns ``(index [B] long, valid [B] bool)``; ``valid[i]`` is False when row ``i`` has no negative at all (then
    ``index[i]`` is arbitrary and the caller must ignore that pair -- the ITM loss gives it label -100).
    """
    if sim.dim() != 2:
        raise ValueError(f"sim must be [B, B'], got {tuple(sim.shape)}")
    if positive_mask is None:
        positive_mask = torch.eye(sim.shape[0], sim.shape[1], dtype=torch.bool, device=sim.device)
    positive_mask = positive_mask.bool()
    valid = (~positive_mask).any(dim=1)
    logits = sim.float().masked_fill(positive_mask, float("-inf"))
    logits = torch.where(valid[:, None], logits, torch.zeros_like(logits))  # rows without negatives: uniform
    weights = torch.softmax(logits, dim=1)
    weights = torch.nan_to_num(weights, nan=0.0)
    index = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return index, valid


def encode_batch(sequences: Sequence[Sequence[int]], *, cls_id: int, sep_id: int, pad_id: int,
                 max_len: int | None = None, device: torch.device | str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Word-id lists -> ``(text_ids [B, L], text_mask [B, L])`` laid out ``[CLS] w1 .. wn [SEP] [PAD] ..``.

    ``L`` is the longest sequence + 2, capped at ``max_len`` (words beyond ``max_len - 2`` are dropped; [SEP] kept).
    """
    if max_len is not None and max_len < 2:
        raise ValueError("max_len must leave room for [CLS] and [SEP]")
    rows = []
    for seq in sequences:
        words = list(seq) if max_len is None else list(seq)[: max_len - 2]
        rows.append([cls_id, *words, sep_id])
    length = max((len(r) for r in rows), default=2)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)
