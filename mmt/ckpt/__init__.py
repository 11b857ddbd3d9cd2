"""Checkpoint tools: inspect, convert to safetensors, reshard to another world size, load pretrained weights."""
