-- The basic-auth app's users and permissions live in their own database beside MLflow's.
CREATE DATABASE mlflow_auth OWNER mlflow;
