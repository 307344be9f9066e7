"""What trains a network: each engine fits and returns its own result, and knows no tracking.

- plain.py: our own loop (reports to a Reporter; also evaluate, resolve the device/precision)
- lightning.py: PyTorch Lightning, the same networks and recipes (LightningModule, data)
- sklearn.py: the scikit-learn baseline (pipeline, its ONNX conversion, autolog around fit)

Imports config, data, reporting and lifecycle (the networks). MLflow appears here only as
autolog (Lightning's and scikit-learn's), which logs into whatever run is active: the one
tracking.py opened. Recording a run is runs/'s and recording.py's work, above this.
"""
