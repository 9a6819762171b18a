"""Training recipes used by the notebooks: small, reusable functions that train a model for one experiment and
return plain dicts of metrics. Import the submodule you need (``from contrastive_repro.recipes import clip_pretrain``);
this package imports nothing eagerly."""
