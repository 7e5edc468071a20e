"""clipline: CLIP-style contrastive image-text pretraining.

Subpackages: ``clipline.data`` (shards, streams), ``clipline.pretrain`` (dual encoders,
losses, training loop, export), ``clipline.eval`` (zero-shot, retrieval) and
``clipline.launch`` (run configs, recipes, the CLI).
"""

__version__ = "0.1.0"
