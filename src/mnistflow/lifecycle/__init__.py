"""A trained network's life as a model: what it is, how it is logged, registered and served.

- networks.py: the networks, built by the architecture names config.ARCHITECTURES lists
- export.py: ONNX export of a torch network
- logged_models.py: the logged-model contract: any trainer's ONNX graph becomes the served
  pyfunc (checked against the trainer's own probabilities), in the active run
- classifier_model.py, pixels.py: the pyfunc "model from code" and its pixel check; both
  files are copied into every logged model (python_model, code_paths), so their names and
  their imports (numpy, onnxruntime, MLflow only) are part of the model contract
- registry.py: versions, aliases, champion history and rollback, through an explicit client
- promotion.py: @champion moved only on evidence (mlflow.models.evaluate in runs of its own)

Imports config, store and data. Promotion lives here although it opens MLflow runs: they are
its own (mlflow.start_run around mlflow.models.evaluate), not training runs, so it needs
store.experiments, never tracking.py; that keeps this package below the spool, which imports
the registry from here.
"""
