"""EfficientDet training for SageMaker: the `train` job of this container."""

__version__ = "0.1.0"
