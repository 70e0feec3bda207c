"""What every stage stands on: storage, the corpus layout, configs, tars, masks, splits, rounds,
curation, promotion, the Ray helpers and the Ray Train launcher."""
