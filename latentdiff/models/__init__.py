"""The networks: the KL autoencoder, the CLIP text encoder(s) and the conditioned U-Net, with SD parameter names."""
