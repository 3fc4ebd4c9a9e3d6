"""latentdiff: latent text-to-image diffusion in the Stable Diffusion layout, with fused C++/CUDA kernels."""
__version__ = "0.1.0"
