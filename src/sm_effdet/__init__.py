"""sm-effdet: EfficientDet training and serving for SageMaker, and its launcher.

The root holds the `train` entry (cli.py), the demo, and what every wing reads: hyperparameters,
backbones, environment, errors, stops. Wings: training/, serving/, launch/ (entries' engines),
evaluation/, data/, model/; imports only flow downward, in that order.
"""

__version__ = "0.1.0"
