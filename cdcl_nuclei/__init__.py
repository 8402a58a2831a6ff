"""Semi-supervised nuclei segmentation around the CDCL loss: settings, trainer, objectives, data,
augmentation, models, metrics, schedules and checkpoints behind the commands `cdcl-train` and
`cdcl-predict` (train.py and predict.py at the repository root run the same)."""
