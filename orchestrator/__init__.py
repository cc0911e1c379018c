"""genforge: batch jobs for image-generation models on Ray, tracked in MLflow, stored in S3."""

__version__ = "0.1.0"
