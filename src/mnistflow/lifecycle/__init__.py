"""A trained network's life as a model: what it is, how it is logged, registered and served.

- networks.py: the networks, built by the architecture names config.ARCHITECTURES lists
- export.py: ONNX export of a torch network
- logged_models.py: the logged-model contract: any trainer's ONNX graph becomes the served
  pyfunc (checked against the trainer's own probabilities), in the active run
- classifier_model.py, pixels.py: the pyfunc "model from code" and its pixel check; both
  files are copied into every logged model (python_model, code_paths), so their names and
  their imports (numpy, onnxruntime, MLflow only) are part of the model contract
- registry.py: versions, aliases, champion history and rollback, through an explicit client

Imports config and store only. Promotion is not here, though it is part of a model's life:
it opens runs of its own through tracking, which sits above the spool, which imports the
registry from here (mnistflow/promotion.py, above tracking).
"""
