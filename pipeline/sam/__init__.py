"""SAM in the loop: the promptable training recipe, training and pre-training, evaluation,
the clicker, the automatic mask generator and cached image embeddings."""
