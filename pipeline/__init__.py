"""dataengine: the library — storage, sharding, masks, annotation stages, training, latents."""
