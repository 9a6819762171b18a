"""Metrics: retrieval Recall@k and MAP@R, image-text recall, zero-shot / linear-probe / k-NN accuracy, OPIS.

* :mod:`.retrieval` -- exact, chunked functions (fractions in [0, 1]).
* :mod:`.opis` -- exact OPIS / epsilon-OPIS (threshold consistency, Zhang et al. ICLR 2024) and the histogram
  version with its error bound.
* :mod:`.evaluator` -- :class:`StreamingRetrievalEvaluator`: Recall@k, MAP@R, OPIS and epsilon-OPIS in one chunked
  pass over the similarity matrix, for large N.
"""
from .evaluator import StreamingRetrievalEvaluator, evaluate_retrieval
from .opis import (epsilon_opis, epsilon_opis_from_utilities, opis, opis_from_histograms, opis_from_utilities,
                   utility)
from .retrieval import (build_zeroshot_classifier, few_shot_splits, image_text_recall, knn_accuracy,
                        linear_probe_accuracy, map_at_r, recall_at_k, zero_shot_accuracy)

__all__ = [
    "recall_at_k", "map_at_r", "image_text_recall", "zero_shot_accuracy", "build_zeroshot_classifier",
    "linear_probe_accuracy", "knn_accuracy", "few_shot_splits",
    "opis", "epsilon_opis", "utility", "opis_from_utilities", "epsilon_opis_from_utilities", "opis_from_histograms",
    "StreamingRetrievalEvaluator", "evaluate_retrieval",
]
