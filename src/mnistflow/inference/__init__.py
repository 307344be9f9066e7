"""Classifying digits with a logged model, outside a server.

- preprocess.py: any image made MNIST-like (the server uses it too)
- batch.py: PNG/JPEG files, folders, .npy and IDX classified in batches, written as CSV/JSON
- spark.py: the same as a Spark job (mlflow.pyfunc.spark_udf), Parquet in and out
- spark_inputs.py: what a Spark job reads, and its rows made model input on the executors

Imports config, data and lifecycle (the pixel check, the registry). batch.py and spark.py
import mlflow and the registry (which imports mlflow) only in the functions that load a
model: Spark's Python workers import spark_inputs.py (and so batch.py) to run the preprocessing
UDFs, which need numpy and PIL only, and mlflow is a heavy import.
"""
