"""The request and response shapes, for the OpenAPI schema only: the docs page and the
schema fuzzing read them, the hot routes never build them (see inputs.py for why)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from mnistflow.serving.inputs import INVOCATION_FORMATS


class Prediction(BaseModel):
    label: int = Field(ge=0, le=9)
    probabilities: list[float] = Field(min_length=10, max_length=10)
    # Absent for a model logged without an abstain threshold (by an earlier mnistflow).
    confidence: float | None = Field(
        default=None, ge=0, le=1, description="The label's probability."
    )
    abstain: bool | None = Field(
        default=None,
        description="True when the model is not sure this is a digit: its confidence is under "
        "the threshold chosen on validation digits and logged with the model.",
    )


class ModelRef(BaseModel):
    name: str
    version: str | None


class ModelInfo(ModelRef):
    run_id: str | None


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[Prediction]


class InvocationsResponse(BaseModel):
    predictions: list[Prediction]


class Error(BaseModel):
    error: str = Field(description="One sentence saying what is wrong.")


class MlflowError(BaseModel):
    error_code: str
    message: str


class Health(BaseModel):
    status: str


class Failure(BaseModel):
    version: str | None
    message: str
    at: str


class Ready(BaseModel):
    ready: bool
    model: ModelInfo | None
    model_uri: str
    last_error: Failure | None = Field(description="The last version that failed to load.")


class VersionInfo(ModelInfo):
    model_uri: str


def request_bodies(max_images: int) -> dict[str, dict[str, Any]]:
    """The OpenAPI requestBody of each prediction route; the limits come from the config."""
    pixel = {"type": "number", "minimum": 0, "maximum": 255}
    digit = {
        "type": "array",
        "description": "One digit: 28 rows of 28 grey levels 0-255, white on black as in MNIST.",
        "minItems": 28,
        "maxItems": 28,
        "items": {"type": "array", "minItems": 28, "maxItems": 28, "items": pixel},
    }
    digits = {"type": "array", "minItems": 1, "maxItems": max_images, "items": digit}
    rows = {
        "type": "array",
        "description": "One row of 784 pixels (28x28, row by row) per digit.",
        "minItems": 1,
        "maxItems": max_images,
        "items": {"type": "array", "minItems": 784, "maxItems": 784, "items": pixel},
    }
    split = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "columns": {"description": "Ignored: the pixels are taken in order."},
            "index": {"description": "Ignored."},
            "data": rows,
        },
        "additionalProperties": False,
    }
    params = {"description": "Accepted and ignored, as by MLflow for this model."}
    invocations = {
        "oneOf": [
            {
                "type": "object",
                "required": [key],
                "properties": {key: schema, "params": params},
                "additionalProperties": False,
            }
            for key, schema in zip(INVOCATION_FORMATS, (digits, digits, split), strict=True)
        ]
    }
    uploads = {
        "type": "array",
        "minItems": 1,
        "maxItems": max_images,
        "items": {"type": "string", "format": "binary"},
        "description": "PNG or JPEG images of one digit each, any size and colours; prepared "
        "as in batch inference.",
    }
    predict = {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["pixels"],
                "properties": {"pixels": {"oneOf": [digit, digits]}},
                "additionalProperties": False,
            }
        },
        "multipart/form-data": {
            "schema": {"type": "object", "required": ["file"], "properties": {"file": uploads}}
        },
    }
    return {
        "/predict": {"required": True, "content": predict},
        "/invocations": {
            "required": True,
            "content": {"application/json": {"schema": invocations}},
        },
    }
