"""Exporting trained towers for deployment: ONNX / TorchScript / torch.export, optionally int8 (`mmt export`)."""
