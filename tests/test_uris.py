"""uris.redact: every password and token a URI can carry is hidden, nothing else changes."""

from __future__ import annotations

import pytest

from mnistflow.store.uris import has_credentials, redact


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("https://alice:s3cret@mlflow.example.com", "https://alice:***@mlflow.example.com"),
        ("http://alice:s3cret@127.0.0.1:5000/", "http://alice:***@127.0.0.1:5000/"),
        # An unencoded "@" in the password: the host is after the last one.
        ("https://bob:p@ss@host:8443/path", "https://bob:***@host:8443/path"),
        (
            "postgresql+psycopg://optuna:db-pass@db.internal:5432/studies",
            "postgresql+psycopg://optuna:***@db.internal:5432/studies",
        ),
        ("postgresql://u:p%40ss@h/db?sslmode=require", "postgresql://u:***@h/db?sslmode=require"),
        ("https://host/api?token=abc123&x=1", "https://host/api?token=***&x=1"),
        (
            "https://host/?x=1&Password=abc&access_token=t",
            "https://host/?x=1&Password=***&access_token=***",
        ),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA&X-Amz-Signature=f00",
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***",
        ),
    ],
)
def test_passwords_and_tokens_are_hidden_and_the_rest_kept(uri, shown):
    assert redact(uri) == shown
    assert has_credentials(uri)
    assert not has_credentials(shown.replace("***", ""))  # empty secrets: nothing to hide
    assert redact(shown) == shown  # idempotent


@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1:5000",
        "https://alice@mlflow.example.com",  # a user name alone is no secret
        "postgresql+psycopg://postgres@127.0.0.1:5432/mlflow",
        "sqlite:////home/me/mlflow.db",
        "file:///tmp/mlruns",
        "models:/mnist@champion",
        "runs:/0123/model",
        "study.log",
        "s3://bucket/artifacts",
        "databricks",
    ],
)
def test_uris_without_secrets_are_unchanged(uri):
    assert redact(uri) == uri
    assert not has_credentials(uri)


def test_uris_inside_sentences_are_redacted():
    sentence = (
        "API request to https://carol:hunter2-long@host:5000/api/2.0/mlflow/runs/create failed "
        "with exception; retrying postgresql://u:db-pw@db/x."
    )
    shown = redact(sentence)
    assert "hunter2-long" not in shown and "db-pw" not in shown
    assert "https://carol:***@host:5000/api/2.0/mlflow/runs/create failed" in shown
    assert shown.endswith("postgresql://u:***@db/x.")
