"""Training on Ray: Delta ingest, XGBoost through Ray Train, MLflow tracking and registry."""
