"""genforge: batch jobs for image-generation models on Ray, tracked in MLflow, stored in S3."""

import os

__version__ = "0.1.0"

# MLflow's client sends usage telemetry to its maintainers unless told not to, and decides when
# it is first imported: genforge's processes (driver, actors, tasks) import this package before
# MLflow. A user who wants it on sets MLFLOW_DISABLE_TELEMETRY=false.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
