"""The semi-automatic stage's box proposer: DETR training, evaluation and SAM pre-fill."""
