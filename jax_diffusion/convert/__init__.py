"""Import and export of PyTorch diffusion checkpoints: diffusers' UNet2DModel and
improved-diffusion / guided-diffusion state dicts <-> the project's U-Net and Orbax checkpoints."""
