"""The data-engine loop: rounds in stage order, retraining, evaluation and promotion."""
