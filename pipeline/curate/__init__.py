"""Curation intelligence: image embeddings and a similarity index, near-duplicate and held-out
leak detection, active selection of what people annotate next, and review agreement."""
