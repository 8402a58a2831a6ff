"""Semi-supervised nuclei segmentation around the CDCL loss: data, augmentation, models, metrics,
schedules and checkpoints used by the thin scripts `train.py` and `predict.py` at the repository root."""
