"""Trained models at work: predictions, their metrics, and many adapter sets on one base."""

from components.inference.adapter_sets import MultiTaskModel
from components.inference.predict import predict, write_predictions

__all__ = ["MultiTaskModel", "predict", "write_predictions"]
