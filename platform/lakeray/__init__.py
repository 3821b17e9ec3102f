"""lakeray: Spark feature jobs into Delta, Ray Train/Tune on pinned versions, MLflow registry, Ray Serve.

Importing lakeray imports nothing heavy; each module imports pyspark, ray or mlflow inside the
functions that need them.
"""

__version__ = "0.1.0"
