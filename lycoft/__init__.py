"""lycoft: orthogonal finetuning for Stable Diffusion."""
