"""dataengine model builders (SAM, detector, VAE, U-Net) and checkpoint I/O."""
