"""Latent diffusion: the KL autoencoder, precomputed latent shards, the U-Net, sampling."""
