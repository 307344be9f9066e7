"""One training run per engine, recorded as one MLflow run the same way.

- plain.py: the plain loop's run (what `mnistflow train` runs by default)
- lightning.py: the Lightning run (rank 0 records; DDP followers log nothing)
- baseline.py: the scikit-learn baseline's run

Imports engines, recording, tracking and everything below. pipeline.py (the whole job) sits
above, as do sweep/ and cli/.
"""
