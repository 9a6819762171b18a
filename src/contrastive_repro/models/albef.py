"""An ALBEF-style image-text fusion model (Li et al., "Align before Fuse", NeurIPS 2021), small enough for a CPU.

Used by the CVPR 2023 "latent modality structures" reproduction (``/work/shared/papers/FACTS.md``, section B), which
adds its regularizers to ALBEF's pre-training losses using "augmented features from the momentum encoders".

Architecture (:class:`ALBEF`)
    image encoder  ViT (``timm`` VisionTransformer, random weights)      -> image tokens ``[B, 1+N, Dv]``
    text encoder   ``text_depth`` self-attention layers over token ids    -> text tokens ``[B, L, Dt]``
    fusion encoder ``fusion_depth`` layers: self-attn (text) + cross-attn (image) + MLP  -> fused ``[B, L, Dt]``
    ``vision_proj`` / ``text_proj``: [CLS] -> ``embed_dim``, L2-normalised; learnable temperature ``temp``.
    Momentum (EMA, ``momentum=0.995``) copies of the image encoder, text encoder and both projections (plus the
    fusion encoder and MLM head when ``distill_mlm``), and image / text feature queues (``queue_size``).

Pre-training objectives (:meth:`ALBEF.forward_pretrain`), ``s(I, T) = <z_v, z_t> / temp``:
    ITC  ``L_itc = 1/2 E[ H(y^{i2t}, softmax(s(I, T_all))) + H(y^{t2i}, softmax(s(T, I_all))) ]`` where
         ``T_all`` / ``I_all`` are the momentum features of the batch followed by the queue, and with momentum
         distillation the targets are ``y = alpha * softmax(s_m) + (1 - alpha) * y_onehot`` (ALBEF Eq. 2 and Sec. 3.3;
         ``s_m`` from the momentum features).
    ITM  binary cross-entropy on ``itm_head(fused CLS)`` over the B positive pairs and 2B hard negatives: for each
         text one image drawn with probability ``softmax(s(T, I))`` over the in-batch negatives, and for each image
         one text likewise (ALBEF Sec. 3.2).
    MLM  cross-entropy of the masked tokens (15 %, 80/10/10) predicted from the fused states given the image;
         with ``distill_mlm`` it is mixed with the momentum model's soft predictions by ``alpha`` (ALBEF Eq. 6).

Downstream (:meth:`ALBEF.retrieval_scores`, :class:`ALBEFForVQA`, :class:`ALBEFForNLVR`, :class:`ALBEFForVE`):
    retrieval ITC recall then ITM re-ranking of the top-``k`` candidates (ALBEF Sec. 4, ``k_test`` = 256 / 128);
    VQA       **classification** over a fixed answer list from the fused [CLS] (:class:`VQAHead`). ALBEF itself uses a
              6-layer generative answer decoder and ranks the 3,192 candidate answers by likelihood; classification
              over the answer list is the common VQA baseline head (BUTD, LXMERT, UNITER) and what we reproduce here.
    NLVR2     the text is fused with each of the two images separately, the two fused [CLS] are concatenated and an
              MLP gives 2 logits. (ALBEF instead replicates the cross-attention in every fusion layer, one per image,
              and adds a text-assignment pre-training step; not done here.)
    SNLI-VE   fused [CLS] -> MLP -> 3 logits (entailment / neutral / contradiction), as ALBEF.

Modality-structure regularizers (CVPR 2023): ``forward_pretrain`` returns the online ``z_v``, ``z_t`` and, as the
paper's augmented features, the momentum-encoder features ``z_v_aug``, ``z_t_aug`` (of ``images_aug`` /
``text_ids_aug`` when given, else of the same inputs); with ``ALBEFConfig(sep_heads=True)`` extra linear heads on the
unimodal [CLS] states (and their momentum copies) give the modality-independent ``zi_*`` features that deep feature
separation needs. The regularizers live in :mod:`contrastive_repro.losses.modality`.

Differences from ALBEF, on purpose: pre-norm text/fusion layers and random initialisation (no BERT / DeiT weights
offline); the queues start empty and only filled slots are used (ALBEF starts them with random unit vectors; the two
agree once the queue is full); the ITM re-ranking score is the ITM log-odds ``logit_match - logit_no_match`` (ALBEF
uses the match logit); no momentum distillation in fine-tuning.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .fusion import (IGNORE_INDEX, FusionEncoder, TextEncoder, ViTImageEncoder, encode_batch, mask_tokens,
                     sample_hard_negatives)

__all__ = ["ALBEFConfig", "ALBEF_PRESETS", "PAPER_CONFIG", "ALBEF", "RetrievalScores", "VQAHead", "NLVRHead",
           "VEHead", "ALBEFForVQA", "ALBEFForNLVR", "ALBEFForVE", "OBJECTIVES"]

OBJECTIVES = ("itc", "itm", "mlm")


@dataclass
class ALBEFConfig:
    """Sizes and hyper-parameters of :class:`ALBEF`. Presets: :meth:`tiny` (tests), :meth:`cpu`, :meth:`paper`.

    Text ids are word-level ids chosen by the caller; ``pad_id``, ``cls_id``, ``sep_id``, ``mask_id`` and
    ``extra_special_ids`` are never masked by MLM nor drawn as random replacements. Texts must start with [CLS].
    ``queue_size=0`` disables the queues; ``alpha=0`` disables momentum distillation (the momentum encoders are
    still built: they give the ``*_aug`` features and the queue entries).
    """

    # text vocabulary
    vocab_size: int = 1000
    max_text_len: int = 32
    pad_id: int = 0
    cls_id: int = 1
    sep_id: int = 2
    mask_id: int = 3
    extra_special_ids: tuple[int, ...] = ()
    # image encoder (ViT)
    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    vision_width: int = 128
    vision_depth: int = 4
    vision_heads: int = 4
    drop_path_rate: float = 0.0
    # text + fusion encoders
    text_width: int = 128
    text_depth: int = 2
    fusion_depth: int = 2
    text_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    # objectives
    embed_dim: int = 128
    temp: float = 0.07
    learn_temp: bool = True
    temp_min: float = 0.001
    temp_max: float = 0.5
    queue_size: int = 4096
    momentum: float = 0.995
    alpha: float = 0.4
    distill_mlm: bool = True
    mlm_probability: float = 0.15
    # CVPR 2023 "deep feature separation": extra heads giving modality-independent features zi_v / zi_t
    sep_heads: bool = False
    # training recipe of the paper (informative; the model does not use them)
    recipe: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.extra_special_ids = tuple(int(i) for i in self.extra_special_ids)
        for name in ("text_width", "vision_width"):
            heads = self.text_heads if name == "text_width" else self.vision_heads
            if getattr(self, name) % heads:
                raise ValueError(f"{name}={getattr(self, name)} is not divisible by its number of heads ({heads})")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        for name in ("pad_id", "cls_id", "sep_id", "mask_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} outside the vocabulary [0, {self.vocab_size})")
        if len(set(self.special_ids)) == self.vocab_size:
            raise ValueError("the vocabulary holds only special ids")
        if self.queue_size < 0:
            raise ValueError("queue_size must be >= 0")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError("momentum must be in [0, 1]")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must be in [0, 1]")
        if not 0.0 < self.temp_min <= self.temp <= self.temp_max:
            raise ValueError("need 0 < temp_min <= temp <= temp_max")

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.cls_id, self.sep_id, self.mask_id, *self.extra_special_ids)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ALBEFConfig":
        d = dict(d)
        if "extra_special_ids" in d:
            d["extra_special_ids"] = tuple(d["extra_special_ids"])
        return cls(**d)

    def replace(self, **overrides: Any) -> "ALBEFConfig":
        return dataclasses.replace(self, **overrides)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ALBEFConfig":
        """``ALBEFConfig.preset("tiny" | "cpu" | "paper", vocab_size=..., ...)``."""
        if name not in ALBEF_PRESETS:
            raise KeyError(f"unknown ALBEF preset {name!r}; choose from {sorted(ALBEF_PRESETS)}")
        return cls(**{**ALBEF_PRESETS[name], **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> "ALBEFConfig":
        return cls.preset("tiny", **overrides)

    @classmethod
    def cpu(cls, **overrides: Any) -> "ALBEFConfig":
        return cls.preset("cpu", **overrides)

    @classmethod
    def paper(cls, **overrides: Any) -> "ALBEFConfig":
        return cls.preset("paper", **overrides)


#: Preset sizes. "paper" is ALBEF's pre-training setting (ViT-B/16 + BERT-base split into 6 text + 6 fusion
#: layers, 256-d ITC space, queue 65,536, momentum 0.995, alpha 0.4; images 256x256 in pre-training, 384x384 in
#: fine-tuning; BERT's uncased WordPiece vocabulary and special ids). Never instantiated in tests: ~233 M trainable
#: parameters (the MLM decoder is untied), ~467 M with the momentum copies. "cpu" has ~2.0 M trainable parameters.
ALBEF_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=64, max_text_len=16, img_size=16, patch_size=4, vision_width=32, vision_depth=1,
                 vision_heads=2, text_width=32, text_depth=1, fusion_depth=1, text_heads=2, mlp_ratio=2.0,
                 embed_dim=16, queue_size=32),
    "cpu": dict(vocab_size=1000, max_text_len=32, img_size=32, patch_size=4, vision_width=128, vision_depth=4,
                vision_heads=4, text_width=128, text_depth=2, fusion_depth=2, text_heads=4, mlp_ratio=4.0,
                embed_dim=128, queue_size=4096),
    "paper": dict(vocab_size=30522, max_text_len=512, pad_id=0, cls_id=101, sep_id=102, mask_id=103,
                  extra_special_ids=(100,),  # [UNK]
                  img_size=256, patch_size=16, vision_width=768, vision_depth=12, vision_heads=12,
                  drop_path_rate=0.1, text_width=768, text_depth=6, fusion_depth=6, text_heads=12, mlp_ratio=4.0,
                  dropout=0.1, embed_dim=256, temp=0.07, queue_size=65536, momentum=0.995, alpha=0.4,
                  distill_mlm=True, mlm_probability=0.15,
                  recipe=dict(finetune_img_size=384, batch_size=512, epochs=30, optimizer="AdamW", lr=1e-4,
                              min_lr=1e-5, weight_decay=0.02, schedule="cosine", warmup_lr=1e-5,
                              alpha_warmup="alpha ramps linearly from 0 over the first epoch",
                              max_words=30, pretrain_images="4M (CC3M+SBU+VG+COCO)", k_test_coco=256,
                              k_test_flickr=128)),
}

#: ALBEF's paper sizes as a plain dict (see :data:`ALBEF_PRESETS`).
PAPER_CONFIG: dict[str, Any] = ALBEFConfig.paper().to_dict()


class RetrievalScores(NamedTuple):
    """Score matrices of :meth:`ALBEF.retrieval_scores`, all ``[n_img, n_txt]`` (row = image, column = text).

    ``i2t``: image queries -- rank row ``i`` (its top-k texts by ITC carry ITM scores, the rest follow by ITC).
    ``t2i``: text queries -- rank column ``j`` (``t2i.T`` gives rows per text query).
    ``itc``: the contrastive cosine similarities used for the first-stage recall.
    """

    i2t: torch.Tensor
    t2i: torch.Tensor
    itc: torch.Tensor


def _concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 when torch.distributed is initialised (no gradient; for the queues), else ``x``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def _soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_j targets_ij log softmax(logits)_ij``."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


class ALBEF(nn.Module):
    """ALBEF-style fusion model; see the module docstring for the objectives. ``ALBEF(ALBEFConfig.tiny())``.

    Optimise only :meth:`trainable_parameters` (the momentum copies are buffers-like parameters with
    ``requires_grad=False``; they change only through :meth:`update_momentum`).
    """

    #: (online module, momentum copy) attribute names; fusion / MLM head only with ``config.distill_mlm``, the
    #: separation heads only with ``config.sep_heads``.
    _MOMENTUM_PAIRS = (("visual_encoder", "visual_encoder_m"), ("text_encoder", "text_encoder_m"),
                       ("vision_proj", "vision_proj_m"), ("text_proj", "text_proj_m"))
    _MLM_PAIRS = (("fusion_encoder", "fusion_encoder_m"), ("mlm_head", "mlm_head_m"))
    _SEP_PAIRS = (("vision_sep", "vision_sep_m"), ("text_sep", "text_sep_m"))

    def __init__(self, config: ALBEFConfig | None = None, **overrides: Any):
        super().__init__()
        config = ALBEFConfig() if config is None else config
        if overrides:
            config = config.replace(**overrides)
        self.config = c = config
        self.visual_encoder = ViTImageEncoder(c.img_size, c.patch_size, c.in_chans, c.vision_width, c.vision_depth,
                                              c.vision_heads, c.mlp_ratio, c.drop_path_rate)
        self.text_encoder = TextEncoder(c.vocab_size, c.text_width, c.text_depth, c.text_heads, c.max_text_len,
                                        c.mlp_ratio, c.dropout, c.pad_id)
        self.fusion_encoder = FusionEncoder(c.text_width, c.fusion_depth, c.text_heads, c.vision_width,
                                            c.mlp_ratio, c.dropout)
        self.vision_proj = nn.Linear(c.vision_width, c.embed_dim)
        self.text_proj = nn.Linear(c.text_width, c.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(c.temp)), requires_grad=c.learn_temp)
        self.itm_head = nn.Linear(c.text_width, 2)
        # BERT's MLM prediction head: transform (dense, GELU, LayerNorm) + decoder (untied from the embeddings).
        self.mlm_head = nn.Sequential(nn.Linear(c.text_width, c.text_width), nn.GELU(), nn.LayerNorm(c.text_width),
                                      nn.Linear(c.text_width, c.vocab_size))
        for m in (self.vision_proj, self.text_proj, self.itm_head, self.mlm_head):
            m.apply(_init_linear)
        if c.sep_heads:  # modality-independent features z^i (CVPR 2023, deep feature separation)
            self.vision_sep = nn.Linear(c.vision_width, c.embed_dim)
            self.text_sep = nn.Linear(c.text_width, c.embed_dim)
            for m in (self.vision_sep, self.text_sep):
                m.apply(_init_linear)

        for online, momentum in self._pairs():
            m = copy.deepcopy(getattr(self, online))
            for p in m.parameters():
                p.requires_grad_(False)
            setattr(self, momentum, m)

        q = c.queue_size
        self.register_buffer("image_queue", torch.zeros(q, c.embed_dim))
        self.register_buffer("text_queue", torch.zeros(q, c.embed_dim))
        self.register_buffer("idx_queue", torch.full((q,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ bookkeeping
    def _pairs(self) -> tuple[tuple[str, str], ...]:
        pairs = self._MOMENTUM_PAIRS
        if self.config.distill_mlm:
            pairs = pairs + self._MLM_PAIRS
        if self.config.sep_heads:
            pairs = pairs + self._SEP_PAIRS
        return pairs

    def momentum_modules(self) -> dict[str, nn.Module]:
        return {m: getattr(self, m) for _, m in self._pairs()}

    def momentum_parameter_names(self) -> set[str]:
        return {f"{m}.{n}" for m, mod in self.momentum_modules().items() for n, _ in mod.named_parameters()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimiser should update (everything but the momentum copies and frozen ones)."""
        momentum = {id(p) for mod in self.momentum_modules().values() for p in mod.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in momentum]

    @torch.no_grad()
    def update_momentum(self, momentum: float | None = None) -> None:
        """EMA step ``theta_m <- m * theta_m + (1 - m) * theta`` for every momentum copy (``m = config.momentum``).
        Buffers of the online modules (if any) are copied."""
        m = self.config.momentum if momentum is None else float(momentum)
        for online, mom in self._pairs():
            src, dst = getattr(self, online), getattr(self, mom)
            for p, pm in zip(src.parameters(), dst.parameters()):
                pm.mul_(m).add_(p.detach(), alpha=1.0 - m)
            for b, bm in zip(src.buffers(), dst.buffers()):
                bm.copy_(b)

    @torch.no_grad()
    def copy_params_to_momentum(self) -> None:
        """Reset every momentum copy to the online weights (ALBEF does this at construction)."""
        self.update_momentum(momentum=0.0)

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        self.temp.clamp_(self.config.temp_min, self.config.temp_max)

    # ------------------------------------------------------------------ queues
    @torch.no_grad()
    def reset_queue(self) -> None:
        self.image_queue.zero_()
        self.text_queue.zero_()
        self.idx_queue.fill_(-1)
        self.queue_ptr.zero_()
        self.queue_count.zero_()

    def queue_features(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The filled part of the queues: ``(image [n, E], text [n, E], idx [n])`` (copies, no gradient)."""
        n = int(self.queue_count)
        return (self.image_queue[:n].clone(), self.text_queue[:n].clone(), self.idx_queue[:n].clone())

    @torch.no_grad()
    def dequeue_and_enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor,
                            idx: torch.Tensor | None = None) -> None:
        """Write a batch of (momentum) features into the ring buffers, overwriting the oldest entries.

        Under torch.distributed the features of every rank are gathered first (as ALBEF). Any batch size works:
        writes wrap around the end of the queue; a batch larger than the queue keeps its last ``queue_size`` rows.
        """
        q = self.config.queue_size
        if q == 0:
            return
        image_feat = _concat_all_gather(image_feat.detach())
        text_feat = _concat_all_gather(text_feat.detach())
        if image_feat.shape != text_feat.shape:
            raise ValueError(f"image and text features differ in shape: {tuple(image_feat.shape)} vs "
                             f"{tuple(text_feat.shape)}")
        n = image_feat.shape[0]
        if idx is None:
            idx = torch.full((n,), -1, dtype=torch.long, device=image_feat.device)
        else:
            idx = _concat_all_gather(idx.detach().reshape(-1).long())
        if n > q:
            image_feat, text_feat, idx = image_feat[-q:], text_feat[-q:], idx[-q:]
            n = q
        ptr = int(self.queue_ptr)
        pos = (ptr + torch.arange(n, device=self.image_queue.device)) % q
        self.image_queue[pos] = image_feat.to(self.image_queue.dtype)
        self.text_queue[pos] = text_feat.to(self.text_queue.dtype)
        self.idx_queue[pos] = idx.to(self.idx_queue.device)
        self.queue_ptr.fill_((ptr + n) % q)
        self.queue_count.fill_(min(q, int(self.queue_count) + n))

    # ------------------------------------------------------------------ encoders
    def _text_mask(self, text_ids: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        return (text_ids != self.config.pad_id) if text_mask is None else text_mask.bool()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image tokens ``[B, 1+N, vision_width]`` (online encoder)."""
        return self.visual_encoder(images)

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unimodal text tokens ``[B, L, text_width]`` (online encoder)."""
        return self.text_encoder(text_ids, self._text_mask(text_ids, text_mask))

    def fuse(self, text_states: torch.Tensor, text_mask: torch.Tensor, image_states: torch.Tensor) -> torch.Tensor:
        """Fused states ``[B, L, text_width]`` from unimodal text and image tokens."""
        return self.fusion_encoder(text_states, text_mask, image_states)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised ITC image features ``z_v [B, embed_dim]``."""
        return F.normalize(self.vision_proj(self.encode_image(images)[:, 0]), dim=-1)

    def text_features(self, text_ids: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised ITC text features ``z_t [B, embed_dim]``."""
        return F.normalize(self.text_proj(self.encode_text(text_ids, text_mask)[:, 0]), dim=-1)

    def fused_cls(self, images: torch.Tensor, text_ids: torch.Tensor,
                  text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Fused [CLS] state ``[B, text_width]`` of each (image, text) pair -- the input of every fused head."""
        mask = self._text_mask(text_ids, text_mask)
        return self.fuse(self.text_encoder(text_ids, mask), mask, self.encode_image(images))[:, 0]

    def itm_logits(self, images: torch.Tensor, text_ids: torch.Tensor,
                   text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ITM logits ``[B, 2]`` (column 1 = "matched") of each (image, text) pair."""
        return self.itm_head(self.fused_cls(images, text_ids, text_mask))

    def encode_batch(self, sequences: Sequence[Sequence[int]], max_len: int | None = None,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[CLS] words [SEP] [PAD]..`` ids and mask with this model's special ids (:func:`fusion.encode_batch`)."""
        c = self.config
        return encode_batch(sequences, cls_id=c.cls_id, sep_id=c.sep_id, pad_id=c.pad_id,
                            max_len=c.max_text_len if max_len is None else min(max_len, c.max_text_len),
                            device=device)

    # ------------------------------------------------------------------ pre-training
    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Alias of :meth:`forward_pretrain`."""
        return self.forward_pretrain(*args, **kwargs)

    def forward_pretrain(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor | None = None,
                         images_aug: torch.Tensor | None = None, text_ids_aug: torch.Tensor | None = None,
                         text_mask_aug: torch.Tensor | None = None, *, idx: torch.Tensor | None = None,
                         alpha: float | None = None, objectives: Sequence[str] = OBJECTIVES,
                         update_momentum: bool | None = None, enqueue: bool | None = None,
                         generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """ALBEF pre-training step on a batch of B matched (image, text) pairs.

        Args:
            images: ``[B, C, H, W]``. text_ids / text_mask: ``[B, L]`` ([CLS] first; mask 1 = token; if None,
                ``text_ids != pad_id``).
            images_aug, text_ids_aug, text_mask_aug: optional second (augmented) view fed to the *momentum*
                encoders. Without them the momentum encoders see the same inputs (as ALBEF) and the EMA encoder
                itself plays the role of the augmentation. The momentum features serve the ITC targets, the queue,
                the MLM distillation and are returned as ``z_v_aug`` / ``z_t_aug``.
            idx: optional ``[B]`` pair / image ids: pairs sharing an id (in the batch or the queue) count as
                positives in ITC and are never drawn as ITM negatives (ALBEF's retrieval fine-tuning).
            alpha: distillation weight (default ``config.alpha``; ALBEF ramps it from 0 during the first epoch).
            objectives: subset of ``("itc", "itm", "mlm")``. ITM reuses the ITC similarities for its negatives.
            update_momentum: call :meth:`update_momentum` before the momentum forward (default: ``self.training``).
            enqueue: push the momentum features into the queues after the loss (default: ``self.training``).
            generator: random generator for the MLM masks and the ITM negatives (on the inputs' device).

        Returns a dict with the requested losses ``"itc"``, ``"itm"``, ``"mlm"`` (scalars), ``"loss"`` (their sum),
        ``"z_v"``, ``"z_t"`` (normalised online features, with gradient), ``"z_v_aug"``, ``"z_t_aug"`` (normalised
        momentum features, no gradient), ``"temp"`` (detached), ``"logit_scale"`` (``1 / temp``, with gradient when
        the temperature is learnable; detach it to keep a regularizer from moving the temperature) and
        ``"alpha"``. With ``config.sep_heads`` also ``"zi_v"``, ``"zi_t"`` (normalised online modality-independent
        features) and ``"zi_v_aug"``, ``"zi_t_aug"`` (from the momentum copies of those heads). Add a
        modality-structure regularizer as ``out["loss"] + w * reg(out["z_v"], out["z_t"], out["z_v_aug"],
        out["z_t_aug"])``.
        """
        objectives = tuple(objectives)
        unknown = set(objectives) - set(OBJECTIVES)
        if unknown:
            raise ValueError(f"unknown objectives {sorted(unknown)}; choose from {OBJECTIVES}")
        c = self.config
        alpha = c.alpha if alpha is None else float(alpha)
        update_momentum = self.training if update_momentum is None else update_momentum
        enqueue = self.training if enqueue is None else enqueue
        text_mask = self._text_mask(text_ids, text_mask)
        bsz = images.shape[0]
        if text_ids.shape[0] != bsz:
            raise ValueError(f"{bsz} images but {text_ids.shape[0]} texts")

        self.clamp_temperature()
        if update_momentum:
            self.update_momentum()
        temp = self.temp

        image_embeds = self.visual_encoder(images)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        text_embeds = self.text_encoder(text_ids, text_mask)
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

        with torch.no_grad():
            image_embeds_m = self.visual_encoder_m(images if images_aug is None else images_aug)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]), dim=-1)
            if text_ids_aug is None:
                ids_m, mask_m = text_ids, text_mask
            else:
                ids_m, mask_m = text_ids_aug, self._text_mask(text_ids_aug, text_mask_aug)
            text_cls_m = self.text_encoder_m(ids_m, mask_m)[:, 0]
            text_feat_m = F.normalize(self.text_proj_m(text_cls_m), dim=-1)

            q_img, q_txt, q_idx = self.queue_features()
            image_feat_all = torch.cat([image_feat_m.float(), q_img.to(image_feat_m.device)], dim=0)
            text_feat_all = torch.cat([text_feat_m.float(), q_txt.to(text_feat_m.device)], dim=0)
            if idx is None:
                pos = torch.zeros(bsz, image_feat_all.shape[0], dtype=torch.bool, device=images.device)
                pos[:, :bsz] = torch.eye(bsz, dtype=torch.bool, device=images.device)
            else:
                idx = idx.reshape(-1).long().to(images.device)
                idx_all = torch.cat([idx, q_idx.to(images.device)])
                pos = idx[:, None] == idx_all[None, :]
            sim_targets = pos.float() / pos.float().sum(dim=1, keepdim=True)
            if alpha > 0:
                sim_i2t_m = image_feat_m.float() @ text_feat_all.T / temp
                sim_t2i_m = text_feat_m.float() @ image_feat_all.T / temp
                i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
                t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
            else:
                i2t_targets = t2i_targets = sim_targets

        out: dict[str, torch.Tensor] = {}
        need_sims = "itc" in objectives or "itm" in objectives
        if need_sims:
            with torch.autocast(device_type=images.device.type, enabled=False):
                sim_i2t = image_feat.float() @ text_feat_all.T / temp
                sim_t2i = text_feat.float() @ image_feat_all.T / temp
            if "itc" in objectives:
                out["itc"] = (_soft_ce(sim_i2t, i2t_targets) + _soft_ce(sim_t2i, t2i_targets)) / 2

        if "itm" in objectives:
            out["itm"] = self._itm_loss(image_embeds, text_embeds, text_mask, sim_i2t[:, :bsz].detach(),
                                        sim_t2i[:, :bsz].detach(), pos[:, :bsz], generator)

        if "mlm" in objectives:
            out["mlm"] = self._mlm_loss(text_ids, text_mask, image_embeds, image_embeds_m, alpha, generator)

        out["loss"] = sum(out[k] for k in OBJECTIVES if k in out) if out else image_feat.sum() * 0
        out.update(z_v=image_feat, z_t=text_feat, z_v_aug=image_feat_m, z_t_aug=text_feat_m,
                   temp=temp.detach().clone(), logit_scale=1.0 / temp, alpha=torch.tensor(alpha))
        if c.sep_heads:
            out["zi_v"] = F.normalize(self.vision_sep(image_embeds[:, 0]), dim=-1)
            out["zi_t"] = F.normalize(self.text_sep(text_embeds[:, 0]), dim=-1)
            with torch.no_grad():
                out["zi_v_aug"] = F.normalize(self.vision_sep_m(image_embeds_m[:, 0]), dim=-1)
                out["zi_t_aug"] = F.normalize(self.text_sep_m(text_cls_m), dim=-1)
        if enqueue:
            self.dequeue_and_enqueue(image_feat_m, text_feat_m, idx)
        return out

    def _itm_loss(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor,
                  sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, pos: torch.Tensor,
                  generator: torch.Generator | None) -> torch.Tensor:
        bsz = image_embeds.shape[0]
        out_pos = self.fuse(text_embeds, text_mask, image_embeds)[:, 0]
        neg_img, valid_t = sample_hard_negatives(sim_t2i, pos.T, generator)  # one negative image per text
        neg_txt, valid_i = sample_hard_negatives(sim_i2t, pos, generator)    # one negative text per image
        text_all = torch.cat([text_embeds, text_embeds[neg_txt]], dim=0)
        mask_all = torch.cat([text_mask, text_mask[neg_txt]], dim=0)
        image_all = torch.cat([image_embeds[neg_img], image_embeds], dim=0)
        out_neg = self.fuse(text_all, mask_all, image_all)[:, 0]
        logits = self.itm_head(torch.cat([out_pos, out_neg], dim=0))
        dev = logits.device
        labels = torch.cat([torch.ones(bsz, dtype=torch.long, device=dev),
                            torch.where(valid_t, 0, IGNORE_INDEX).to(dev),
                            torch.where(valid_i, 0, IGNORE_INDEX).to(dev)])
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)

    def _mlm_loss(self, text_ids: torch.Tensor, text_mask: torch.Tensor, image_embeds: torch.Tensor,
                  image_embeds_m: torch.Tensor, alpha: float, generator: torch.Generator | None) -> torch.Tensor:
        c = self.config
        input_ids, labels = mask_tokens(text_ids, text_mask, vocab_size=c.vocab_size, mask_id=c.mask_id,
                                        special_ids=c.special_ids, mlm_probability=c.mlm_probability,
                                        generator=generator)
        fused = self.fuse(self.text_encoder(input_ids, text_mask), text_mask, image_embeds)
        sel = labels != IGNORE_INDEX
        if not bool(sel.any()):  # nothing masked in this batch: a zero that keeps the graph
            return fused.sum() * 0.0
        logits = self.mlm_head(fused[sel]).float()
        loss = F.cross_entropy(logits, labels[sel])
        if alpha > 0 and c.distill_mlm:
            with torch.no_grad():
                fused_m = self.fusion_encoder_m(self.text_encoder_m(input_ids, text_mask), text_mask, image_embeds_m)
                soft = F.softmax(self.mlm_head_m(fused_m[sel]).float(), dim=-1)
            loss = (1 - alpha) * loss + alpha * _soft_ce(logits, soft)
        return loss

    # ------------------------------------------------------------------ retrieval
    @torch.no_grad()
    def retrieval_scores(self, images: torch.Tensor, texts: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                         k_rerank: int = 16, *, text_mask: torch.Tensor | None = None,
                         batch_size: int = 128) -> RetrievalScores:
        """Two-stage image-text retrieval (ALBEF's evaluation): ITC recall, then ITM re-ranking.

        For each image the ``k_rerank`` texts with the highest ITC similarity get the ITM score (log-odds of
        "matched" from the fused [CLS]); for each text likewise its top-``k_rerank`` images. The other entries keep
        their ITC order below every re-ranked candidate (ITC similarity shifted under the lowest ITM score), so each
        matrix is a complete, finite ranking. ``k_rerank=0`` returns the ITC similarities in all three matrices.

        ``texts`` is ``text_ids [n_txt, L]`` (mask from ``text_mask`` or ``!= pad_id``) or a ``(ids, mask)`` tuple.
        Call ``model.eval()`` first. Returns :class:`RetrievalScores` of ``[n_img, n_txt]`` matrices.
        """
        if isinstance(texts, (tuple, list)):
            text_ids, text_mask = texts
        else:
            text_ids = texts
        text_mask = self._text_mask(text_ids, text_mask)
        n_img, n_txt = images.shape[0], text_ids.shape[0]
        image_embeds = torch.cat([self.visual_encoder(images[i:i + batch_size])
                                  for i in range(0, n_img, batch_size)])
        text_embeds = torch.cat([self.text_encoder(text_ids[i:i + batch_size], text_mask[i:i + batch_size])
                                 for i in range(0, n_txt, batch_size)])
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]).float(), dim=-1)
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0]).float(), dim=-1)
        with torch.autocast(device_type=image_feat.device.type, enabled=False):
            itc = image_feat @ text_feat.T
        if k_rerank <= 0 or n_img == 0 or n_txt == 0:
            return RetrievalScores(itc.clone(), itc.clone(), itc)
        cand_i2t = torch.zeros_like(itc, dtype=torch.bool)
        cand_i2t.scatter_(1, itc.topk(min(k_rerank, n_txt), dim=1).indices, True)
        cand_t2i = torch.zeros_like(itc, dtype=torch.bool)
        cand_t2i.scatter_(0, itc.topk(min(k_rerank, n_img), dim=0).indices, True)
        pairs = (cand_i2t | cand_t2i).nonzero()  # each (image, text) pair scored once
        scores = []
        for s in range(0, pairs.shape[0], batch_size):
            i, t = pairs[s:s + batch_size, 0], pairs[s:s + batch_size, 1]
            logits = self.itm_head(self.fuse(text_embeds[t], text_mask[t], image_embeds[i])[:, 0]).float()
            scores.append((logits[:, 1] - logits[:, 0]).to(itc.dtype))
        itm = torch.full_like(itc, float("nan"))
        itm[pairs[:, 0], pairs[:, 1]] = torch.cat(scores)
        fill = itc + (itm[pairs[:, 0], pairs[:, 1]].min() - itc.max() - 1.0)
        return RetrievalScores(torch.where(cand_i2t, itm, fill), torch.where(cand_t2i, itm, fill), itc)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ====================================================================== downstream heads
def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
    mlp.apply(_init_linear)
    return mlp


class VQAHead(nn.Module):
    """VQA as classification over a fixed answer list: fused [CLS] ``[B, D]`` -> logits ``[B, n_answers]``.

    ``Linear(D, 2D) - GELU - LayerNorm - Linear(2D, n_answers)``, the classifier of the BUTD / LXMERT / UNITER VQA
    baselines. (ALBEF generates answers with a 6-layer decoder instead; see the module docstring.)
    """

    def __init__(self, width: int, n_answers: int, hidden: int | None = None):
        super().__init__()
        hidden = 2 * width if hidden is None else hidden
        self.n_answers = n_answers
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.LayerNorm(hidden),
                                 nn.Linear(hidden, n_answers))
        self.net.apply(_init_linear)

    def forward(self, fused_cls: torch.Tensor) -> torch.Tensor:
        return self.net(fused_cls)

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy. ``targets``: answer indices ``[B]`` (long; -100 = ignore), or soft answer scores
        ``[B, n_answers]`` (float, e.g. VQA's min(#humans/3, 1)), normalised per row to a distribution (rows
        summing to 0 are ignored)."""
        logits = logits.float()
        if not targets.is_floating_point():
            return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
        mass = targets.sum(dim=1, keepdim=True)
        keep = mass.squeeze(1) > 0
        if not bool(keep.any()):
            return logits.sum() * 0.0
        return _soft_ce(logits[keep], targets[keep] / mass[keep])


class NLVRHead(nn.Module):
    """NLVR2: ``[fused CLS(text, image_a) ; fused CLS(text, image_b)] [B, 2D] -> MLP -> [B, 2]`` (False / True)."""

    def __init__(self, width: int, hidden: int | None = None):
        super().__init__()
        self.net = _mlp(2 * width, width if hidden is None else hidden, 2)

    def forward(self, cls_a: torch.Tensor, cls_b: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([cls_a, cls_b], dim=-1))


class VEHead(nn.Module):
    """SNLI-VE: fused [CLS] ``[B, D]`` -> MLP -> ``[B, 3]`` (entailment / neutral / contradiction), as ALBEF."""

    def __init__(self, width: int, n_classes: int = 3, hidden: int | None = None):
        super().__init__()
        self.net = _mlp(width, width if hidden is None else hidden, n_classes)

    def forward(self, fused_cls: torch.Tensor) -> torch.Tensor:
        return self.net(fused_cls)


class _ALBEFTask(nn.Module):
    """A pre-trained :class:`ALBEF` (online encoders only) + a task head; ``loss`` is cross-entropy."""

    def __init__(self, albef: ALBEF):
        super().__init__()
        self.albef = albef

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)


class ALBEFForVQA(_ALBEFTask):
    """``forward(images, question_ids, question_mask=None) -> answer logits [B, n_answers]``;
    ``loss`` = :meth:`VQAHead.loss` (hard indices or soft scores)."""

    def __init__(self, albef: ALBEF, n_answers: int, hidden: int | None = None):
        super().__init__(albef)
        self.head = VQAHead(albef.config.text_width, n_answers, hidden)

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.albef.fused_cls(images, text_ids, text_mask))

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return VQAHead.loss(logits, targets)


class ALBEFForNLVR(_ALBEFTask):
    """``forward(images_a, images_b, text_ids, text_mask=None) -> logits [B, 2]`` (the statement is True = 1)."""

    def __init__(self, albef: ALBEF, hidden: int | None = None):
        super().__init__(albef)
        self.head = NLVRHead(albef.config.text_width, hidden)

    def forward(self, images_a: torch.Tensor, images_b: torch.Tensor, text_ids: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        a = self.albef
        mask = a._text_mask(text_ids, text_mask)
        text = a.text_encoder(text_ids, mask)  # encoded once, fused with each image
        bsz = images_a.shape[0]
        img = a.encode_image(torch.cat([images_a, images_b], dim=0))
        fused = a.fuse(torch.cat([text, text]), torch.cat([mask, mask]), img)[:, 0]
        return self.head(fused[:bsz], fused[bsz:])


class ALBEFForVE(_ALBEFTask):
    """``forward(images, hypothesis_ids, hypothesis_mask=None) -> logits [B, 3]``."""

    def __init__(self, albef: ALBEF, n_classes: int = 3, hidden: int | None = None):
        super().__init__(albef)
        self.head = VEHead(albef.config.text_width, n_classes, hidden)

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.albef.fused_cls(images, text_ids, text_mask))
