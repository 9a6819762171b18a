"""Losses of the three papers and the baselines they build on.

Contrastive (NeurIPS 2022, Chen et al.):
* :func:`info_nce`, :class:`InfoNCELoss` -- one-modality InfoNCE / NT-Xent; :func:`clip_loss`,
  :class:`SymmetricContrastiveLoss` -- the symmetric image-text loss (open_clip's ``ClipLoss`` underneath).
* :class:`DecomposableContrastiveLoss` -- the decomposable loss with per-sample gamma auxiliary variables,
  optimized by stochastic EM; :func:`conventional_contrastive_loss` -- the minibatch plug-in loss it corrects.

Latent modality structures (CVPR 2023, Jiang et al.):
* :func:`contrastive_base_loss` (L_Con), :func:`cyclip_loss`, :func:`separation_loss`,
  :func:`brownian_bridge_loss`, :func:`geometric_consistency_loss`, composed by :class:`ModalityStructureLoss`.

Threshold-consistent metric learning (ICLR 2024, Zhang et al.):
* :class:`TCMLoss`, :class:`WithTCM` / :func:`add_tcm`; base losses :class:`SmoothAPLoss`,
  :class:`RecallAtKSurrogateLoss` and pytorch-metric-learning's through :func:`build_dml_loss`.
"""
from .decomposable import DecomposableContrastiveLoss, conventional_contrastive_loss
from .dml import DML_LOSS_NAMES, DMLLoss, build_dml_loss, has_learnable_parameters, needs_class_balanced_batches
from .infonce import InfoNCELoss, SymmetricContrastiveLoss, clip_loss, info_nce
from .modality import (ModalityStructureLoss, brownian_bridge_loss, contrastive_base_loss, cyclip_loss,
                       geometric_consistency_loss, separation_loss)
from .recall_surrogate import RecallAtKSurrogateLoss
from .smooth_ap import SmoothAPLoss
from .tcm import TCMLoss, WithTCM, add_tcm

__all__ = [
    "info_nce", "InfoNCELoss", "clip_loss", "SymmetricContrastiveLoss",
    "DecomposableContrastiveLoss", "conventional_contrastive_loss",
    "contrastive_base_loss", "cyclip_loss", "separation_loss", "brownian_bridge_loss", "geometric_consistency_loss",
    "ModalityStructureLoss",
    "TCMLoss", "WithTCM", "add_tcm", "SmoothAPLoss", "RecallAtKSurrogateLoss",
    "build_dml_loss", "DMLLoss", "DML_LOSS_NAMES", "needs_class_balanced_batches", "has_learnable_parameters",
]
