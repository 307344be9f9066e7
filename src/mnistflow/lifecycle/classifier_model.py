"""The MNIST classifier as an MLflow Python-function model, logged as "model from code".

MLflow copies this file into the logged model and runs it when the model is loaded, so it
needs only numpy, pandas, onnxruntime and MLflow: no torch and no mnistflow in the serving
environment. The package never imports it; the ``set_model`` call at the bottom is how a
model-from-code file tells MLflow which object is the model.

Contract
    input:  float32 pixels 0-255, white digit on black as in MNIST, shaped (N, 28, 28);
            classify() also takes (N, 1, 28, 28), (N, 784) and a single (28, 28) digit.
    output: one row per digit: ``label`` (int), ``probabilities`` (ten floats),
            ``confidence`` (the label's probability) and ``abstain`` (true when confidence is
            under the threshold logged with the model, model_config["abstain_below"]: the
            model is not sure this is a digit). A model logged without a threshold gives
            label and probabilities only.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd

try:
    # In a logged model: MLflow puts the files logged as code_paths (pixels.py) on sys.path.
    from pixels import PixelError as PixelError
    from pixels import as_pixels
except ImportError:  # in the source tree, before it is logged
    from mnistflow.lifecycle.pixels import PixelError as PixelError
    from mnistflow.lifecycle.pixels import as_pixels


class MnistClassifier(mlflow.pyfunc.PythonModel):  # type: ignore[misc,name-defined]
    """ONNX Runtime session over the exported network; its graph ends in a softmax."""

    def load_context(self, context: Any) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # Small batches dominate serving: one thread per op avoids thread wake-up latency,
        # and a server runs several requests side by side anyway.
        # Batch work can ask for more at load time: model_config={"intra_op_threads": 0} (all).
        config = getattr(context, "model_config", None) or {}
        options.intra_op_num_threads = int(config.get("intra_op_threads", 1))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            context.artifacts["onnx_model"], options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        below = config.get("abstain_below")
        self.abstain_below: float | None = None if below is None else float(below)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 1, 28, 28) float32 pixels (see as_pixels) -> (N, 10) probabilities."""
        return self.session.run(None, {self.input_name: pixels})[0]  # type: ignore[no-any-return]

    def classify(self, data: Any) -> tuple[np.ndarray, np.ndarray]:
        """Labels (N,) and probabilities (N, 10) for any accepted input."""
        probabilities = self.probabilities(as_pixels(data))
        return probabilities.argmax(axis=1), probabilities

    # MLflow reads predict()'s input hint: np.ndarray tells it the logged tensor signature,
    # not the hint, is the schema.
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        labels, probabilities = self.classify(model_input)
        rows = {"label": labels, "probabilities": list(probabilities)}
        if self.abstain_below is not None:
            confidence = probabilities.max(axis=1)
            rows.update(confidence=confidence, abstain=confidence < self.abstain_below)
        return pd.DataFrame(rows)


mlflow.models.set_model(MnistClassifier())
