"""jax_diffusion: Gaussian diffusion models (DDPM, Improved DDPM, DDIM, DPM-Solver++) in
JAX/Flax."""
