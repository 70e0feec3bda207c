"""Raw images into the corpus: sources, per-image checks and resizing, the sharding stage."""
