"""contrastive-repro: losses, metrics, data and models for three contrastive / metric-learning papers.

The library is independent of the notebooks and of the runner (``reproduce``): import it in your own training code.

* ``contrastive_repro.losses``  -- InfoNCE, the decomposable (stochastic-EM) contrastive loss, modality-structure
  regularizers, the threshold-consistent margin loss and base DML losses.
* ``contrastive_repro.metrics`` -- retrieval Recall@k, image-text recall, zero-shot accuracy, OPIS.
* ``contrastive_repro.data``    -- offline datasets (Fashion-MNIST, MNIST, emoji image-caption pairs) and
  DATA_ROOT loaders for the papers' benchmarks.
* ``contrastive_repro.models``  -- small CNNs, open_clip two-towers, embedding heads.
* ``contrastive_repro.training`` -- one small training loop with checkpoint/resume, AMP and a NaN guard.
* ``contrastive_repro.distributed`` -- torchrun helpers and an all-gather that keeps gradients.
"""

__version__ = "0.1.0"
