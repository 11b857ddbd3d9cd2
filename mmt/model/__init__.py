"""The multimodal transformer library: every variant is chosen by name through a registry."""
