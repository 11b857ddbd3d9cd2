"""mmt: multimodal transformer training."""
