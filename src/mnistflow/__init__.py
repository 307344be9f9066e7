"""mnistflow: an MNIST digit classifier whose whole life runs on MLflow."""

__version__ = "0.1.0"
