"""Experiment tracking: MLflow logging during training and run comparison (`mmt runs`)."""
