"""offline_prune: one-shot ARMOR (and baseline) 2:4 pruning of Hugging Face decoder models."""

__version__ = "0.1.0"
